// End-to-end: a coordinator and two workers as real processes on loopback, serving the bundled
// model, driven through the public gRPC API.
#include <signal.h>
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/cluster_client.h"
#include "tests/http_client.h"
#include "tests/local_cluster.h"
#include "tests/process.h"

namespace strata {
namespace {

// Sum of running plus waiting sequences the workers report.
int64_t WorkerSequences(v1::Admin::Stub* admin) {
  int64_t n = 0;
  const v1::ClusterStatus status = Status(admin);
  for (const auto& w : status.workers()) {
    n += w.load().num_running_sequences() + w.load().num_waiting_sequences();
  }
  return n;
}

bool WaitUntilWorkersIdle(v1::Admin::Stub* admin, absl::Duration timeout) {
  const absl::Time give_up = absl::Now() + timeout;
  while (absl::Now() < give_up) {
    if (WorkerSequences(admin) == 0) return true;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return false;
}

LocalClusterOptions Options(int num_workers, std::string name,
                            std::vector<std::string> coordinator_flags = {}) {
  LocalClusterOptions o;
  o.num_workers = num_workers;
  o.name = std::move(name);
  o.coordinator_flags = std::move(coordinator_flags);
  return o;
}

class ClusterTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto c = LocalCluster::Start(Options(2, "cluster"));
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = c->release();
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }
  static inline LocalCluster* cluster_ = nullptr;
};

TEST_F(ClusterTest, GenerateStreamsWhatTheWorkerProducesWithText) {
  v1::GenerateRequest req = TextRequest("def parse(line):\n    ", 40, 42);
  Generated g = Generate(cluster_->serving(), req);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  ASSERT_EQ(g.tokens.size(), 40u);
  EXPECT_TRUE(g.contiguous);
  EXPECT_EQ(g.chunks.front().seed(), 42u);
  const v1::GenerateResponse& last = g.chunks.back();
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_GT(last.usage().num_prompt_tokens(), 5u);
  EXPECT_EQ(last.usage().num_completion_tokens(), 40u);
  EXPECT_GT(last.usage().total_time_ms(), 0);
  EXPECT_GT(last.usage().time_to_first_token_ms(), 0);

  // The streamed text is the detokenized tokens.
  grpc::ClientContext dctx;
  v1::DetokenizeRequest dreq;
  dreq.set_model(kTinyModel);
  dreq.mutable_token_ids()->Add(g.tokens.begin(), g.tokens.end());
  v1::DetokenizeResponse dresp;
  ASSERT_TRUE(cluster_->serving()->Detokenize(&dctx, dreq, &dresp).ok());
  EXPECT_EQ(g.text, dresp.text());

  // The same prompt submitted straight to a worker gives the same tokens.
  grpc::ClientContext tctx;
  v1::TokenizeRequest treq;
  treq.set_model(kTinyModel);
  treq.set_text(req.text());
  treq.set_add_special_tokens(true);
  v1::TokenizeResponse tresp;
  ASSERT_TRUE(cluster_->serving()->Tokenize(&tctx, treq, &tresp).ok());
  EXPECT_EQ(tresp.max_context_tokens(), 2048u);
  v1::SubmitRequest sub;
  sub.set_request_id("direct");
  sub.set_model(kTinyModel);
  *sub.mutable_prompt_token_ids() = tresp.token_ids();
  *sub.mutable_sampling() = req.sampling();
  grpc::ClientContext sctx;
  auto reader = cluster_->worker(1)->Submit(&sctx, sub);
  std::vector<int32_t> direct;
  v1::SubmitResponse chunk;
  while (reader->Read(&chunk))
    direct.insert(direct.end(), chunk.token_ids().begin(), chunk.token_ids().end());
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(g.tokens, direct);

  // And token-id prompts work the same as text.
  v1::GenerateRequest by_ids = req;
  *by_ids.mutable_token_ids()->mutable_ids() = tresp.token_ids();
  EXPECT_EQ(Generate(cluster_->serving(), by_ids).tokens, g.tokens);
}

TEST_F(ClusterTest, LogprobsCarryTokenTexts) {
  v1::GenerateRequest req = TextRequest("import os", 5, 1);
  req.mutable_sampling()->set_logprobs(3);
  req.mutable_sampling()->set_prompt_logprobs(2);
  Generated g = Generate(cluster_->serving(), req);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  int positions = 0;
  for (const auto& c : g.chunks) {
    ASSERT_EQ(c.logprobs_size(), c.token_ids_size());
    for (int i = 0; i < c.logprobs_size(); ++i) {
      EXPECT_EQ(c.logprobs(i).token().token_id(), c.token_ids(i));
      EXPECT_EQ(c.logprobs(i).top_size(), 3);
      EXPECT_LE(c.logprobs(i).token().logprob(), 0);
      ++positions;
    }
  }
  EXPECT_EQ(positions, 5);
  ASSERT_GT(g.chunks.front().prompt_logprobs_size(), 0);
  EXPECT_FALSE(g.chunks.front().prompt_logprobs(0).token().text().empty());
}

TEST_F(ClusterTest, StopStringEndsTheTextBeforeIt) {
  v1::GenerateRequest req = TextRequest("for i in range(", 60, 7);
  Generated full = Generate(cluster_->serving(), req);
  ASSERT_TRUE(full.status.ok());
  ASSERT_GT(full.text.size(), 20u);
  // A stop string taken from the middle of the undisturbed output.
  const std::string stop = full.text.substr(full.text.size() / 2, 3);
  const size_t at = full.text.find(stop);
  req.mutable_sampling()->add_stop(stop);
  Generated g = Generate(cluster_->serving(), req);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.text, full.text.substr(0, at));
  EXPECT_EQ(g.chunks.back().finish_reason(), v1::FINISH_REASON_STOP_STRING);
  EXPECT_EQ(g.chunks.back().matched_stop(), stop);
  EXPECT_LT(g.tokens.size(), full.tokens.size());
  EXPECT_TRUE(WaitUntilWorkersIdle(cluster_->admin(), absl::Seconds(10)));
}

TEST_F(ClusterTest, BadRequestsGetTheRightCodeNamingTheField) {
  struct Case {
    std::string name;
    std::function<void(v1::GenerateRequest*)> edit;
    grpc::StatusCode code;
    std::string field;
  };
  const std::vector<Case> cases = {
      {"unknown model", [](auto* r) { r->set_model("gpt-17"); }, grpc::StatusCode::NOT_FOUND,
       "model"},
      {"no model", [](auto* r) { r->clear_model(); }, grpc::StatusCode::INVALID_ARGUMENT, "model"},
      {"no prompt", [](auto* r) { r->clear_text(); }, grpc::StatusCode::INVALID_ARGUMENT, "prompt"},
      {"prompt too long",
       [](auto* r) {
         std::vector<int32_t> ids(2048, 5);
         r->mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
       },
       grpc::StatusCode::INVALID_ARGUMENT, "prompt"},
      {"token out of vocabulary", [](auto* r) { r->mutable_token_ids()->add_ids(4096); },
       grpc::StatusCode::INVALID_ARGUMENT, "token_ids.ids[0]"},
      {"temperature", [](auto* r) { r->mutable_sampling()->set_temperature(-1); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.temperature"},
      {"max_tokens", [](auto* r) { r->mutable_sampling()->set_max_tokens(100000); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.max_tokens"},
      {"request_id", [](auto* r) { r->set_request_id("has space"); },
       grpc::StatusCode::INVALID_ARGUMENT, "request_id"},
      {"fine tune", [](auto* r) { r->set_fine_tune_id("nope"); }, grpc::StatusCode::NOT_FOUND,
       "fine_tune_id"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::GenerateRequest req = TextRequest("hello", 4, 1);
    c.edit(&req);
    Generated g = Generate(cluster_->serving(), req);
    EXPECT_EQ(g.status.error_code(), c.code) << g.status.error_message();
    EXPECT_NE(g.status.error_message().find(c.field), std::string::npos)
        << g.status.error_message();
  }
  // Still serving, and a client id of the full 128 bytes is echoed back.
  v1::GenerateRequest long_id = TextRequest("hello", 4, 1);
  long_id.set_request_id(std::string(128, 'r'));
  Generated g = Generate(cluster_->serving(), long_id);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.chunks.front().request_id(), long_id.request_id());
}

// GET /metrics from 127.0.0.1:port: each sample's value by its series.
std::map<std::string, double> Scrape(int port) {
  return ParseMetrics(Http(port, "GET", "/metrics").body);
}

// The coordinator's /metrics count what it served: calls by status code, tokens, and one TTFT and
// duration observation per successful call.
TEST_F(ClusterTest, CoordinatorMetricsCountWhatItServed) {
  const int port = FreePort();
  auto address = cluster_->StartExtraCoordinator(
      {absl::StrCat("--metrics_listen=127.0.0.1:", port)}, "metrics-coordinator");
  ASSERT_TRUE(address.ok()) << address.status();
  auto channel = grpc::CreateChannel(*address, grpc::InsecureChannelCredentials());
  auto serving = v1::Serving::NewStub(channel);
  auto admin = v1::Admin::NewStub(channel);
  ASSERT_TRUE(cluster_->WaitForServingWorkers(admin.get(), 2, absl::Seconds(30)).ok());
  std::map<std::string, double> before = Scrape(port);
  ASSERT_FALSE(before.empty()) << "no metrics on port " << port;
  // Series a finished call updates are there, at zero, before any call.
  EXPECT_EQ(before.at("strata_coordinator_completion_tokens_total"), 0);
  EXPECT_EQ(before.at("strata_coordinator_time_to_first_token_seconds_count"), 0);
  EXPECT_EQ(before.at("strata_coordinator_time_per_output_token_seconds_count"), 0);

  int64_t prompt_tokens = 0, cached_tokens = 0;
  for (int i = 0; i < 2; ++i) {
    // Long enough for whole blocks: the second call finds the first's in the cache.
    const Generated g = Generate(
        serving.get(),
        TextRequest("the metrics of it all, counted once and then counted again by the coordinator "
                    "that served the call to the worker that computed it",
                    5, 1 + i));
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    const v1::Usage& u = g.chunks.back().usage();
    prompt_tokens += u.num_prompt_tokens();
    cached_tokens += u.cached().num_device_tokens() + u.cached().num_host_tokens() +
                     u.cached().num_disk_tokens();
  }
  v1::GenerateRequest bad = TextRequest("hello", 4, 1);
  bad.mutable_sampling()->set_temperature(-1);
  EXPECT_EQ(Generate(serving.get(), bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  const std::map<std::string, double> m = Scrape(port);
  EXPECT_EQ(m.at("strata_coordinator_requests_total{code=\"OK\"}"), 2);
  EXPECT_EQ(m.at("strata_coordinator_requests_total{code=\"INVALID_ARGUMENT\"}"), 1);
  EXPECT_EQ(m.at("strata_coordinator_completion_tokens_total"), 10);
  EXPECT_GT(prompt_tokens, 0);
  EXPECT_EQ(m.at("strata_coordinator_prompt_tokens_total"), static_cast<double>(prompt_tokens));
  EXPECT_EQ(m.at("strata_coordinator_time_to_first_token_seconds_count"), 2);
  // Five tokens a call: the four after the first paced each.
  EXPECT_EQ(m.at("strata_coordinator_time_per_output_token_seconds_count"), 2);
  EXPECT_GT(m.at("strata_coordinator_time_per_output_token_seconds_sum"), 0);
  EXPECT_LT(m.at("strata_coordinator_time_per_output_token_seconds_sum"),
            m.at("strata_coordinator_request_duration_seconds_sum"));
  EXPECT_EQ(m.at("strata_coordinator_request_duration_seconds_count"), 2);
  EXPECT_GT(m.at("strata_coordinator_request_duration_seconds_sum"), 0);
  double cached = 0;
  for (const char* tier : {"device", "host", "disk"}) {
    cached +=
        m.at(absl::StrCat("strata_coordinator_cached_prompt_tokens_total{tier=\"", tier, "\"}"));
  }
  EXPECT_GT(cached_tokens, 0);
  EXPECT_EQ(cached, static_cast<double>(cached_tokens));
}

TEST_F(ClusterTest, ClientCancelFreesTheWorkerSequence) {
  grpc::ClientContext ctx;
  auto reader = cluster_->serving()->Generate(&ctx, TextRequest("while True:", 1900, 3));
  v1::GenerateResponse chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  ASSERT_TRUE(reader->Read(&chunk));
  ctx.TryCancel();
  while (reader->Read(&chunk)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitUntilWorkersIdle(cluster_->admin(), absl::Seconds(10)));
}

TEST_F(ClusterTest, DeadlinesPropagateToTheWorker) {
  Generated g =
      Generate(cluster_->serving(), TextRequest("class Foo:", 1900, 3), absl::Milliseconds(300));
  EXPECT_EQ(g.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(WaitUntilWorkersIdle(cluster_->admin(), absl::Seconds(10)));
  // A first-token timeout too short for a long prefill.
  v1::GenerateRequest req;
  req.set_model(kTinyModel);
  std::vector<int32_t> ids(2000);
  for (int i = 0; i < 2000; ++i) ids[i] = (i * 31) % 2000;
  req.mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
  req.set_first_token_timeout_ms(1);
  g = Generate(cluster_->serving(), req);
  EXPECT_EQ(g.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << g.status.error_message();
  EXPECT_NE(g.status.error_message().find("first_token_timeout_ms"), std::string::npos);
}

TEST_F(ClusterTest, ListModelsAndStatusDescribeTheCluster) {
  grpc::ClientContext ctx;
  v1::ListModelsResponse models;
  ASSERT_TRUE(cluster_->serving()->ListModels(&ctx, v1::ListModelsRequest(), &models).ok());
  ASSERT_EQ(models.models_size(), 1);
  EXPECT_EQ(models.models(0).name(), kTinyModel);
  EXPECT_EQ(models.models(0).num_workers(), 2u);
  EXPECT_EQ(models.models(0).max_context_tokens(), 2048u);
  EXPECT_EQ(models.models(0).vocab_size(), 2048u);

  const v1::ClusterStatus s = Status(cluster_->admin());
  ASSERT_EQ(s.workers_size(), 2);
  for (const auto& w : s.workers()) {
    EXPECT_EQ(w.state(), v1::WORKER_STATE_SERVING);
    EXPECT_EQ(w.info().model(), kTinyModel);
    EXPECT_GT(w.load().tiers(0).num_total_blocks(), 0u);
    EXPECT_GT(w.last_event_unix_ms(), 0);
  }
  EXPECT_FALSE(s.version().empty());
}

TEST_F(ClusterTest, DrainedWorkerGetsNoNewRequestsAndResumes) {
  auto drain = [](const std::string& worker, bool resume) {
    return Drain(cluster_->admin(), worker, resume, /*wait=*/!resume);
  };
  v1::DrainWorkerResponse r = drain("worker-0", false);
  EXPECT_EQ(r.status().state(), v1::WORKER_STATE_DRAINING);
  auto routed = [](int i) {
    const v1::ClusterStatus st = Status(cluster_->admin());
    for (const auto& w : st.workers()) {
      if (w.info().worker_id() == absl::StrCat("worker-", i)) return w.num_routed_requests();
    }
    ADD_FAILURE() << "no worker-" << i;
    return uint64_t{0};
  };
  const uint64_t before0 = routed(0);
  const uint64_t before1 = routed(1);
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(Generate(cluster_->serving(), TextRequest(absl::StrCat("x", i), 3, 1)).status.ok());
  }
  EXPECT_EQ(routed(0), before0);
  EXPECT_EQ(routed(1), before1 + 4);
  // Unknown workers are NOT_FOUND.
  grpc::ClientContext ctx;
  v1::DrainWorkerRequest bad;
  bad.set_worker("nope:1");
  v1::DrainWorkerResponse resp;
  EXPECT_EQ(cluster_->admin()->DrainWorker(&ctx, bad, &resp).error_code(),
            grpc::StatusCode::NOT_FOUND);
  r = drain(cluster_->worker_address(0), true);
  EXPECT_EQ(r.status().state(), v1::WORKER_STATE_SERVING);
}

// A greedy request whose prompt is 20 lines of `name`_i: many full KV blocks.
v1::GenerateRequest LongGreedyRequest(const std::string& name) {
  std::string text;
  for (int i = 0; i < 20; ++i) absl::StrAppend(&text, "def ", name, "_", i, "(v): return v\n");
  v1::GenerateRequest req = TextRequest(text, 8, 7);
  req.mutable_sampling()->set_temperature(0);
  return req;
}

// Requests the coordinator routed to each worker so far, by address.
std::map<std::string, uint64_t> RoutedByAddress(LocalCluster& cluster) {
  std::map<std::string, uint64_t> out;
  const v1::ClusterStatus status = Status(cluster.admin());
  for (const auto& w : status.workers()) out[w.address()] = w.num_routed_requests();
  return out;
}

// A drained worker still holds its KV cache: the next request with one of its prompts goes to the
// other worker, which copies the prompt's blocks from it (Worker.FetchKvBlocks) instead of
// computing them, and streams the same tokens.
TEST(KvFetchClusterTest, ADrainedWorkersCacheServesItsPromptsOnTheOther) {
  const int metrics_port = FreePort();
  auto c = LocalCluster::Start(
      Options(2, "kv-fetch", {absl::StrCat("--metrics_listen=127.0.0.1:", metrics_port)}));
  ASSERT_TRUE(c.ok()) << c.status();
  LocalCluster& cluster = **c;
  const v1::GenerateRequest req = LongGreedyRequest("parse");
  auto routed = [&] {
    const std::map<std::string, uint64_t> by_address = RoutedByAddress(cluster);
    std::map<std::string, uint64_t> out;  // by worker id
    for (int i = 0; i < 2; ++i) {
      out[absl::StrCat("worker-", i)] = by_address.at(cluster.worker_address(i));
    }
    return out;
  };
  const auto before = routed();
  const Generated first = Generate(cluster.serving(), req);
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  const uint32_t prompt_tokens = first.chunks.back().usage().num_prompt_tokens();
  ASSERT_GT(prompt_tokens, 64u);
  const uint32_t full_blocks_tokens = (prompt_tokens - 1) / 16 * 16;
  std::string holder, other;
  for (const auto& [id, n] : routed()) (n > before.at(id) ? holder : other) = id;
  ASSERT_FALSE(holder.empty());
  ASSERT_FALSE(other.empty());

  Drain(cluster.admin(), holder, /*resume=*/false, /*wait=*/true);
  const Generated second = Generate(cluster.serving(), req);
  ASSERT_TRUE(second.status.ok()) << second.status.error_message();
  EXPECT_EQ(second.tokens, first.tokens);
  EXPECT_EQ(routed().at(other), before.at(other) + 1);
  // The other worker never computed this prompt: its cached blocks are the copies.
  const v1::Usage& usage = second.chunks.back().usage();
  EXPECT_EQ(usage.cached().num_device_tokens(), full_blocks_tokens);
  // The coordinator counted one request routed with a source, for every full block.
  std::map<std::string, double> m = WaitForMetrics(
      metrics_port, [](auto& m) { return m["strata_coordinator_kv_copy_routes_total"] >= 1; });
  EXPECT_EQ(m["strata_coordinator_kv_copy_routes_total"], 1);
  EXPECT_EQ(m["strata_coordinator_kv_copy_blocks_total"], full_blocks_tokens / 16);
  Drain(cluster.admin(), holder, /*resume=*/true, /*wait=*/false);
}

// A worker that does not copy KV blocks (--kv_fetch=false) is not credited copies: with the holder
// drained, the prompt still goes to it (the only one serving), without a source, and it computes
// the prompt.
TEST(KvFetchClusterTest, AWorkerThatCopiesNothingIsNotRoutedCopies) {
  const int metrics_port = FreePort();
  LocalClusterOptions o =
      Options(2, "kv-fetch-off", {absl::StrCat("--metrics_listen=127.0.0.1:", metrics_port)});
  o.per_worker_flags = {{}, {"--kv_fetch=false"}};
  auto c = LocalCluster::Start(o);
  ASSERT_TRUE(c.ok()) << c.status();
  LocalCluster& cluster = **c;
  const v1::GenerateRequest req = LongGreedyRequest("lex");
  // Worker 0 computes the prompt first.
  Drain(cluster.admin(), "worker-1", /*resume=*/false, /*wait=*/true);
  const Generated first = Generate(cluster.serving(), req);
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  Drain(cluster.admin(), "worker-1", /*resume=*/true, /*wait=*/false);
  Drain(cluster.admin(), "worker-0", /*resume=*/false, /*wait=*/true);
  const uint64_t routed_before = RoutedByAddress(cluster).at(cluster.worker_address(1));
  const Generated second = Generate(cluster.serving(), req);
  ASSERT_TRUE(second.status.ok()) << second.status.error_message();
  EXPECT_EQ(second.tokens, first.tokens);
  EXPECT_EQ(RoutedByAddress(cluster).at(cluster.worker_address(1)), routed_before + 1);
  EXPECT_EQ(second.chunks.back().usage().cached().num_device_tokens(), 0u);
  const std::map<std::string, double> m = WaitForMetrics(metrics_port, [](auto& m) {
    return m["strata_coordinator_requests_total{code=\"OK\"}"] >= 2;
  });
  EXPECT_EQ(m.count("strata_coordinator_kv_copy_routes_total") == 0
                ? 0
                : m.at("strata_coordinator_kv_copy_routes_total"),
            0);
  Drain(cluster.admin(), "worker-0", /*resume=*/true, /*wait=*/false);
}

// A worker stopped with SIGTERM (a rolling restart) stays a moment once its sequences are done,
// so that the worker taking its prompts copies their KV blocks instead of computing them; then it
// leaves on its own. The coordinator may not know of the drain yet: the holder refuses the
// request, and the retry still names it as the source.
TEST(KvFetchClusterTest, AWorkerStoppedBySigtermServesCopiesBeforeItLeaves) {
  LocalClusterOptions o = Options(2, "kv-fetch-sigterm");
  o.worker_flags = {"--drain_kv_serve_s=60", "--drain_kv_idle_s=4"};
  auto c = LocalCluster::Start(o);
  ASSERT_TRUE(c.ok()) << c.status();
  LocalCluster& cluster = **c;
  const v1::GenerateRequest req = LongGreedyRequest("load");
  auto routed = [&] { return RoutedByAddress(cluster); };
  const auto before = routed();
  const Generated first = Generate(cluster.serving(), req);
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  const uint32_t full_blocks_tokens =
      (first.chunks.back().usage().num_prompt_tokens() - 1) / 16 * 16;
  ASSERT_GE(full_blocks_tokens, 64u);
  int holder = -1;
  for (int i = 0; i < 2; ++i) {
    if (routed().at(cluster.worker_address(i)) > before.at(cluster.worker_address(i))) holder = i;
  }
  ASSERT_GE(holder, 0);

  const uint64_t other_routed = routed().at(cluster.worker_address(1 - holder));
  cluster.worker_process(holder).Terminate();
  // Once it drains (the coordinator need not know yet), send the prompt again.
  for (const absl::Time give_up = absl::Now() + absl::Seconds(10);;) {
    grpc::ClientContext ctx;
    v1::WorkerInfo info;
    ASSERT_TRUE(cluster.worker(holder)->GetInfo(&ctx, v1::GetInfoRequest(), &info).ok());
    if (info.draining()) break;
    ASSERT_LT(absl::Now(), give_up) << "the worker did not start draining";
    absl::SleepFor(absl::Milliseconds(10));
  }
  const Generated second = Generate(cluster.serving(), req);
  ASSERT_TRUE(second.status.ok()) << second.status.error_message();
  EXPECT_EQ(second.tokens, first.tokens);
  // Served by the other worker, from the copies.
  EXPECT_EQ(routed().at(cluster.worker_address(1 - holder)), other_routed + 1);
  EXPECT_EQ(second.chunks.back().usage().cached().num_device_tokens(), full_blocks_tokens);
  // It leaves by itself once no copy was asked for in --drain_kv_idle_s, long before
  // --drain_kv_serve_s, and cleanly.
  const int status = cluster.worker_process(holder).Wait(absl::Seconds(30));
  ASSERT_NE(status, -1) << "the drained worker did not leave";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

// Failover: kill -9 a worker while it streams. Each affected request continues on the other
// worker from where it was, and the client gets exactly the undisturbed tokens.
TEST(FailoverTest, KillingAWorkerMidStreamLosesNothing) {
  auto c = LocalCluster::Start(Options(2, "failover"));
  ASSERT_TRUE(c.ok()) << c.status();
  LocalCluster& cluster = **c;
  constexpr int kRequests = 6;
  constexpr int kTokens = 300;
  std::vector<v1::GenerateRequest> requests;
  std::vector<std::vector<int32_t>> expected;
  for (int i = 0; i < kRequests; ++i) {
    v1::GenerateRequest r =
        TextRequest(absl::StrCat("# request ", i, "\nimport sys\n"), kTokens, 100 + i);
    r.mutable_sampling()->set_temperature(0.8f);
    Generated g = Generate(cluster.serving(), r);
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    ASSERT_EQ(g.tokens.size(), static_cast<size_t>(kTokens));
    requests.push_back(r);
    expected.push_back(g.tokens);
  }
  // Run them all at once, and kill the worker with more of them after a few tokens arrived.
  OpenStreams streams = StartStreams(cluster.serving(), requests);
  ASSERT_TRUE(streams.ok);
  const int victim_index = BusiestWorker(cluster);
  ASSERT_GE(victim_index, 0);
  const std::string victim_address = cluster.worker_address(victim_index);
  cluster.worker_process(victim_index).Kill();
  const std::vector<Generated> results = streams.CollectAll();
  ExpectExactlyTheUndisturbedTokens(results, expected);
  const v1::ClusterStatus after = Status(cluster.admin());
  EXPECT_GT(after.num_failed_over_requests(), 0u);
  for (const auto& w : after.workers()) {
    if (w.address() == victim_address) {
      EXPECT_EQ(w.state(), v1::WORKER_STATE_UNAVAILABLE);
    }
  }
  // New requests go to the survivor.
  EXPECT_TRUE(Generate(cluster.serving(), TextRequest("after", 4, 1)).status.ok());
}

// Requests queued on a worker that dies before they start are retried elsewhere from the start;
// the one it was running continues from where it was. Nothing is lost either way.
TEST(FailoverTest, QueuedRequestsOfADeadWorkerStartOverElsewhere) {
  LocalClusterOptions o = Options(2, "failover-queued");
  o.worker_flags = {"--max_running_sequences=1"};
  auto c = LocalCluster::Start(o);
  ASSERT_TRUE(c.ok()) << c.status();
  LocalCluster& cluster = **c;
  constexpr int kRequests = 3;
  std::vector<v1::GenerateRequest> requests;
  std::vector<std::vector<int32_t>> expected;
  for (int i = 0; i < kRequests; ++i) {
    v1::GenerateRequest r = TextRequest(absl::StrCat("queued ", i), 200, 7 + i);
    Generated g = Generate(cluster.serving(), r);
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    requests.push_back(r);
    expected.push_back(g.tokens);
  }
  auto drain = [&](const std::string& worker, bool resume) {
    Drain(cluster.admin(), worker, resume, /*wait=*/false);
  };
  // Everything goes to worker-0, which runs one sequence at a time.
  drain("worker-1", false);
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>>> readers;
  for (int i = 0; i < kRequests; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    readers.push_back(cluster.serving()->Generate(contexts.back().get(), requests[i]));
  }
  std::vector<Generated> results(kRequests);
  std::vector<std::thread> threads;
  for (int i = 0; i < kRequests; ++i) {
    threads.emplace_back([&, i] { results[i] = Collect(readers[i].get()); });
  }
  // Once worker-0 streams one of them and queues the others, resume worker-1 and kill worker-0.
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  bool queued = false;
  while (!queued && absl::Now() < give_up) {
    const v1::ClusterStatus st = Status(cluster.admin());
    int64_t running = 0, waiting = 0;
    for (const auto& w : st.workers()) {
      running += w.load().num_running_sequences();
      waiting += w.load().num_waiting_sequences();
    }
    queued = running == 1 && waiting == kRequests - 1;
    if (!queued) absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_TRUE(queued) << "never saw one running and the rest queued";
  drain("worker-1", true);
  cluster.worker_process(0).Kill();
  for (std::thread& t : threads) t.join();
  ExpectExactlyTheUndisturbedTokens(results, expected);
}

// A worker serves random weights shaped by a config.json alone (benchmarking models whose files
// are not here): it starts, and generates the tokens asked for.
TEST(RandomWeightsTest, AWorkerServesAModelFromItsConfigAlone) {
  const std::string dir = ConfigOnlyModelDir("config-only");
  LocalClusterOptions o;
  o.num_workers = 1;
  o.coordinator = false;
  o.name = "random-weights";
  o.worker_flags = {absl::StrCat("--model=", dir), "--random_weights=bf16"};
  auto c = LocalCluster::Start(o);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(SubmitAndCountTokens((*c)->worker(0), 6), 6);
}

// A worker that drafts (--num_speculative_tokens) streams the text a worker that does not
// streams, several tokens to a chunk, for greedy and seeded sampling, cut at a stop string the same
// way; its /metrics count the drafts and the tokens kept.
TEST(SpeculativeTest, ADraftingWorkerStreamsTheSameText) {
  const int port = FreePort();
  LocalClusterOptions o = Options(1, "speculative");
  o.worker_flags = {"--num_speculative_tokens=5",
                    absl::StrCat("--metrics_listen=127.0.0.1:", port)};
  auto spec = LocalCluster::Start(o);
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto plain = LocalCluster::Start(Options(1, "not-speculative"));
  ASSERT_TRUE(plain.ok()) << plain.status();
  const std::string prompt =
      "def add_one(x):\n    return x + 1\n\n\ndef add_two(x):\n    return x + 2\n\n\n"
      "def add_three(x):\n    return x + 3\n\n\ndef add_";
  size_t max_chunk = 0;
  for (const float temperature : {0.0f, 0.8f}) {
    SCOPED_TRACE(::testing::Message() << "temperature " << temperature);
    v1::GenerateRequest req = TextRequest(prompt, 80, 11);
    req.mutable_sampling()->set_temperature(temperature);
    const Generated want = Generate((*plain)->serving(), req);
    ASSERT_TRUE(want.status.ok()) << want.status.error_message();
    const Generated got = Generate((*spec)->serving(), req);
    ASSERT_TRUE(got.status.ok()) << got.status.error_message();
    EXPECT_EQ(got.tokens, want.tokens);
    EXPECT_EQ(got.text, want.text);
    EXPECT_TRUE(got.contiguous);
    EXPECT_EQ(got.chunks.back().usage().num_completion_tokens(), 80u);
    for (const auto& c : got.chunks) max_chunk = std::max<size_t>(max_chunk, c.token_ids_size());
    // A stop string from the second half of the text ends both at the same place.
    const std::string stop = want.text.substr(want.text.size() * 2 / 3, 4);
    req.mutable_sampling()->add_stop(stop);
    const Generated cut = Generate((*spec)->serving(), req);
    ASSERT_TRUE(cut.status.ok()) << cut.status.error_message();
    EXPECT_EQ(cut.text, want.text.substr(0, want.text.find(stop)));
    EXPECT_EQ(cut.chunks.back().finish_reason(), v1::FINISH_REASON_STOP_STRING);
  }
  EXPECT_GT(max_chunk, 1u) << "no step kept a draft token";
  // (The worker publishes its metrics every 250 ms.)
  std::map<std::string, double> m;
  for (const absl::Time give_up = absl::Now() + absl::Seconds(10); absl::Now() < give_up;
       absl::SleepFor(absl::Milliseconds(100))) {
    m = Scrape(port);
    if (m.count("strata_worker_accepted_draft_tokens_total") &&
        m.at("strata_worker_accepted_draft_tokens_total") > 0) {
      break;
    }
  }
  ASSERT_TRUE(m.count("strata_worker_draft_tokens_total")) << "no metrics on port " << port;
  EXPECT_GT(m.at("strata_worker_accepted_draft_tokens_total"), 0);
  EXPECT_GE(m.at("strata_worker_draft_tokens_total"),
            m.at("strata_worker_accepted_draft_tokens_total"));
}

// A worker with a draft model (--draft_model, the bundled one) streams the text a worker without
// drafts streams, for greedy and seeded sampling, several tokens to a chunk; its /metrics count
// the draft model's work. A draft that cannot be loaded stops the worker, naming the flag.
TEST(SpeculativeTest, AWorkerWithADraftModelStreamsTheSameText) {
  const int port = FreePort();
  LocalClusterOptions o = Options(1, "draft-model");
  o.worker_flags = {"--draft_model=models/strata-tiny/draft",
                    absl::StrCat("--metrics_listen=127.0.0.1:", port)};
  auto spec = LocalCluster::Start(o);
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto plain = LocalCluster::Start(Options(1, "no-draft-model"));
  ASSERT_TRUE(plain.ok()) << plain.status();
  size_t max_chunk = 0;
  for (const float temperature : {0.0f, 0.8f}) {
    SCOPED_TRACE(::testing::Message() << "temperature " << temperature);
    v1::GenerateRequest req = TextRequest("import os\nimport sys\n\n\ndef main(argv):\n", 64, 5);
    req.mutable_sampling()->set_temperature(temperature);
    const Generated want = Generate((*plain)->serving(), req);
    ASSERT_TRUE(want.status.ok()) << want.status.error_message();
    const Generated got = Generate((*spec)->serving(), req);
    ASSERT_TRUE(got.status.ok()) << got.status.error_message();
    EXPECT_EQ(got.tokens, want.tokens);
    EXPECT_EQ(got.text, want.text);
    EXPECT_TRUE(got.contiguous);
    for (const auto& c : got.chunks) max_chunk = std::max<size_t>(max_chunk, c.token_ids_size());
  }
  EXPECT_GT(max_chunk, 1u) << "no step kept a draft token";
  {
    grpc::ClientContext ctx;
    v1::WorkerInfo info;
    ASSERT_TRUE((*spec)->worker(0)->GetInfo(&ctx, v1::GetInfoRequest(), &info).ok());
    EXPECT_EQ(info.draft_model(), "draft");
    EXPECT_EQ(info.num_speculative_tokens(), 4u);
  }
  // (The worker publishes its metrics every 250 ms.)
  std::map<std::string, double> m = WaitForMetrics(
      port,
      [](std::map<std::string, double>& m) {
        return m.count("strata_worker_draft_model_seconds_total") &&
               m["strata_worker_accepted_draft_tokens_total"] > 0;
      },
      absl::Seconds(10));
  ASSERT_TRUE(m.count("strata_worker_draft_model_seconds_total")) << "no metrics on " << port;
  EXPECT_GT(m.at("strata_worker_draft_model_seconds_total"), 0);
  EXPECT_GT(m.at("strata_worker_accepted_draft_tokens_total"), 0);
  EXPECT_GT(m.at("strata_worker_draft_model_tokens_total{kind=\"draft\"}"), 0);
  EXPECT_GT(m.at("strata_worker_draft_model_kv_blocks{state=\"total\"}"), 0);

  // Bad draft settings stop the worker, naming the flag.
  const std::vector<std::pair<std::vector<std::string>, std::string>> bad_flags = {
      {{"--draft_model=models/strata-tiny/no-such-draft"},
       "--draft_model models/strata-tiny/no-such-draft"},
      {{"--draft_model=models/strata-tiny/draft", "--draft_kv_cache_mb=-1"}, "--draft_kv_cache_mb"},
  };
  for (const auto& [flags, want] : bad_flags) {
    const std::string log = TestOutputDir() + "/bad-draft-model.log";
    std::vector<std::string> argv = {"worker/server/strata-worker",
                                     "--model=models/strata-tiny/base", "--listen=127.0.0.1:0"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    absl::StatusOr<ChildProcess> bad = ChildProcess::Start(argv, log);
    ASSERT_TRUE(bad.ok()) << bad.status();
    const int status = bad->Wait(absl::Seconds(30));
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << status;
    std::ifstream in(log);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_NE(text.find(want), std::string::npos) << text;
  }
}

TEST(AdmissionTest, CoordinatorQueueBoundAnswersResourceExhausted) {
  auto c = LocalCluster::Start(Options(1, "admission", {"--max_inflight_requests=1"}));
  ASSERT_TRUE(c.ok()) << c.status();
  grpc::ClientContext ctx;
  auto reader = (*c)->serving()->Generate(&ctx, TextRequest("busy", 1900, 1));
  v1::GenerateResponse chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  Generated second = Generate((*c)->serving(), TextRequest("second", 4, 1));
  EXPECT_EQ(second.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  ctx.TryCancel();
  while (reader->Read(&chunk)) {
  }
  reader->Finish();
}

}  // namespace
}  // namespace strata
