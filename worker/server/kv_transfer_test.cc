// The KV transfer port on its own, over loopback TCP: a request's blocks arrive whole and in
// order, ended by the handler's status; strangers, garbage and oversized frames get a clear error
// and the server keeps serving; a caller that goes away shows as cancelled to the exporter; a
// call can be cancelled; Stop ends open connections.
#include "worker/server/kv_transfer.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/tls_test_certs.h"
#include "gtest/gtest.h"
#include "tests/http_client.h"

namespace strata {
namespace {

Engine::KvBlockCopy Block(uint64_t i, size_t bytes) {
  Engine::KvBlockCopy c;
  c.key.hash = 1000 + i;
  c.key.cache_namespace = 77;
  c.payload.resize(bytes);
  for (size_t k = 0; k < bytes; ++k) c.payload[k] = static_cast<char>((i * 131 + k * 7) & 0xff);
  return c;
}

v1::FetchKvBlocksRequest Request(int blocks) {
  v1::FetchKvBlocksRequest r;
  r.set_model("m");
  for (int i = 0; i < blocks; ++i) r.add_block_hashes(1000 + i);
  return r;
}

// Answers a request by writing one block per hash (of the size its layout's head_dim says, or
// 4 KiB)
// from a thread of its own, as the worker's loop does, then finishing OK; a model other than "m"
// is refused.
struct Exporter {
  std::atomic<int> requests{0};
  std::atomic<bool> saw_cancel{false};
  std::vector<std::thread> threads;
  bool wait_for_cancel = false;
  // Writes this many blocks more than the request names (a source gone wrong).
  int extra_blocks = 0;

  void operator()(const v1::FetchKvBlocksRequest& r, std::shared_ptr<KvExportSink> sink) {
    requests.fetch_add(1);
    if (r.model() != "m") {
      return sink->Finish(absl::FailedPreconditionError(
          absl::StrCat("model \"", r.model(), "\" is not this worker's")));
    }
    threads.emplace_back([this, r, sink] {
      const size_t bytes = r.layout().head_dim() != 0 ? r.layout().head_dim() : 4096;
      for (int i = 0; i < r.block_hashes_size() + extra_blocks; ++i) {
        if (!sink->Write(Block(static_cast<uint64_t>(i), bytes))) break;
      }
      if (wait_for_cancel) {
        for (int i = 0; i < 6000 && !sink->cancelled(); ++i) absl::SleepFor(absl::Milliseconds(5));
        saw_cancel.store(sink->cancelled());
        return sink->Abort(absl::CancelledError("gone"));
      }
      sink->Finish(absl::OkStatus());
    });
  }
  ~Exporter() {
    for (std::thread& t : threads) t.join();
  }
};

struct Fixture {
  Exporter exporter;
  std::unique_ptr<KvTransferServer> server;
  std::atomic<int> unauthenticated{0};

  explicit Fixture(const ClusterSecret* secret = nullptr,
                   absl::Duration request_timeout = absl::Seconds(2),
                   TlsContextSource* tls = nullptr) {
    KvTransferServerOptions o;
    o.listen_address = "127.0.0.1:0";
    o.cluster_secret = secret;
    o.request_timeout = request_timeout;
    o.tls = tls;
    o.on_request = [this](const v1::FetchKvBlocksRequest& r, std::shared_ptr<KvExportSink> s) {
      exporter(r, std::move(s));
    };
    o.on_unauthenticated = [this] { unauthenticated.fetch_add(1); };
    auto s = KvTransferServer::Start(std::move(o));
    EXPECT_TRUE(s.ok()) << s.status();
    server = *std::move(s);
  }
  ~Fixture() { server->Stop(); }
  std::string address() const { return absl::StrCat("127.0.0.1:", server->port()); }
};

absl::Time Soon() { return absl::Now() + absl::Seconds(30); }

// Cancels `call` while it copies blocks larger than the sockets' buffers (so the exporter is
// still writing), and expects the call to end CANCELLED and the source to see it and end the
// connection.
void CancelMidCopy(Fixture& f, KvTransferCall& call) {
  v1::FetchKvBlocksRequest r = Request(64);
  r.mutable_layout()->set_head_dim(4 << 20);
  r.set_max_bytes(uint64_t{64} << 22);
  std::vector<Engine::KvBlockCopy> blocks;
  auto result =
      std::async(std::launch::async, [&] { return call.Run(f.address(), "", r, Soon(), &blocks); });
  while (f.exporter.requests.load() == 0) absl::SleepFor(absl::Milliseconds(1));
  absl::SleepFor(absl::Milliseconds(20));
  call.Cancel();
  EXPECT_EQ(result.get().code(), absl::StatusCode::kCancelled);
  EXPECT_LT(blocks.size(), 64u);
  // The exporter saw it (its writes fail, or the connection shows the caller gone).
  for (int i = 0; i < 2000 && f.server->active_connections() > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(f.server->active_connections(), 0);
}

TEST(KvTransferTest, TheBlocksArriveWholeAndInOrder) {
  Fixture f;
  for (const uint64_t bytes : {uint64_t{1}, uint64_t{65536}, uint64_t{3} << 20}) {
    v1::FetchKvBlocksRequest r = Request(5);
    r.mutable_layout()->set_head_dim(static_cast<uint32_t>(bytes));
    r.set_max_bytes(5 * bytes);
    KvTransferCall call;
    std::vector<Engine::KvBlockCopy> blocks;
    ASSERT_TRUE(call.Run(f.address(), "", r, Soon(), &blocks).ok());
    ASSERT_EQ(blocks.size(), 5u);
    for (uint64_t i = 0; i < 5; ++i) {
      const Engine::KvBlockCopy want = Block(i, bytes);
      EXPECT_EQ(blocks[i].key.hash, want.key.hash);
      EXPECT_EQ(blocks[i].key.cache_namespace, 77u);
      EXPECT_TRUE(blocks[i].payload == want.payload) << "block " << i << " of " << bytes;
    }
  }
}

TEST(KvTransferTest, MoreThanTheRequestAskedForIsRefusedByTheCaller) {
  Fixture f;
  f.exporter.extra_blocks = 1;
  v1::FetchKvBlocksRequest r = Request(3);
  r.set_max_bytes(3 * 4096);
  KvTransferCall call;
  std::vector<Engine::KvBlockCopy> blocks;
  const absl::Status st = call.Run(f.address(), "", r, Soon(), &blocks);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_EQ(blocks.size(), 3u);  // what it asked for still counts
}

// A connection that trickles its request in is cut off at request_timeout, however often a byte
// comes, and does not reach the handler.
TEST(KvTransferTest, ARequestThatTricklesInIsCutOff) {
  Fixture f(nullptr, absl::Milliseconds(300));
  const int fd = ConnectLoopback(f.server->port());
  ASSERT_GE(fd, 0);
  const absl::Time start = absl::Now();
  bool cut = false;
  for (int i = 0; i < 12 && !cut; ++i) {  // "STKV" and a version, a byte each 100 ms
    cut = send(fd, "STKV\1\0\0\0\0\0\0\0" + i, 1, MSG_NOSIGNAL) != 1;
    absl::SleepFor(absl::Milliseconds(100));
  }
  char c;
  EXPECT_LE(read(fd, &c, 1), 0);  // closed, with no answer
  close(fd);
  // Before the trickle's 1.2 s were over (a limit per read would have let it go on).
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(1150));
  EXPECT_EQ(f.exporter.requests.load(), 0);
}

TEST(KvTransferTest, TheHandlersRefusalReachesTheCallerWithItsMessage) {
  Fixture f;
  v1::FetchKvBlocksRequest r = Request(3);
  r.set_model("other");
  KvTransferCall call;
  std::vector<Engine::KvBlockCopy> blocks;
  const absl::Status st = call.Run(f.address(), "", r, Soon(), &blocks);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("model \"other\""), std::string::npos) << st;
  EXPECT_TRUE(blocks.empty());
}

TEST(KvTransferTest, StrangersAndGarbageAreRefusedAndTheServerKeepsServing) {
  ClusterSecret secret({"s3cret", "old"});
  Fixture f(&secret);
  std::vector<Engine::KvBlockCopy> blocks;
  {
    KvTransferCall call;
    const absl::Status st = call.Run(f.address(), "wrong", Request(2), Soon(), &blocks);
    EXPECT_EQ(st.code(), absl::StatusCode::kUnauthenticated) << st;
    EXPECT_NE(st.message().find("cluster secret"), std::string::npos) << st;
    EXPECT_EQ(f.unauthenticated.load(), 1);
  }
  // Something that is not this protocol (an HTTP/2 preface, as a gRPC client sends).
  for (const std::string& garbage :
       {std::string("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), std::string(12, '\0')}) {
    const int fd = ConnectLoopback(f.server->port());
    ASSERT_GE(fd, 0);
    ASSERT_EQ(write(fd, garbage.data(), garbage.size()), static_cast<ssize_t>(garbage.size()));
    // The end frame: type, code, message length, message.
    std::string reply(512, '\0');
    size_t got = 0;
    auto want = [&] {
      if (got < 9) return size_t{9};
      return 9 + static_cast<size_t>(static_cast<unsigned char>(reply[5]) |
                                     static_cast<unsigned char>(reply[6]) << 8);
    };
    for (ssize_t r; got < want() && (r = read(fd, reply.data() + got, want() - got)) > 0;) {
      got += static_cast<size_t>(r);
    }
    close(fd);
    ASSERT_GT(got, 9u);
    EXPECT_EQ(reply[0], 2);  // an end frame
    EXPECT_EQ(static_cast<int>(reply[1]), static_cast<int>(absl::StatusCode::kInvalidArgument));
    EXPECT_NE(reply.find("not a KV transfer request"), std::string::npos);
  }
  // A connection that says nothing and goes away.
  {
    const int fd = ConnectLoopback(f.server->port());
    ASSERT_GE(fd, 0);
    close(fd);
  }
  // The first and the other secret both work; nothing refused reached the handler.
  for (const char* s : {"s3cret", "old"}) {
    KvTransferCall call;
    blocks.clear();
    ASSERT_TRUE(call.Run(f.address(), s, Request(4), Soon(), &blocks).ok());
    EXPECT_EQ(blocks.size(), 4u);
  }
  EXPECT_EQ(f.exporter.requests.load(), 2);
}

TEST(KvTransferTest, ANothingPortIsUnavailableAndAPastDeadlineTimesOut) {
  const int port = FreePort();
  ASSERT_GT(port, 0);
  KvTransferCall call;
  std::vector<Engine::KvBlockCopy> blocks;
  absl::Status st = call.Run(absl::StrCat("127.0.0.1:", port), "", Request(1), Soon(), &blocks);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_NE(st.message().find("cannot connect"), std::string::npos) << st;
  EXPECT_FALSE(call.connected());
  EXPECT_TRUE(call.refused());
  EXPECT_EQ(call.Run("no-port", "", Request(1), Soon(), &blocks).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_FALSE(call.connected());

  // A source that sends nothing (its exporter holds the copy): the caller gives up at its
  // deadline.
  Fixture f;
  f.exporter.wait_for_cancel = true;
  v1::FetchKvBlocksRequest none = Request(0);
  KvTransferCall waiting;
  const absl::Time start = absl::Now();
  st = waiting.Run(f.address(), "", none, absl::Now() + absl::Milliseconds(300), &blocks);
  EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded) << st;
  EXPECT_LT(absl::Now() - start, absl::Seconds(20));
}

TEST(KvTransferTest, ACallerThatGoesAwayIsSeenAsCancelledAndACallCanBeCancelled) {
  Fixture f;
  f.exporter.wait_for_cancel = true;
  KvTransferCall call;
  CancelMidCopy(f, call);
  // Cancelled before it starts: it does not connect.
  std::vector<Engine::KvBlockCopy> blocks;
  KvTransferCall early;
  early.Cancel();
  EXPECT_EQ(early.Run(f.address(), "", Request(1), Soon(), &blocks).code(),
            absl::StatusCode::kCancelled);
  EXPECT_EQ(f.exporter.requests.load(), 1);
}

TEST(KvTransferTest, StopEndsOpenConnections) {
  auto f = std::make_unique<Fixture>();
  f->exporter.wait_for_cancel = true;
  KvTransferCall call;
  std::vector<Engine::KvBlockCopy> blocks;
  auto result = std::async(std::launch::async,
                           [&] { return call.Run(f->address(), "", Request(2), Soon(), &blocks); });
  while (f->exporter.requests.load() == 0) absl::SleepFor(absl::Milliseconds(1));
  const absl::Time start = absl::Now();
  f->server->Stop();
  const absl::Status st = result.get();
  EXPECT_FALSE(st.ok());
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  f.reset();  // the exporter's thread sees the sink fail and ends
}

// The same port in TLS (workers given --tls_cert): mutual, so that only the cluster's own workers
// copy; the same bytes inside.
class KvTransferTlsTest : public ::testing::Test {
 protected:
  KvTransferTlsTest() : ca_("kv-ca"), stranger_ca_("stranger-ca") {}
  void SetUp() override {
    TestCertificateSpec spec;
    spec.dns_names = {"strata.internal"};
    server_ = Write("server", ca_.Issue(spec), ca_.cert_pem());
    server_.client_auth = TlsClientAuth::kRequire;
    auto server_tls = TlsContextSource::Create(server_, TlsRole::kServer);
    ASSERT_TRUE(server_tls.ok()) << server_tls.status();
    server_tls_ = *std::move(server_tls);
    member_ = Client(Write("member", ca_.Issue(spec), ca_.cert_pem()));
    TlsOptions anonymous;
    anonymous.ca_file = server_.ca_file;
    anonymous_ = Client(anonymous);
    stranger_ = Client(Write("stranger", stranger_ca_.Issue(spec), ca_.cert_pem()));
  }
  TlsOptions Write(const std::string& name, const TestCertificate& c, const std::string& ca) {
    const std::string base = absl::StrCat(::testing::TempDir(), "/kv-tls-", name, "-");
    TlsOptions o;
    o.cert_file = base + "cert.pem";
    o.key_file = base + "key.pem";
    o.ca_file = base + "ca.pem";
    WriteTestFile(o.cert_file, c.cert_pem);
    WriteTestFile(o.key_file, c.key_pem);
    WriteTestFile(o.ca_file, ca);
    return o;
  }
  std::unique_ptr<TlsContextSource> Client(const TlsOptions& o) {
    auto c = TlsContextSource::Create(o, TlsRole::kClient);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *std::move(c) : nullptr;
  }

  TestCa ca_, stranger_ca_;
  TlsOptions server_;
  std::unique_ptr<TlsContextSource> server_tls_, member_, anonymous_, stranger_;
};

TEST_F(KvTransferTlsTest, TheBlocksArriveWholeAndInOrder) {
  Fixture f(nullptr, absl::Seconds(2), server_tls_.get());
  for (const uint64_t bytes : {uint64_t{1}, uint64_t{65536}, uint64_t{3} << 20}) {
    v1::FetchKvBlocksRequest r = Request(5);
    r.mutable_layout()->set_head_dim(static_cast<uint32_t>(bytes));
    r.set_max_bytes(5 * bytes);
    KvTransferCall call;
    call.UseTls(member_.get(), "strata.internal");
    std::vector<Engine::KvBlockCopy> blocks;
    const absl::Status st = call.Run(f.address(), "", r, Soon(), &blocks);
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_EQ(blocks.size(), 5u);
    for (uint64_t i = 0; i < 5; ++i) {
      EXPECT_TRUE(blocks[i].payload == Block(i, bytes).payload) << "block " << i << " of " << bytes;
    }
  }
  // The handler's refusal reaches the caller with its message, in TLS too.
  v1::FetchKvBlocksRequest other = Request(1);
  other.set_model("other");
  KvTransferCall call;
  call.UseTls(member_.get(), "strata.internal");
  std::vector<Engine::KvBlockCopy> blocks;
  const absl::Status st = call.Run(f.address(), "", other, Soon(), &blocks);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
}

TEST_F(KvTransferTlsTest, OnlyTheClustersWorkersGetIn) {
  Fixture f(nullptr, absl::Seconds(2), server_tls_.get());
  std::vector<Engine::KvBlockCopy> blocks;
  // In plaintext, without a certificate, with another CA's, or expecting another name: no
  // request reaches the handler, and the caller may copy another way (UNAVAILABLE).
  KvTransferCall plain, anonymous, stranger, misnamed;
  anonymous.UseTls(anonymous_.get(), "strata.internal");
  stranger.UseTls(stranger_.get(), "strata.internal");
  misnamed.UseTls(member_.get(), "other.internal");
  for (KvTransferCall* call : {&plain, &anonymous, &stranger, &misnamed}) {
    const absl::Status st = call->Run(f.address(), "", Request(2), Soon(), &blocks);
    EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  }
  // Refused in the handshake, or right after it (TLS 1.3: the source checks the caller's
  // certificate once the caller's side is done): "not connected", so the fetcher copies over
  // gRPC instead.
  EXPECT_FALSE(anonymous.connected());
  EXPECT_FALSE(stranger.connected());
  EXPECT_FALSE(misnamed.connected());
  EXPECT_TRUE(blocks.empty());
  EXPECT_EQ(f.exporter.requests.load(), 0);
  // And the server serves on.
  KvTransferCall member;
  member.UseTls(member_.get(), "strata.internal");
  EXPECT_TRUE(member.Run(f.address(), "", Request(2), Soon(), &blocks).ok());
  EXPECT_EQ(blocks.size(), 2u);
}

// A connection that says nothing, or trickles a TLS record in a byte at a time, is cut off at
// request_timeout, before any handshake completes.
TEST_F(KvTransferTlsTest, ASilentOrTricklingHandshakeIsCutOff) {
  Fixture f(nullptr, absl::Milliseconds(300), server_tls_.get());
  for (const bool trickle : {false, true}) {
    const int fd = ConnectLoopback(f.server->port());
    ASSERT_GE(fd, 0);
    const absl::Time start = absl::Now();
    // A record header announcing 16 KiB, then a byte every 50 ms.
    const std::string record("\x16\x03\x01\x40\x00", 5);
    if (trickle) send(fd, record.data(), record.size(), MSG_NOSIGNAL);
    while (f.server->active_connections() == 0 && absl::Now() - start < absl::Seconds(2)) {
      absl::SleepFor(absl::Milliseconds(5));
    }
    while (f.server->active_connections() > 0 && absl::Now() - start < absl::Seconds(10)) {
      if (trickle) send(fd, "x", 1, MSG_NOSIGNAL);
      absl::SleepFor(absl::Milliseconds(50));
    }
    EXPECT_EQ(f.server->active_connections(), 0) << trickle;
    EXPECT_LT(absl::Now() - start, absl::Seconds(3)) << trickle;
    close(fd);
  }
  EXPECT_EQ(f.exporter.requests.load(), 0);
}

TEST_F(KvTransferTlsTest, ACallerThatGoesAwayIsSeenAsCancelled) {
  Fixture f(nullptr, absl::Seconds(2), server_tls_.get());
  f.exporter.wait_for_cancel = true;
  KvTransferCall call;
  call.UseTls(member_.get(), "strata.internal");
  CancelMidCopy(f, call);
}

}  // namespace
}  // namespace strata
