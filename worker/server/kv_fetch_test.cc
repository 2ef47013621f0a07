// Copies of KV blocks between two Worker services over loopback (SubmitRequest.kv_source_address;
// the source's KV transfer port, or FetchKvBlocks without one), serving the bundled strata-tiny
// model: a copied prompt gives the tokens a computed one does and is reported cached; both
// transports refuse strangers alike; a source that fails, hangs or refuses
// leaves the request to compute its prompt; a request waiting for copies can be cancelled.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/grpc_server.h"
#include "common/metrics.h"
#include "common/secrets.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/http_client.h"
#include "worker/comm/collectives.h"
#include "worker/engine/engine.h"
#include "worker/model/config.h"
#include "worker/model/weights.h"
#include "worker/server/kv_fetcher.h"
#include "worker/server/worker_service.h"

namespace strata {
namespace {

constexpr char kModelDir[] = "models/strata-tiny/base";
constexpr char kModel[] = "strata-tiny";

// One worker: its service, server, metrics and a client stub.
struct Node {
  MetricsRegistry metrics;
  std::unique_ptr<WorkerService> service;
  std::unique_ptr<GrpcServer> server;
  std::unique_ptr<v1::Worker::Stub> stub;

  double Counter(const std::string& name, const MetricLabels& labels = {}) {
    return metrics.GetCounter(name, "", labels)->value();
  }
  ~Node() {
    if (server) server->Shutdown(absl::Seconds(1));
    if (service) service->Stop();
  }
};

// A source that never answers a copy until the call is cancelled.
class SilentSource final : public v1::Worker::Service {
 public:
  grpc::Status FetchKvBlocks(grpc::ServerContext* context, const v1::FetchKvBlocksRequest*,
                             grpc::ServerWriter<v1::KvBlockData>*) override {
    calls_.fetch_add(1);
    while (!context->IsCancelled()) absl::SleepFor(absl::Milliseconds(5));
    return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
  }
  int calls() const { return calls_.load(); }
  // Waits (up to 60 s) until more than `seen` calls have reached it; false if none did.
  bool WaitForCallAfter(int seen) const {
    for (int i = 0; i < 12000 && calls() <= seen; ++i) absl::SleepFor(absl::Milliseconds(5));
    return calls() > seen;
  }

 private:
  std::atomic<int> calls_{0};
};

class KvFetchTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto config = LoadModelConfig(kModelDir);
    ASSERT_TRUE(config.ok()) << config.status();
    auto weights = LoadModelWeights(kModelDir, *config, 0, 1);
    ASSERT_TRUE(weights.ok()) << weights.status();
    weights_ = weights->release();
  }

  std::unique_ptr<Node> StartNode(WorkerServiceOptions wo = {}, bool prefix_caching = true,
                                  const EngineConfig* config = nullptr) {
    auto node = std::make_unique<Node>();
    EngineConfig ec = config != nullptr ? *config : EngineConfig();
    ec.model_name = kModel;
    ec.compute_threads = 1;
    ec.enable_prefix_caching = prefix_caching;
    auto engine = Engine::Create(weights_, &comm_, ec);
    EXPECT_TRUE(engine.ok()) << engine.status();
    if (!engine.ok()) return nullptr;
    wo.model_name = kModel;
    wo.metrics = &node->metrics;
    // Workers answer copies on a KV transfer port unless a test says "off".
    if (wo.kv_transfer_listen.empty()) {
      wo.kv_transfer_listen = "127.0.0.1:0";
    } else if (wo.kv_transfer_listen == "off") {
      wo.kv_transfer_listen.clear();
    }
    auto service = WorkerService::Create(*std::move(engine), wo);
    EXPECT_TRUE(service.ok()) << service.status();
    node->service = *std::move(service);
    auto server = GrpcServer::Start(GrpcServerOptions(),
                                    {{node->service.get(), v1::Worker::service_full_name()}});
    EXPECT_TRUE(server.ok()) << server.status();
    node->server = *std::move(server);
    node->stub = v1::Worker::NewStub(
        grpc::CreateChannel(node->server->address(), grpc::InsecureChannelCredentials()));
    return node;
  }

  struct Result {
    grpc::Status status;
    std::vector<int32_t> tokens;
    v1::Usage usage;
  };

  static Result Run(Node& node, const v1::SubmitRequest& req, const ClusterSecret* secret = nullptr,
                    grpc::ClientContext* context = nullptr) {
    grpc::ClientContext own;
    grpc::ClientContext& ctx = context != nullptr ? *context : own;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    if (secret != nullptr) ctx.AddMetadata(kClusterSecretMetadata, secret->Sent());
    auto reader = node.stub->Submit(&ctx, req);
    Result r;
    v1::SubmitResponse chunk;
    while (reader->Read(&chunk)) {
      r.tokens.insert(r.tokens.end(), chunk.token_ids().begin(), chunk.token_ids().end());
      if (chunk.has_usage()) r.usage = chunk.usage();
    }
    r.status = reader->Finish();
    return r;
  }

  static std::vector<int32_t> Prompt(int len) {
    std::vector<int32_t> p;
    for (int i = 0; i < len; ++i) p.push_back((i * 37 + 11) % 2000);
    return p;
  }

  static v1::SubmitRequest Request(const std::string& id, int prompt_len,
                                   const std::string& source = "") {
    v1::SubmitRequest req;
    req.set_request_id(id);
    req.set_model(kModel);
    for (int32_t t : Prompt(prompt_len)) req.add_prompt_token_ids(t);
    req.mutable_sampling()->set_max_tokens(8);
    req.mutable_sampling()->set_temperature(0);
    req.mutable_sampling()->set_ignore_eos(true);
    req.set_tenant("t1");
    req.set_kv_source_address(source);
    return req;
  }

  // A FetchKvBlocks request for Prompt(prompt_len)'s blocks, its fields as a worker of the model
  // sends them, from an engine of its own.
  v1::FetchKvBlocksRequest FetchRequest(int prompt_len) {
    v1::FetchKvBlocksRequest r;
    r.set_model(kModel);
    EngineConfig ec;
    ec.model_name = kModel;
    auto engine = Engine::Create(weights_, &comm_, ec);
    EXPECT_TRUE(engine.ok());
    if (!engine.ok()) return r;
    r.set_model_fingerprint((*engine)->model_fingerprint());
    const KvBlockLayout& l = (*engine)->kv_transfer_layout();
    r.mutable_layout()->set_num_segments(static_cast<uint32_t>(l.num_segments));
    r.mutable_layout()->set_block_tokens(static_cast<uint32_t>(l.block_tokens));
    r.mutable_layout()->set_num_kv_heads(static_cast<uint32_t>(l.num_heads));
    r.mutable_layout()->set_head_dim(static_cast<uint32_t>(l.head_dim));
    r.mutable_layout()->set_dtype("f32");
    for (BlockHash h : (*engine)->LookUpPrompt(Prompt(prompt_len), RequestOptions()).hashes) {
      r.add_block_hashes(h);
    }
    return r;
  }

  static inline const ModelWeights* weights_ = nullptr;
  SingleRankCollectives comm_;
};

// 200 tokens: (200 - 1) / 16 = 12 full blocks before the last token's.
constexpr int kPromptLen = 200;
constexpr uint32_t kCopiedTokens = 192;

TEST_F(KvFetchTest, ASubmitCopiesThePromptFromAnotherWorkerAndGeneratesTheSameTokens) {
  auto source = StartNode();
  auto dest = StartNode();
  const Result computed = Run(*source, Request("a", kPromptLen));
  ASSERT_TRUE(computed.status.ok()) << computed.status.error_message();
  EXPECT_EQ(computed.usage.cached().num_device_tokens(), 0u);

  const Result copied = Run(*dest, Request("b", kPromptLen, source->server->address()));
  ASSERT_TRUE(copied.status.ok()) << copied.status.error_message();
  EXPECT_EQ(copied.tokens, computed.tokens);
  EXPECT_EQ(copied.usage.cached().num_device_tokens(), kCopiedTokens);
  EXPECT_EQ(dest->Counter("strata_worker_kv_blocks_received_total"), 12);
  EXPECT_EQ(dest->Counter("strata_worker_kv_fetches_total", {{"outcome", "copied"}}), 1);
  EXPECT_EQ(source->Counter("strata_worker_kv_blocks_sent_total"), 12);
  // Over the source's KV transfer port, not gRPC.
  EXPECT_GT(dest->Counter("strata_worker_kv_fetch_bytes_total", {{"transport", "tcp"}}), 0);
  EXPECT_EQ(dest->Counter("strata_worker_kv_fetch_bytes_total", {{"transport", "grpc"}}), 0);

  // Held now: a second request copies nothing (the source is not asked).
  const Result again = Run(*dest, Request("c", kPromptLen, source->server->address()));
  EXPECT_EQ(again.tokens, computed.tokens);
  EXPECT_EQ(source->Counter("strata_worker_kv_blocks_sent_total"), 12);

  // A longer prompt: its first 12 blocks are held here; the source is asked for the next two,
  // which it does not hold either, and they are computed.
  const Result longer = Run(*dest, Request("d", kPromptLen + 40, source->server->address()));
  ASSERT_TRUE(longer.status.ok());
  EXPECT_EQ(longer.usage.cached().num_device_tokens(), kCopiedTokens);
  EXPECT_EQ(source->Counter("strata_worker_kv_blocks_sent_total"), 12);
  EXPECT_EQ(dest->Counter("strata_worker_kv_fetches_total", {{"outcome", "none"}}), 1);
  EXPECT_EQ(dest->Counter("strata_worker_kv_fetches_total", {{"outcome", "failed"}}), 0);
}

// A source without a KV transfer port is copied from over FetchKvBlocks, and so is one whose port
// stopped answering (it is asked for the port again on a later copy); the tokens are the same.
TEST_F(KvFetchTest, WithoutATransferPortTheCopyGoesOverGrpc) {
  WorkerServiceOptions grpc_only;
  grpc_only.kv_transfer_listen = "off";
  auto source = StartNode(grpc_only);
  EXPECT_EQ(source->service->kv_transfer_port(), 0);
  auto dest = StartNode();
  EXPECT_NE(dest->service->kv_transfer_port(), 0);
  const Result computed = Run(*source, Request("a", kPromptLen));
  ASSERT_TRUE(computed.status.ok());
  const Result copied = Run(*dest, Request("b", kPromptLen, source->server->address()));
  ASSERT_TRUE(copied.status.ok()) << copied.status.error_message();
  EXPECT_EQ(copied.tokens, computed.tokens);
  EXPECT_EQ(copied.usage.cached().num_device_tokens(), kCopiedTokens);
  EXPECT_EQ(dest->Counter("strata_worker_kv_fetch_bytes_total", {{"transport", "tcp"}}), 0);
  EXPECT_GT(dest->Counter("strata_worker_kv_fetch_bytes_total", {{"transport", "grpc"}}), 0);
}

// A copy goes out in slices between the source's engine steps (here one block a slice), shared in
// turn among the calls, and is stored in slices between the receiver's: two workers copying the
// same prompt at once, while the source and one of them generate, each get it whole, and the
// generations are undisturbed.
TEST_F(KvFetchTest, CopiesGoOutInSlicesBetweenTheSourcesStepsAndArriveWhole) {
  WorkerServiceOptions sliced;
  sliced.kv_copy_slice_bytes = 1;
  // Each block handed to the receiver's loop as it arrives, and stored while the rest come.
  sliced.kv_fetcher.part_bytes = 1;
  auto source = StartNode(sliced);
  const Result computed = Run(*source, Request("a", kPromptLen));
  ASSERT_TRUE(computed.status.ok()) << computed.status.error_message();
  v1::SubmitRequest busy = Request("busy", 40);
  busy.set_prompt_token_ids(0, 1999);  // not a prefix of the copied prompt
  busy.mutable_sampling()->set_max_tokens(96);
  const Result busy_alone = Run(*source, busy);
  ASSERT_TRUE(busy_alone.status.ok());
  busy.set_request_id("busy-again");
  Result busy_result;
  std::thread generating([&] { busy_result = Run(*source, busy); });
  auto dest1 = StartNode(sliced);
  auto dest2 = StartNode(sliced);
  const Result busy_on_dest = Run(*dest1, busy);
  ASSERT_TRUE(busy_on_dest.status.ok());
  busy.set_request_id("busy-on-dest");
  Result busy_dest_result;
  std::thread generating_here([&] { busy_dest_result = Run(*dest1, busy); });
  Result copied1, copied2;
  std::thread first(
      [&] { copied1 = Run(*dest1, Request("b", kPromptLen, source->server->address())); });
  copied2 = Run(*dest2, Request("c", kPromptLen, source->server->address()));
  first.join();
  generating.join();
  generating_here.join();
  ASSERT_TRUE(busy_dest_result.status.ok());
  EXPECT_EQ(busy_dest_result.tokens, busy_alone.tokens);
  EXPECT_EQ(dest1->Counter("strata_worker_kv_blocks_received_total"), 12);
  for (const Result* r : {&copied1, &copied2}) {
    ASSERT_TRUE(r->status.ok()) << r->status.error_message();
    EXPECT_EQ(r->tokens, computed.tokens);
    EXPECT_EQ(r->usage.cached().num_device_tokens(), kCopiedTokens);
  }
  EXPECT_EQ(source->Counter("strata_worker_kv_blocks_sent_total"), 24);
  ASSERT_TRUE(busy_result.status.ok());
  EXPECT_EQ(busy_result.tokens, busy_alone.tokens);
}

// A caller that cancels a copy part way (it stopped reading: a slice of one block and two unsent
// make the source wait for it) ends the export at once; the source keeps serving copies.
TEST_F(KvFetchTest, ACancelledCopyEndsAtTheSourceWhichKeepsServing) {
  WorkerServiceOptions sliced;
  sliced.kv_copy_slice_bytes = 1;
  auto source = StartNode(sliced);
  ASSERT_TRUE(Run(*source, Request("a", kPromptLen)).status.ok());
  const v1::FetchKvBlocksRequest all = FetchRequest(kPromptLen);
  ASSERT_EQ(all.block_hashes_size(), 12);
  for (int round = 0; round < 3; ++round) {
    grpc::ClientContext ctx;
    auto reader = source->stub->FetchKvBlocks(&ctx, all);
    v1::KvBlockData data;
    ASSERT_TRUE(reader->Read(&data));
    ctx.TryCancel();
    while (reader->Read(&data)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // The same over the KV transfer port: each call cancelled after its first block arrived.
  const std::string transfer = absl::StrCat("127.0.0.1:", source->service->kv_transfer_port());
  for (int round = 0; round < 3; ++round) {
    // The wire format by hand (kv_transfer.h): the request, then the first block frame's head.
    const int fd = ConnectLoopback(source->service->kv_transfer_port());
    ASSERT_GE(fd, 0);
    const std::string request = all.SerializeAsString();
    std::string hello = "STKV";
    for (const uint32_t v : {uint32_t{1}, uint32_t{0}, static_cast<uint32_t>(request.size())}) {
      hello.append(reinterpret_cast<const char*>(&v), 4);
    }
    hello += request;
    ASSERT_EQ(write(fd, hello.data(), hello.size()), static_cast<ssize_t>(hello.size()));
    char head[25];
    size_t got = 0;
    for (ssize_t r; got < sizeof head && (r = read(fd, head + got, sizeof head - got)) > 0;) {
      got += static_cast<size_t>(r);
    }
    ASSERT_EQ(got, sizeof head);
    EXPECT_EQ(head[0], 1);  // a block frame
    close(fd);
  }
  // A whole copy afterwards, each way.
  grpc::ClientContext ctx;
  auto reader = source->stub->FetchKvBlocks(&ctx, all);
  v1::KvBlockData data;
  int blocks = 0;
  while (reader->Read(&data)) ++blocks;
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(blocks, 12);
  KvTransferCall call;
  std::vector<Engine::KvBlockCopy> got;
  ASSERT_TRUE(call.Run(transfer, "", all, absl::Now() + absl::Seconds(30), &got).ok());
  EXPECT_EQ(got.size(), 12u);
  // And it still generates.
  EXPECT_TRUE(Run(*source, Request("b", 40)).status.ok());
}

// Blocks the source keeps only on its disk tier are loaded back into its host memory and sent as
// they land: the copy is still whole.
TEST_F(KvFetchTest, BlocksOnTheSourcesDiskTierAreLoadedAndCopied) {
  EngineConfig tiered;
  tiered.num_kv_blocks = 16;   // one 200-token prompt and its output
  const int64_t slot = 69632;  // a block of the bundled model in a host or disk slot
  tiered.tiers.host_bytes = 8 * slot;
  tiered.tiers.disk_bytes = 64 * slot;
  tiered.tiers.disk_path = std::string(std::getenv("TEST_TMPDIR")) + "/kv-source";
  // Deep enough that a slow disk (a loaded machine) takes every block the host tier gives up
  // rather than dropping some (KvStore's spill buffers are twice this).
  tiered.tiers.disk_queue_depth = 16;
  auto source = StartNode({}, true, &tiered);
  auto prompt = [](int seed) {
    v1::SubmitRequest r = Request(absl::StrCat("p", seed), kPromptLen);
    for (int i = 0; i < r.prompt_token_ids_size(); ++i) {
      r.set_prompt_token_ids(i, (i * 53 + seed * 101) % 2000);
    }
    return r;
  };
  const Result computed = Run(*source, prompt(1));
  ASSERT_TRUE(computed.status.ok()) << computed.status.error_message();
  // Two other prompts push the first one's blocks off the device and out of the host tier.
  for (int seed : {2, 3, 2}) {
    v1::SubmitRequest other = prompt(seed);
    other.set_request_id(
        absl::StrCat("other", seed, "-", source->Counter("strata_worker_kv_blocks_sent_total")));
    ASSERT_TRUE(Run(*source, other).status.ok());
  }
  auto dest = StartNode();
  v1::SubmitRequest again = prompt(1);
  again.set_request_id("copy");
  again.set_kv_source_address(source->server->address());
  const Result copied = Run(*dest, again);
  ASSERT_TRUE(copied.status.ok()) << copied.status.error_message();
  EXPECT_EQ(copied.tokens, computed.tokens);
  EXPECT_EQ(copied.usage.cached().num_device_tokens(), kCopiedTokens)
      << "blocks the source's host tier dropped for a slow disk: "
      << source->Counter("strata_worker_kv_dirty_evictions_total", {{"outcome", "lost"}});
  EXPECT_EQ(source->Counter("strata_worker_kv_blocks_sent_total"), 12);
  EXPECT_EQ(dest->Counter("strata_worker_kv_fetches_total", {{"outcome", "copied"}}), 1);
  EXPECT_GT(source->service->num_kv_export_calls(), 0);
}

// A copy takes at most kv_fetch_max_bytes: the leading blocks within it, the rest computed.
TEST_F(KvFetchTest, ACopyStaysWithinItsByteBudget) {
  auto source = StartNode();
  WorkerServiceOptions wo;
  wo.kv_fetch_max_bytes = 5 * int64_t{64} << 10;  // five blocks of the bundled model
  auto dest = StartNode(wo);
  const Result computed = Run(*source, Request("a", kPromptLen));
  ASSERT_TRUE(computed.status.ok()) << computed.status.error_message();
  const Result copied = Run(*dest, Request("b", kPromptLen, source->server->address()));
  ASSERT_TRUE(copied.status.ok()) << copied.status.error_message();
  EXPECT_EQ(copied.tokens, computed.tokens);
  EXPECT_EQ(copied.usage.cached().num_device_tokens(), 5u * 16);
  EXPECT_EQ(source->Counter("strata_worker_kv_blocks_sent_total"), 5);
  EXPECT_EQ(dest->Counter("strata_worker_kv_fetches_total", {{"outcome", "partial"}}), 1);
}

TEST_F(KvFetchTest, ASourceThatCannotBeReachedLeavesThePromptToBeComputed) {
  auto reference = StartNode();
  const Result want = Run(*reference, Request("a", kPromptLen));
  auto dest = StartNode();
  // Nothing listens on port 1.
  const Result r = Run(*dest, Request("b", kPromptLen, "127.0.0.1:1"));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, want.tokens);
  EXPECT_EQ(r.usage.cached().num_device_tokens(), 0u);
  EXPECT_EQ(dest->Counter("strata_worker_kv_fetches_total", {{"outcome", "failed"}}), 1);
  // A source whose weights are other (random weights of another seed, say) refuses the copy.
  WorkerServiceOptions other_weights;
  other_weights.model_fingerprint = "random:bf16:2";
  auto other = StartNode(other_weights);
  ASSERT_TRUE(Run(*other, Request("o", kPromptLen)).status.ok());
  auto fresh = StartNode();
  const Result refused = Run(*fresh, Request("r", kPromptLen, other->server->address()));
  ASSERT_TRUE(refused.status.ok()) << refused.status.error_message();
  EXPECT_EQ(refused.tokens, want.tokens);
  EXPECT_EQ(fresh->Counter("strata_worker_kv_fetches_total", {{"outcome", "failed"}}), 1);
  EXPECT_EQ(other->Counter("strata_worker_kv_blocks_sent_total"), 0);
  // A worker told not to copy queues such a request at once.
  WorkerServiceOptions no_fetch;
  no_fetch.kv_fetch = false;
  auto plain = StartNode(no_fetch);
  const Result p = Run(*plain, Request("c", kPromptLen, reference->server->address()));
  EXPECT_EQ(p.tokens, want.tokens);
  EXPECT_EQ(p.usage.cached().num_device_tokens(), 0u);
  EXPECT_EQ(reference->Counter("strata_worker_kv_blocks_sent_total"), 0);
}

// A source that names a KV transfer port which no longer answers (it restarted on another) is
// copied from over FetchKvBlocks, in the same Fetch; one whose port answers is copied from there.
class PortSource final : public v1::Worker::Service {
 public:
  explicit PortSource(int port) : port_(port) {}
  grpc::Status GetInfo(grpc::ServerContext*, const v1::GetInfoRequest*,
                       v1::WorkerInfo* info) override {
    info_calls_.fetch_add(1);
    info->set_kv_transfer_port(static_cast<uint32_t>(port_));
    return grpc::Status::OK;
  }
  grpc::Status FetchKvBlocks(grpc::ServerContext*, const v1::FetchKvBlocksRequest* r,
                             grpc::ServerWriter<v1::KvBlockData>* writer) override {
    for (const uint64_t h : r->block_hashes()) {
      v1::KvBlockData d;
      d.set_block_hash(h);
      d.set_payload(std::string(64, 'g'));
      writer->Write(d);
    }
    return grpc::Status::OK;
  }
  int info_calls() const { return info_calls_.load(); }

 private:
  const int port_;
  std::atomic<int> info_calls_{0};
};

TEST_F(KvFetchTest, ASourceWhoseTransferPortIsGoneIsCopiedFromOverGrpc) {
  const int port = FreePort();
  ASSERT_GT(port, 0);
  PortSource source(port);
  auto server = GrpcServer::Start(GrpcServerOptions(), {{&source, "port-source"}});
  ASSERT_TRUE(server.ok());
  KvFetcherOptions o;
  o.timeout = absl::Seconds(30);
  KvFetcher fetcher(o);
  v1::FetchKvBlocksRequest req;
  for (int i = 1; i <= 3; ++i) req.add_block_hashes(static_cast<uint64_t>(i));
  for (int round = 0; round < 2; ++round) {
    std::promise<KvFetchResult> done;
    fetcher.Fetch((*server)->address(), req,
                  [&](KvFetchResult r) { done.set_value(std::move(r)); });
    const KvFetchResult r = done.get_future().get();
    ASSERT_TRUE(r.status.ok()) << r.status;
    ASSERT_EQ(r.blocks.size(), 3u);
    EXPECT_EQ(r.blocks[2].key.hash, 3u);
    EXPECT_EQ(r.transfer_calls, 0);
    EXPECT_EQ(r.bytes, 3 * 64);
  }
  // The port was forgotten after the first refusal and asked for again on the next copy.
  EXPECT_EQ(source.info_calls(), 2);

  // In parts: two blocks (128 bytes, past part_bytes) at a time as they come, in order, and the
  // last with the end.
  KvFetcherOptions parted = o;
  parted.part_bytes = 100;
  KvFetcher in_parts(parted);
  for (int i = 4; i <= 5; ++i) req.add_block_hashes(static_cast<uint64_t>(i));
  std::vector<std::vector<uint64_t>> parts;
  std::promise<KvFetchResult> done;
  in_parts.Fetch((*server)->address(), req, [&](KvFetchResult r) { done.set_value(std::move(r)); },
                 [&](std::vector<Engine::KvBlockCopy> blocks) {
                   parts.emplace_back();
                   for (const auto& b : blocks) parts.back().push_back(b.key.hash);
                 });
  const KvFetchResult r = done.get_future().get();
  ASSERT_TRUE(r.status.ok()) << r.status;
  EXPECT_EQ(parts, (std::vector<std::vector<uint64_t>>{{1, 2}, {3, 4}}));
  ASSERT_EQ(r.blocks.size(), 1u);
  EXPECT_EQ(r.blocks[0].key.hash, 5u);
  EXPECT_EQ(r.bytes, 5 * 64);
}

// The timeout counts from Fetch: a copy that waited its whole time in the queue behind a hung
// source's (to within a tenth of it: the second Fetch came a moment after the first, whose call
// ran to its own deadline) ends at once, without calling it.
TEST_F(KvFetchTest, AFetchQueuedPastItsDeadlineEndsWithoutACall) {
  SilentSource silent;
  auto server = GrpcServer::Start(GrpcServerOptions(), {{&silent, "silent"}});
  ASSERT_TRUE(server.ok());
  KvFetcherOptions o;
  o.threads = 1;
  o.timeout = absl::Milliseconds(300);
  KvFetcher fetcher(o);
  v1::FetchKvBlocksRequest req;
  req.add_block_hashes(1);
  std::promise<KvFetchResult> first, second;
  const int seen = silent.calls();
  fetcher.Fetch((*server)->address(), req, [&](KvFetchResult r) { first.set_value(std::move(r)); });
  fetcher.Fetch((*server)->address(), req,
                [&](KvFetchResult r) { second.set_value(std::move(r)); });
  const KvFetchResult a = first.get_future().get();
  const KvFetchResult b = second.get_future().get();
  EXPECT_EQ(a.status.code(), absl::StatusCode::kDeadlineExceeded) << a.status;
  EXPECT_EQ(b.status.code(), absl::StatusCode::kDeadlineExceeded) << b.status;
  EXPECT_NE(b.status.message().find("still queued"), std::string::npos) << b.status;
  EXPECT_EQ(b.calls, 0);
  EXPECT_GE(b.took, absl::Milliseconds(270));
  EXPECT_EQ(silent.calls(), seen + 1);
  fetcher.Stop();
  (*server)->Shutdown(absl::Seconds(1));
}

TEST_F(KvFetchTest, ASourceThatHangsIsGivenUpAtTheTimeoutAndACopyCanBeCancelled) {
  SilentSource silent;
  auto server = GrpcServer::Start(GrpcServerOptions(), {{&silent, "silent"}});
  ASSERT_TRUE(server.ok());
  WorkerServiceOptions wo;
  wo.kv_fetcher.timeout = absl::Milliseconds(300);
  auto dest = StartNode(wo);
  const absl::Time start = absl::Now();
  const Result r = Run(*dest, Request("a", kPromptLen, (*server)->address()));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(300));
  EXPECT_EQ(r.usage.cached().num_device_tokens(), 0u);
  EXPECT_EQ(dest->Counter("strata_worker_kv_fetches_total", {{"outcome", "failed"}}), 1);

  // With a long timeout: the client goes away while its request waits for the copy, and its
  // place is given back at once; so is a request cancelled by id.
  WorkerServiceOptions patient;
  patient.kv_fetcher.timeout = absl::Seconds(60);
  patient.max_live_sequences = 1;
  auto waiting = StartNode(patient);
  {
    grpc::ClientContext ctx;
    const int seen = silent.calls();
    std::thread cancel([&] {
      EXPECT_TRUE(silent.WaitForCallAfter(seen));
      ctx.TryCancel();
    });
    const Result c = Run(*waiting, Request("b", kPromptLen, (*server)->address()), nullptr, &ctx);
    cancel.join();
    EXPECT_EQ(c.status.error_code(), grpc::StatusCode::CANCELLED);
  }
  for (int i = 0; i < 200 && waiting->service->num_live_sequences() > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(waiting->service->num_live_sequences(), 0);
  {
    const int seen = silent.calls();
    std::thread cancel([&] {
      EXPECT_TRUE(silent.WaitForCallAfter(seen));
      // (Until it is found: a late call from an earlier step may have been the one counted.)
      bool cancelled = false;
      for (int i = 0; i < 1000 && !cancelled; ++i) {
        grpc::ClientContext ctx;
        v1::CancelRequest req;
        req.set_request_id("c");
        v1::CancelResponse resp;
        ASSERT_TRUE(waiting->stub->Cancel(&ctx, req, &resp).ok());
        cancelled = resp.cancelled();
        if (!cancelled) absl::SleepFor(absl::Milliseconds(10));
      }
      EXPECT_TRUE(cancelled);
    });
    const Result c = Run(*waiting, Request("c", kPromptLen, (*server)->address()));
    cancel.join();
    EXPECT_EQ(c.status.error_code(), grpc::StatusCode::CANCELLED);
  }
  // The place is free again: a request without a source runs.
  for (int i = 0; i < 200 && waiting->service->num_live_sequences() > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_TRUE(Run(*waiting, Request("d", 20)).status.ok());
  // Shutting down with a copy in flight finishes the request UNAVAILABLE (a coordinator fails it
  // over) without waiting for the copy.
  const int seen = silent.calls();
  std::thread stop([&] {
    EXPECT_TRUE(silent.WaitForCallAfter(seen));
    waiting->service->Stop();
  });
  const Result s = Run(*waiting, Request("e", kPromptLen, (*server)->address()));
  stop.join();
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  (*server)->Shutdown(absl::Seconds(1));
}

TEST_F(KvFetchTest, FetchKvBlocksRefusesStrangersAndBlocksThatWouldNotFit) {
  ClusterSecret secret({"s3cret"});
  WorkerServiceOptions wo;
  wo.cluster_secret = &secret;
  wo.kv_fetcher.cluster_secret = &secret;
  auto source = StartNode(wo);
  auto dest = StartNode(wo);
  ASSERT_TRUE(Run(*source, Request("a", kPromptLen), &secret).status.ok());
  // Workers with the secret copy from each other.
  const Result copied = Run(*dest, Request("b", kPromptLen, source->server->address()), &secret);
  ASSERT_TRUE(copied.status.ok()) << copied.status.error_message();
  EXPECT_EQ(copied.usage.cached().num_device_tokens(), kCopiedTokens);

  // What a worker of this model asks, field by field.
  const v1::FetchKvBlocksRequest good = FetchRequest(kPromptLen);
  auto fetch = [&](const v1::FetchKvBlocksRequest& req, bool with_secret, int* blocks) {
    grpc::ClientContext ctx;
    if (with_secret) ctx.AddMetadata(kClusterSecretMetadata, "s3cret");
    auto reader = source->stub->FetchKvBlocks(&ctx, req);
    v1::KvBlockData data;
    *blocks = 0;
    while (reader->Read(&data)) ++*blocks;
    return reader->Finish();
  };
  int blocks = 0;
  grpc::Status st = fetch(good, true, &blocks);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(blocks, 12);
  // max_bytes bounds a call (one block at least).
  v1::FetchKvBlocksRequest small = good;
  small.set_max_bytes(1);
  ASSERT_TRUE(fetch(small, true, &blocks).ok());
  EXPECT_EQ(blocks, 1);

  EXPECT_EQ(fetch(good, false, &blocks).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  v1::FetchKvBlocksRequest bad = good;
  bad.set_model("other");
  st = fetch(bad, true, &blocks);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(st.error_message().find("model"), std::string::npos) << st.error_message();
  bad = good;
  bad.set_model_fingerprint("0123");
  st = fetch(bad, true, &blocks);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(st.error_message().find("model_fingerprint"), std::string::npos);
  bad = good;
  bad.mutable_layout()->set_dtype("bf16");
  st = fetch(bad, true, &blocks);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(st.error_message().find("layout"), std::string::npos);
  bad = good;
  for (int i = 0; i < 4097; ++i) bad.add_block_hashes(i);
  st = fetch(bad, true, &blocks);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("block_hashes"), std::string::npos);
  // Still serving.
  ASSERT_TRUE(fetch(good, true, &blocks).ok());
  EXPECT_EQ(blocks, 12);

  // The same answers on the KV transfer port.
  const std::string transfer = absl::StrCat("127.0.0.1:", source->service->kv_transfer_port());
  auto fetch_tcp = [&](const v1::FetchKvBlocksRequest& req, const std::string& with_secret,
                       int* blocks) {
    KvTransferCall call;
    std::vector<Engine::KvBlockCopy> got;
    const absl::Status st =
        call.Run(transfer, with_secret, req, absl::Now() + absl::Seconds(30), &got);
    *blocks = static_cast<int>(got.size());
    return st;
  };
  absl::Status tst = fetch_tcp(good, "s3cret", &blocks);
  ASSERT_TRUE(tst.ok()) << tst;
  EXPECT_EQ(blocks, 12);
  ASSERT_TRUE(fetch_tcp(small, "s3cret", &blocks).ok());
  EXPECT_EQ(blocks, 1);
  EXPECT_EQ(fetch_tcp(good, "", &blocks).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(blocks, 0);
  bad = good;
  bad.set_model("other");
  tst = fetch_tcp(bad, "s3cret", &blocks);
  EXPECT_EQ(tst.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(tst.message().find("model"), std::string::npos) << tst;
  bad = good;
  for (int i = 0; i < 4097; ++i) bad.add_block_hashes(i);
  tst = fetch_tcp(bad, "s3cret", &blocks);
  EXPECT_EQ(tst.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(tst.message().find("block_hashes"), std::string::npos) << tst;
  ASSERT_TRUE(fetch_tcp(good, "s3cret", &blocks).ok());
  EXPECT_EQ(blocks, 12);
  EXPECT_GT(dest->Counter("strata_worker_kv_fetch_bytes_total", {{"transport", "tcp"}}), 0);

  // A worker without a prefix cache has nothing to copy.
  auto uncached = StartNode({}, /*prefix_caching=*/false);
  grpc::ClientContext ctx;
  auto reader = uncached->stub->FetchKvBlocks(&ctx, good);
  v1::KvBlockData data;
  while (reader->Read(&data)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

}  // namespace
}  // namespace strata
