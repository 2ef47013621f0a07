#include "common/tls_stream.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <memory>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/tcp.h"
#include "common/tls_test_certs.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

using ::testing::HasSubstr;

// A server of one connection at a time: accepts, bridges, and hands the bridge to the test.
class TlsStreamTest : public ::testing::Test {
 protected:
  TlsStreamTest() : ca_("stream-ca") {}

  void SetUp() override {
    auto listen = ListenTcp("127.0.0.1:0", "--test", 16);
    ASSERT_TRUE(listen.ok()) << listen.status();
    listen_ = std::move(*listen);
    options_.cert_file = Path("cert.pem");
    options_.key_file = Path("key.pem");
    WriteCert(ca_);
  }
  std::string Path(const std::string& name) {
    return absl::StrCat(::testing::TempDir(), "/",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name(), "-", name);
  }
  void WriteCert(TestCa& ca) {
    TestCertificateSpec spec;
    spec.dns_names = {"strata.internal"};
    const TestCertificate c = ca.Issue(spec);
    WriteTestFile(options_.key_file, c.key_pem);
    WriteTestFile(options_.cert_file, c.cert_pem);
  }
  // The next connection, accepted and handed to `acceptor`.
  absl::StatusOr<std::unique_ptr<TlsBridge>> AcceptOne(TlsAcceptor& acceptor,
                                                       absl::Duration timeout = absl::Seconds(5)) {
    const absl::Time deadline = absl::Now() + timeout;
    if (!WaitFor(listen_.fd.get(), POLLIN, -1, deadline)) {
      return absl::DeadlineExceededError("no connection");
    }
    UniqueFd conn(::accept4(listen_.fd.get(), nullptr, nullptr, SOCK_CLOEXEC));
    return acceptor.Accept(std::move(conn), -1, deadline);
  }
  // A client connected through `acceptor` (its handshake made on another thread), and the
  // server's bridge; either null when that failed.
  std::pair<std::unique_ptr<TestTlsClient>, std::unique_ptr<TlsBridge>> Connect(
      TlsAcceptor& acceptor) {
    std::unique_ptr<TestTlsClient> client;
    std::thread connect([&] {
      auto c = TestTlsClient::Connect(listen_.port, ca_.cert_pem(), "strata.internal");
      EXPECT_TRUE(c.ok()) << c.status();
      if (c.ok()) client = std::move(*c);
    });
    auto bridge = AcceptOne(acceptor);
    connect.join();
    EXPECT_TRUE(bridge.ok()) << bridge.status();
    return {std::move(client), bridge.ok() ? *std::move(bridge) : nullptr};
  }
  // The bridge's end, read until its end (or 10 s).
  static std::string ReadToEnd(int fd) {
    std::string out;
    while (RecvSome(fd, &out, -1, absl::Now() + absl::Seconds(10))) {
    }
    return out;
  }

  TestCa ca_;
  TlsOptions options_;
  ListenSocket listen_;
};

TEST_F(TlsStreamTest, BytesPassBothWaysAndClosesPassThrough) {
  auto acceptor = TlsAcceptor::Create(options_);
  ASSERT_TRUE(acceptor.ok()) << acceptor.status();
  // 4 MiB each way, more than any buffer on the path holds: the pump must wait on both sides.
  std::string up(4 << 20, '\0'), down(4 << 20, '\0');
  for (size_t i = 0; i < up.size(); ++i) {
    up[i] = static_cast<char>(i * 7);
    down[i] = static_cast<char>(i * 13 + 1);
  }
  std::string client_got;
  std::thread client([&] {
    auto c = TestTlsClient::Connect(listen_.port, ca_.cert_pem(), "strata.internal");
    ASSERT_TRUE(c.ok()) << c.status();
    // One thread (an SSL may not be read and written at once): all of `up` first, which the
    // pump takes in while its own writes to this client wait, then what came back.
    EXPECT_TRUE((*c)->Write(up));
    (*c)->CloseNotify();  // the end of the request stream
    client_got = (*c)->ReadToEnd();
  });
  auto bridge = AcceptOne(**acceptor);
  ASSERT_TRUE(bridge.ok()) << bridge.status();
  EXPECT_THAT((*bridge)->protocol(), HasSubstr("TLSv1."));
  std::thread server_writer([&] {
    EXPECT_TRUE(WriteAll((*bridge)->fd(), down, -1, absl::Now() + absl::Seconds(20)));
    ::shutdown((*bridge)->fd(), SHUT_WR);  // the server's end: close_notify to the client
  });
  const std::string server_got = ReadToEnd((*bridge)->fd());
  server_writer.join();
  client.join();
  EXPECT_TRUE(server_got == up) << server_got.size();
  EXPECT_TRUE(client_got == down) << client_got.size();
}

TEST_F(TlsStreamTest, AClientThatVanishesEndsTheServersInput) {
  auto acceptor = TlsAcceptor::Create(options_);
  ASSERT_TRUE(acceptor.ok()) << acceptor.status();
  auto [client, bridge] = Connect(**acceptor);
  ASSERT_NE(client, nullptr);
  ASSERT_NE(bridge, nullptr);
  ASSERT_TRUE(client->Write("GET / HTTP/1.1\r\n\r\n"));
  std::string got;
  ASSERT_TRUE(RecvSome(bridge->fd(), &got, -1, absl::Now() + absl::Seconds(5)));
  EXPECT_EQ(got, "GET / HTTP/1.1\r\n\r\n");
  // Gone without close_notify: the server's end reports the peer gone, as a plain socket would
  // (the gateway's disconnect watch polls for POLLRDHUP and cancels the generation).
  client->Abort();
  pollfd p = {bridge->fd(), POLLRDHUP, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  EXPECT_NE(p.revents & (POLLRDHUP | POLLHUP), 0);
  // What the server still writes goes nowhere, and fails, without a SIGPIPE (which would end
  // this process).
  EXPECT_FALSE(
      WriteAll(bridge->fd(), std::string(4 << 20, 'x'), -1, absl::Now() + absl::Seconds(10)));
}

// The client gone right after its handshake, before the server's first write (TLS 1.3 sends its
// session tickets then): the pump's writes fail without a SIGPIPE.
TEST_F(TlsStreamTest, AClientGoneAfterItsHandshakeDoesNotKillTheServer) {
  auto acceptor = TlsAcceptor::Create(options_);
  ASSERT_TRUE(acceptor.ok()) << acceptor.status();
  for (int i = 0; i < 20; ++i) {
    std::thread client([&] {
      auto c = TestTlsClient::Connect(listen_.port, ca_.cert_pem(), "strata.internal");
      ASSERT_TRUE(c.ok()) << c.status();
      (*c)->Abort();
    });
    auto bridge = AcceptOne(**acceptor);
    client.join();
    if (!bridge.ok()) continue;  // gone within the handshake
    EXPECT_FALSE(
        WriteAll((*bridge)->fd(), std::string(1 << 20, 'x'), -1, absl::Now() + absl::Seconds(10)));
  }
}

TEST_F(TlsStreamTest, ClientsThatDoNotSpeakTlsAreRefused) {
  auto acceptor = TlsAcceptor::Create(options_);
  ASSERT_TRUE(acceptor.ok()) << acceptor.status();
  // Plain HTTP.
  std::thread plain([&] {
    UniqueFd fd = ConnectTcp(absl::StrCat("127.0.0.1:", listen_.port));
    ASSERT_TRUE(fd.valid());
    WriteAll(fd.get(), "GET /health HTTP/1.1\r\nHost: x\r\n\r\n", -1,
             absl::Now() + absl::Seconds(5));
    std::string reply;
    while (RecvSome(fd.get(), &reply, -1, absl::Now() + absl::Seconds(5))) {
    }
    EXPECT_EQ(reply.find("HTTP/1.1"), std::string::npos) << reply;
  });
  auto bridge = AcceptOne(**acceptor);
  plain.join();
  ASSERT_FALSE(bridge.ok());
  EXPECT_EQ(bridge.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(bridge.status().message()), HasSubstr("TLS handshake failed"));
  // A client that connects and says nothing: refused at the deadline.
  UniqueFd silent = ConnectTcp(absl::StrCat("127.0.0.1:", listen_.port));
  const absl::Time start = absl::Now();
  bridge = AcceptOne(**acceptor, absl::Milliseconds(300));
  EXPECT_FALSE(bridge.ok());
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  // And one that does not trust the certificate.
  TestCa other("other-ca");
  std::thread distrust([&] {
    auto c = TestTlsClient::Connect(listen_.port, other.cert_pem(), "strata.internal");
    EXPECT_FALSE(c.ok());
  });
  bridge = AcceptOne(**acceptor);
  distrust.join();
  EXPECT_FALSE(bridge.ok());
}

TEST_F(TlsStreamTest, ARenewedCertificateIsServedWithoutARestart) {
  options_.reload_interval = absl::Seconds(1);
  auto acceptor = TlsAcceptor::Create(options_);
  ASSERT_TRUE(acceptor.ok()) << acceptor.status();
  TestCa next("next-ca");
  WriteCert(next);
  absl::SleepFor(absl::Milliseconds(1100));
  std::thread client([&] {
    auto c = TestTlsClient::Connect(listen_.port, next.cert_pem(), "strata.internal");
    EXPECT_TRUE(c.ok()) << c.status();
  });
  auto bridge = AcceptOne(**acceptor);
  client.join();
  EXPECT_TRUE(bridge.ok()) << bridge.status();
  // A half-written pair (the new key beside a certificate it does not match) is not taken: the
  // certificate before serves on.
  TestCa third("third-ca");
  TestCertificateSpec spec;
  spec.dns_names = {"strata.internal"};
  WriteTestFile(options_.key_file, third.Issue(spec).key_pem);
  absl::SleepFor(absl::Milliseconds(1100));
  std::thread again([&] {
    auto c = TestTlsClient::Connect(listen_.port, next.cert_pem(), "strata.internal");
    EXPECT_TRUE(c.ok()) << c.status();
  });
  bridge = AcceptOne(**acceptor);
  again.join();
  EXPECT_TRUE(bridge.ok()) << bridge.status();
}

// A client that neither reads nor closes (an idle pooled connection, or one that stopped reading
// mid-response): the server closing its end is not held up beyond the grace period.
TEST_F(TlsStreamTest, AClientThatStopsReadingDoesNotHoldTheServer) {
  auto acceptor = TlsAcceptor::Create(options_);
  ASSERT_TRUE(acceptor.ok()) << acceptor.status();
  for (const size_t reply_bytes : {size_t{0}, size_t{64} << 20}) {
    auto [client, bridge] = Connect(**acceptor);
    ASSERT_NE(bridge, nullptr);
    if (reply_bytes > 0) {
      // More than the buffers on the way hold: the write times out, as the gateway's would.
      EXPECT_FALSE(WriteAll(bridge->fd(), std::string(reply_bytes, 'x'), -1,
                            absl::Now() + absl::Milliseconds(500)));
    }
    const absl::Time start = absl::Now();
    bridge.reset();
    // An idle connection ends at once (the gateway sheds idle connections to make room, and
    // waits 100 ms for one to go); one with bytes still undelivered within the grace period.
    EXPECT_LT(absl::Now() - start, reply_bytes == 0 ? absl::Milliseconds(500) : absl::Seconds(4))
        << reply_bytes;
  }
}

// Both ends bridged: TlsConnect's client against TlsAcceptor's server, the name checked.
TEST_F(TlsStreamTest, AClientBridgeTalksToAServerBridge) {
  auto acceptor = TlsAcceptor::Create(options_);
  ASSERT_TRUE(acceptor.ok()) << acceptor.status();
  TlsOptions client_options;
  client_options.ca_file = Path("client-ca.pem");
  WriteTestFile(client_options.ca_file, ca_.cert_pem());
  auto client = TlsContextSource::Create(client_options, TlsRole::kClient);
  ASSERT_TRUE(client.ok()) << client.status();
  for (const char* name : {"strata.internal", "other.internal"}) {
    absl::StatusOr<std::unique_ptr<TlsBridge>> mine;
    std::thread connect([&] {
      mine = TlsConnect(**client, ConnectTcp(absl::StrCat("127.0.0.1:", listen_.port)), name,
                        absl::Now() + absl::Seconds(5));
    });
    auto theirs = AcceptOne(**acceptor);
    connect.join();
    if (std::string(name) == "other.internal") {
      EXPECT_FALSE(mine.ok());  // the certificate does not carry it
      EXPECT_FALSE(theirs.ok());
      continue;
    }
    ASSERT_TRUE(mine.ok()) << mine.status();
    ASSERT_TRUE(theirs.ok()) << theirs.status();
    ASSERT_TRUE(WriteAll((*mine)->fd(), "ping", -1, absl::Now() + absl::Seconds(5)));
    ::shutdown((*mine)->fd(), SHUT_WR);
    EXPECT_EQ(ReadToEnd((*theirs)->fd()), "ping");
    ASSERT_TRUE(WriteAll((*theirs)->fd(), "pong", -1, absl::Now() + absl::Seconds(5)));
    ::shutdown((*theirs)->fd(), SHUT_WR);
    EXPECT_EQ(ReadToEnd((*mine)->fd()), "pong");
  }
}

TEST_F(TlsStreamTest, CreateNamesTheFlag) {
  TlsOptions none;
  EXPECT_EQ(TlsAcceptor::Create(none).status().code(), absl::StatusCode::kInvalidArgument);
  TlsOptions wrong_key = options_;
  wrong_key.key_file = Path("missing.pem");
  auto a = TlsAcceptor::Create(wrong_key);
  ASSERT_FALSE(a.ok());
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("--tls_key"));
}

}  // namespace
}  // namespace strata
