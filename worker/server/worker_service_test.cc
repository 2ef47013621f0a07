// The Worker service over a real gRPC socket on loopback, serving the bundled strata-tiny model.
#include "worker/server/worker_service.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "common/grpc_server.h"
#include "common/hash.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "worker/comm/collectives.h"
#include "worker/engine/engine.h"
#include "worker/model/config.h"
#include "worker/model/model_runner.h"
#include "worker/model/weights.h"

namespace strata {
namespace {

constexpr char kModelDir[] = "models/strata-tiny/base";
constexpr char kModel[] = "strata-tiny";

class WorkerServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto config = LoadModelConfig(kModelDir);
    ASSERT_TRUE(config.ok()) << config.status();
    auto weights = LoadModelWeights(kModelDir, *config, 0, 1);
    ASSERT_TRUE(weights.ok()) << weights.status();
    weights_ = weights->release();
  }

  void Start(int64_t max_live = 256, int64_t num_kv_blocks = 0) {
    EngineConfig ec;
    ec.model_name = kModel;
    ec.num_kv_blocks = num_kv_blocks;
    auto engine = Engine::Create(weights_, &comm_, ec);
    ASSERT_TRUE(engine.ok()) << engine.status();
    WorkerServiceOptions wo;
    wo.model_name = kModel;
    wo.worker_id = "w0";
    wo.max_live_sequences = max_live;
    auto service = WorkerService::Create(*std::move(engine), wo);
    ASSERT_TRUE(service.ok()) << service.status();
    service_ = *std::move(service);
    auto server =
        GrpcServer::Start(GrpcServerOptions(), {{service_.get(), v1::Worker::service_full_name()}});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
    stub_ = v1::Worker::NewStub(channel_);
  }

  void TearDown() override {
    if (server_) server_->Shutdown(absl::Seconds(1));
    if (service_) service_->Stop();
    server_.reset();
    service_.reset();
  }

  // The output an engine produces for `prompt` when run alone, in-process.
  std::vector<int32_t> Reference(const std::vector<int32_t>& prompt, const v1::SamplingParams& p) {
    EngineConfig ec;
    ec.model_name = kModel;
    auto engine = Engine::Create(weights_, &comm_, ec);
    EXPECT_TRUE(engine.ok());
    RequestOptions o;
    o.max_tokens = p.max_tokens();
    o.sampling.temperature = p.has_temperature() ? p.temperature() : 1.0f;
    o.sampling.seed = p.seed();
    o.ignore_eos = p.ignore_eos();
    EXPECT_TRUE((*engine)->AddRequest("ref", prompt, o).ok());
    std::vector<int32_t> out;
    while ((*engine)->HasWork()) {
      auto step = (*engine)->Step();
      EXPECT_TRUE(step.ok());
      for (const auto& r : *step) {
        for (const auto& t : r.tokens) out.push_back(t.token);
      }
    }
    return out;
  }

  struct Result {
    grpc::Status status;
    std::vector<v1::SubmitResponse> chunks;
    std::vector<int32_t> tokens;
  };

  Result Run(const v1::SubmitRequest& req) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = stub_->Submit(&ctx, req);
    Result r;
    v1::SubmitResponse chunk;
    while (reader->Read(&chunk)) {
      r.tokens.insert(r.tokens.end(), chunk.token_ids().begin(), chunk.token_ids().end());
      r.chunks.push_back(chunk);
    }
    r.status = reader->Finish();
    return r;
  }

  static v1::SubmitRequest Request(const std::string& id, std::vector<int32_t> prompt,
                                   int max_tokens, uint64_t seed) {
    v1::SubmitRequest req;
    req.set_request_id(id);
    req.set_model(kModel);
    req.mutable_prompt_token_ids()->Add(prompt.begin(), prompt.end());
    req.mutable_sampling()->set_max_tokens(max_tokens);
    req.mutable_sampling()->set_seed(seed);
    req.mutable_sampling()->set_ignore_eos(true);
    return req;
  }

  static std::vector<int32_t> Prompt(int n, int salt) {
    std::vector<int32_t> p;
    for (int i = 0; i < n; ++i) p.push_back((i * 37 + salt * 101 + 5) % 2000);
    return p;
  }

  static inline const ModelWeights* weights_ = nullptr;
  SingleRankCollectives comm_;
  std::unique_ptr<WorkerService> service_;
  std::unique_ptr<GrpcServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Worker::Stub> stub_;
};

TEST_F(WorkerServiceTest, StreamsTheEngineOutputWithUsage) {
  Start();
  const std::vector<int32_t> prompt = Prompt(40, 1);
  v1::SubmitRequest req = Request("a", prompt, 24, 1234);
  Result r = Run(req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, Reference(prompt, req.sampling()));
  EXPECT_EQ(r.chunks.front().first_token_index(), 0u);
  const v1::SubmitResponse& last = r.chunks.back();
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(last.usage().num_prompt_tokens(), 40u);
  EXPECT_EQ(last.usage().num_completion_tokens(), 24u);
  // A second request with the same prompt reuses its two full blocks.
  Result again = Run(Request("b", prompt, 4, 1));
  ASSERT_TRUE(again.status.ok());
  EXPECT_EQ(again.chunks.back().usage().cached().num_device_tokens(), 32u);
}

TEST_F(WorkerServiceTest, ResumedSequenceContinuesExactly) {
  Start();
  const std::vector<int32_t> prompt = Prompt(30, 2);
  v1::SubmitRequest req = Request("full", prompt, 20, 77);
  const std::vector<int32_t> full = Reference(prompt, req.sampling());
  ASSERT_EQ(full.size(), 20u);
  v1::SubmitRequest resumed = req;
  resumed.set_request_id("resumed");
  resumed.mutable_resume_token_ids()->Add(full.begin(), full.begin() + 7);
  Result r = Run(resumed);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.chunks.front().first_token_index(), 7u);
  EXPECT_EQ(r.tokens, std::vector<int32_t>(full.begin() + 7, full.end()));
  EXPECT_EQ(r.chunks.back().usage().num_completion_tokens(), 20u);
}

TEST_F(WorkerServiceTest, BadRequestsGetTheRightCodeAndTheServerKeepsServing) {
  Start();
  v1::SubmitRequest unknown = Request("x", Prompt(4, 3), 4, 0);
  unknown.set_model("nope");
  EXPECT_EQ(Run(unknown).status.error_code(), grpc::StatusCode::NOT_FOUND);
  Result too_long = Run(Request("y", Prompt(2048, 3), 4, 0));
  EXPECT_EQ(too_long.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(too_long.status.error_message().find("prompt_token_ids"), std::string::npos);
  v1::SubmitRequest bad_temp = Request("z", Prompt(4, 3), 4, 0);
  bad_temp.mutable_sampling()->set_temperature(-1);
  Result bt = Run(bad_temp);
  EXPECT_EQ(bt.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(bt.status.error_message().find("sampling.temperature"), std::string::npos);
  EXPECT_TRUE(Run(Request("ok", Prompt(4, 3), 4, 0)).status.ok());
}

TEST_F(WorkerServiceTest, ClientCancelFreesTheSequence) {
  Start();
  grpc::ClientContext ctx;
  auto reader = stub_->Submit(&ctx, Request("long", Prompt(20, 4), 1500, 5));
  v1::SubmitResponse chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  EXPECT_EQ(service_->num_live_sequences(), 1);
  ctx.TryCancel();
  while (reader->Read(&chunk)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  while (service_->num_live_sequences() != 0 && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(service_->num_live_sequences(), 0);
}

TEST_F(WorkerServiceTest, CancelRpcEndsTheStreamWithCancelled) {
  Start();
  grpc::ClientContext ctx;
  auto reader = stub_->Submit(&ctx, Request("victim", Prompt(20, 5), 1500, 5));
  v1::SubmitResponse chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  {
    grpc::ClientContext c;
    v1::CancelRequest req;
    req.set_request_id("victim");
    v1::CancelResponse resp;
    ASSERT_TRUE(stub_->Cancel(&c, req, &resp).ok());
    EXPECT_TRUE(resp.cancelled());
  }
  while (reader->Read(&chunk)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  grpc::ClientContext c;
  v1::CancelRequest req;
  req.set_request_id("victim");
  v1::CancelResponse resp;
  ASSERT_TRUE(stub_->Cancel(&c, req, &resp).ok());
  EXPECT_FALSE(resp.cancelled());
}

TEST_F(WorkerServiceTest, FullQueueAnswersResourceExhausted) {
  Start(/*max_live=*/1);
  grpc::ClientContext ctx;
  auto reader = stub_->Submit(&ctx, Request("busy", Prompt(20, 6), 1500, 5));
  v1::SubmitResponse chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  Result second = Run(Request("second", Prompt(4, 6), 4, 0));
  EXPECT_EQ(second.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  ctx.TryCancel();
  while (reader->Read(&chunk)) {
  }
  reader->Finish();
}

// A tenant's backlog fills the queue; another tenant still gets its part of it (max_live over
// the tenants with live sequences), and never more than twice max_live are live.
TEST_F(WorkerServiceTest, AFullQueueStillTakesATenantUnderItsPart) {
  Start(/*max_live=*/2);
  struct Open {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReader<v1::SubmitResponse>> reader;
  };
  std::vector<std::unique_ptr<Open>> open;
  auto submit = [&](const std::string& id, const std::string& tenant) {
    v1::SubmitRequest req = Request(id, Prompt(20, static_cast<int>(open.size())), 1500, 5);
    req.set_tenant(tenant);
    auto o = std::make_unique<Open>();
    o->reader = stub_->Submit(&o->ctx, req);
    v1::SubmitResponse chunk;
    if (o->reader->Read(&chunk)) {  // running
      open.push_back(std::move(o));
      return grpc::Status::OK;
    }
    return o->reader->Finish();
  };
  ASSERT_TRUE(submit("a1", "a").ok());
  ASSERT_TRUE(submit("a2", "a").ok());
  grpc::Status s = submit("a3", "a");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(s.error_message().find("worker queue is full"), std::string::npos) << s.error_message();
  // b holds none of its part (2 / 2 tenants): it gets in past the cap, once.
  ASSERT_TRUE(submit("b1", "b").ok());
  s = submit("b2", "b");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(s.error_message().find("this tenant holds 1, its part is 1"), std::string::npos)
      << s.error_message();
  // A request without a tenant is one more tenant; then the worker holds twice its cap: no more.
  ASSERT_TRUE(submit("c1", "").ok());
  EXPECT_EQ(service_->num_live_sequences(), 4);
  EXPECT_EQ(submit("d1", "d").error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  // As sequences end, their places come back to their tenants.
  for (auto& o : open) {
    o->ctx.TryCancel();
    v1::SubmitResponse chunk;
    while (o->reader->Read(&chunk)) {
    }
    o->reader->Finish();
  }
  for (int i = 0; i < 200 && service_->num_live_sequences() > 0; ++i)
    absl::SleepFor(absl::Milliseconds(10));
  EXPECT_EQ(service_->num_live_sequences(), 0);
  EXPECT_TRUE(Run(Request("after", Prompt(4, 6), 4, 0)).status.ok());
}

TEST_F(WorkerServiceTest, DrainRefusesNewWorkFinishesOldAndResumes) {
  Start();
  grpc::ClientContext ctx;
  auto reader = stub_->Submit(&ctx, Request("inflight", Prompt(20, 7), 60, 5));
  v1::SubmitResponse chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  int64_t n = chunk.token_ids_size();
  v1::DrainResponse dr;
  {
    grpc::ClientContext c;
    ASSERT_TRUE(stub_->Drain(&c, v1::DrainRequest(), &dr).ok());
  }
  EXPECT_TRUE(dr.draining());
  EXPECT_EQ(dr.num_inflight_sequences(), 1u);
  EXPECT_EQ(Run(Request("new", Prompt(4, 7), 4, 0)).status.error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  while (reader->Read(&chunk)) n += chunk.token_ids_size();
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(n, 60);
  {
    grpc::ClientContext c;
    v1::WorkerInfo info;
    ASSERT_TRUE(stub_->GetInfo(&c, v1::GetInfoRequest(), &info).ok());
    EXPECT_TRUE(info.draining());
  }
  v1::DrainRequest resume;
  resume.set_resume(true);
  {
    grpc::ClientContext c;
    ASSERT_TRUE(stub_->Drain(&c, resume, &dr).ok());
  }
  EXPECT_FALSE(dr.draining());
  EXPECT_TRUE(Run(Request("after", Prompt(4, 7), 4, 0)).status.ok());
}

TEST_F(WorkerServiceTest, InfoDescribesTheWorker) {
  Start();
  grpc::ClientContext c;
  v1::WorkerInfo info;
  ASSERT_TRUE(stub_->GetInfo(&c, v1::GetInfoRequest(), &info).ok());
  EXPECT_EQ(info.worker_id(), "w0");
  EXPECT_EQ(info.worker_epoch(), service_->epoch());
  EXPECT_EQ(info.model(), kModel);
  EXPECT_EQ(info.vocab_size(), 2048u);
  EXPECT_EQ(info.max_context_tokens(), 2048u);
  EXPECT_EQ(info.block_tokens(), 16u);
  ASSERT_EQ(info.tiers_size(), 1);
  EXPECT_EQ(info.tiers(0).tier(), v1::TIER_DEVICE);
  EXPECT_GT(info.tiers(0).num_blocks(), 0u);
  EXPECT_GT(info.tiers(0).block_bytes(), 0u);
  EXPECT_FALSE(info.version().empty());
}

// A KV cache smaller than the model's context bounds it: the worker reports the cache's tokens,
// refuses a longer prompt by name, and ends a generation where the cache does.
TEST_F(WorkerServiceTest, ASmallKvCacheBoundsTheContext) {
  Start(/*max_live=*/256, /*num_kv_blocks=*/8);  // 128 tokens
  grpc::ClientContext c;
  v1::WorkerInfo info;
  ASSERT_TRUE(stub_->GetInfo(&c, v1::GetInfoRequest(), &info).ok());
  EXPECT_EQ(info.max_context_tokens(), 128u);
  const Result too_long = Run(Request("long", Prompt(200, 1), 4, 0));
  EXPECT_EQ(too_long.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(too_long.status.error_message().find("prompt_token_ids"), std::string::npos);
  EXPECT_NE(too_long.status.error_message().find("128"), std::string::npos);
  const Result full = Run(Request("full", Prompt(100, 2), 100, 0));
  ASSERT_TRUE(full.status.ok()) << full.status.error_message();
  EXPECT_EQ(full.tokens.size(), 28u);
  ASSERT_FALSE(full.chunks.empty());
  EXPECT_EQ(full.chunks.back().finish_reason(), v1::FINISH_REASON_CONTEXT_LENGTH);
  EXPECT_TRUE(Run(Request("after", Prompt(8, 3), 4, 0)).status.ok());
}

TEST_F(WorkerServiceTest, EventsStartWithASnapshotAndCarryChanges) {
  Start(/*max_live=*/256, /*num_kv_blocks=*/8);
  const std::vector<int32_t> prompt = Prompt(40, 8);
  ASSERT_TRUE(Run(Request("warm", prompt, 4, 0)).status.ok());
  const std::vector<BlockHash> hashes =
      PrefixBlockHashes(CacheNamespace(kModel, "", ""), prompt, 16);
  ASSERT_EQ(hashes.size(), 2u);

  grpc::ClientContext ctx;
  v1::WatchEventsRequest wr;
  wr.set_load_report_interval_ms(20);
  auto reader = stub_->WatchEvents(&ctx, wr);
  std::vector<v1::WorkerEvent> events;
  v1::WorkerEvent e;
  // Snapshot, completion marker, first load report.
  while (reader->Read(&e)) {
    events.push_back(e);
    if (e.has_load()) break;
  }
  ASSERT_GE(events.size(), 3u);
  std::vector<BlockHash> snapshot;
  size_t i = 0;
  for (; i < events.size() && events[i].has_stored(); ++i) {
    snapshot.insert(snapshot.end(), events[i].stored().block_hashes().begin(),
                    events[i].stored().block_hashes().end());
  }
  ASSERT_LT(i, events.size());
  EXPECT_TRUE(events[i].snapshot_complete());
  for (BlockHash h : hashes) {
    EXPECT_NE(std::find(snapshot.begin(), snapshot.end(), h), snapshot.end());
  }
  for (size_t k = 0; k < events.size(); ++k) {
    EXPECT_EQ(events[k].sequence_number(), k + 1);
    EXPECT_EQ(events[k].worker_epoch(), service_->epoch());
  }
  EXPECT_EQ(events.back().load().tiers(0).num_total_blocks(), 8u);

  // A long new prompt needs every block of the 8-block cache: the old blocks are evicted.
  ASSERT_TRUE(Run(Request("evict", Prompt(120, 9), 2, 0)).status.ok());
  const std::vector<BlockHash> evict_hashes =
      PrefixBlockHashes(CacheNamespace(kModel, "", ""), Prompt(120, 9), 16);
  std::vector<BlockHash> stored, removed;
  uint64_t expect_seq = events.size() + 1;
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while ((removed.size() < 2 || stored.size() < evict_hashes.size()) && absl::Now() < give_up &&
         reader->Read(&e)) {
    EXPECT_EQ(e.sequence_number(), expect_seq++);
    if (e.has_stored())
      stored.insert(stored.end(), e.stored().block_hashes().begin(),
                    e.stored().block_hashes().end());
    if (e.has_removed())
      removed.insert(removed.end(), e.removed().block_hashes().begin(),
                     e.removed().block_hashes().end());
  }
  ctx.TryCancel();
  while (reader->Read(&e)) {
  }
  reader->Finish();
  for (BlockHash h : hashes) {
    EXPECT_NE(std::find(removed.begin(), removed.end(), h), removed.end());
  }
  EXPECT_NE(std::find(stored.begin(), stored.end(), evict_hashes[0]), stored.end());
}

}  // namespace
}  // namespace strata
