// Workers of one model that serve different contexts (--max_context_tokens), behind one
// coordinator: the model's context is the longest one served, prompts too long for some workers go
// to those that hold them, a generation goes where all of its max_tokens fit, short requests still
// spread over every worker, a prompt only a drained worker holds is retryable (UNAVAILABLE), and a
// long generation whose worker dies ends where the survivors' context does.
#include <algorithm>
#include <atomic>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/cluster_client.h"
#include "tests/local_cluster.h"

namespace strata {
namespace {

constexpr int kShortContext = 128;
constexpr int kLongContext = 2048;  // the bundled model's

v1::GenerateRequest TokenRequest(int prompt_tokens, int max_tokens, uint64_t seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::uniform_int_distribution<int32_t> d(3, 2000);
  v1::GenerateRequest r;
  r.set_model(kTinyModel);
  for (int i = 0; i < prompt_tokens; ++i) r.mutable_token_ids()->add_ids(d(rng));
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  r.mutable_sampling()->set_seed(seed);
  return r;
}

// Worker 0 serves 128 tokens, worker 1 the model's 2048; worker 0 alone serves the bundled LoRA
// adapter, as fine-tune "lora-c".
LocalClusterOptions MixedContexts(const std::string& name) {
  const std::string fine_tunes = TestOutputDir() + "/" + name + "-fine-tunes";
  CopyBundledLoraAdapter(fine_tunes + "/lora-c");
  LocalClusterOptions o;
  o.num_workers = 2;
  o.name = name;
  o.per_worker_flags = {{absl::StrCat("--max_context_tokens=", kShortContext),
                         absl::StrCat("--fine_tune_dir=", fine_tunes)},
                        {}};
  return o;
}

// Requests the coordinator has routed to each worker, by index in the cluster.
std::vector<uint64_t> Routed(LocalCluster& cluster) {
  const v1::ClusterStatus s = Status(cluster.admin());
  std::vector<uint64_t> out(cluster.num_workers(), 0);
  for (const auto& w : s.workers()) {
    for (int i = 0; i < cluster.num_workers(); ++i) {
      if (w.address() == cluster.worker_address(i)) out[i] = w.num_routed_requests();
    }
  }
  return out;
}

v1::FinishReason LastFinish(const Generated& g) {
  return g.chunks.empty() ? v1::FINISH_REASON_UNSPECIFIED : g.chunks.back().finish_reason();
}

class ContextRoutingTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto c = LocalCluster::Start(MixedContexts("context-routing"));
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = c->release();
  }
  static void TearDownTestSuite() { delete cluster_; }
  static inline LocalCluster* cluster_ = nullptr;
};

TEST_F(ContextRoutingTest, TheModelReportsTheLongestAndShortestContextsServed) {
  grpc::ClientContext ctx;
  v1::ListModelsResponse models;
  ASSERT_TRUE(cluster_->serving()->ListModels(&ctx, v1::ListModelsRequest(), &models).ok());
  ASSERT_EQ(models.models_size(), 1);
  EXPECT_EQ(models.models(0).max_context_tokens(), static_cast<uint32_t>(kLongContext));
  EXPECT_EQ(models.models(0).min_context_tokens(), static_cast<uint32_t>(kShortContext));
  // The fine-tune only the short worker serves has its context.
  ASSERT_EQ(models.models(0).fine_tune_ids_size(), 1);
  EXPECT_EQ(models.models(0).fine_tune_ids(0), "lora-c");
  ASSERT_EQ(models.models(0).fine_tune_max_context_tokens_size(), 1);
  EXPECT_EQ(models.models(0).fine_tune_max_context_tokens(0), static_cast<uint32_t>(kShortContext));
  // Each worker's own, in the cluster status.
  std::vector<uint32_t> contexts;
  const v1::ClusterStatus status = Status(cluster_->admin());
  for (const auto& w : status.workers()) {
    contexts.push_back(w.info().max_context_tokens());
  }
  std::sort(contexts.begin(), contexts.end());
  EXPECT_EQ(contexts, (std::vector<uint32_t>{kShortContext, kLongContext}));
}

TEST_F(ContextRoutingTest, APromptTooLongForSomeWorkersGoesToThoseThatHoldIt) {
  const std::vector<uint64_t> before = Routed(*cluster_);
  constexpr int kRequests = 6;
  for (int i = 0; i < kRequests; ++i) {
    const Generated g = Generate(cluster_->serving(), TokenRequest(300, 4, 10 + i));
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    EXPECT_EQ(g.tokens.size(), 4u);
    EXPECT_EQ(LastFinish(g), v1::FINISH_REASON_LENGTH);
  }
  const std::vector<uint64_t> after = Routed(*cluster_);
  EXPECT_EQ(after[0], before[0]);
  EXPECT_EQ(after[1], before[1] + kRequests);
  // Longer than any worker serves: refused, naming the context.
  const Generated refused = Generate(cluster_->serving(), TokenRequest(kLongContext, 4, 1));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(refused.status.error_message(),
                                absl::StrCat("has a context of ", kLongContext)))
      << refused.status.error_message();
}

// A short prompt that asks for more tokens than the short worker holds gets them all, from the
// long worker; one whose whole generation fits anywhere may go to either.
TEST_F(ContextRoutingTest, AGenerationGoesWhereAllOfItsTokensFit) {
  std::vector<uint64_t> before = Routed(*cluster_);
  constexpr int kRequests = 4;
  for (int i = 0; i < kRequests; ++i) {
    const Generated g = Generate(cluster_->serving(), TokenRequest(40, 150, 20 + i));
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    EXPECT_EQ(g.tokens.size(), 150u);
    EXPECT_EQ(LastFinish(g), v1::FINISH_REASON_LENGTH);
  }
  std::vector<uint64_t> after = Routed(*cluster_);
  EXPECT_EQ(after[0], before[0]);
  EXPECT_EQ(after[1], before[1] + kRequests);

  // Short requests from several clients at once still use both workers.
  before = after;
  constexpr int kShort = 24;
  std::atomic<int> next{0}, failed{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < 4; ++t) {
    clients.emplace_back([&] {
      for (int i = next.fetch_add(1); i < kShort; i = next.fetch_add(1)) {
        const Generated g = Generate(cluster_->serving(), TokenRequest(30, 8, 100 + i));
        if (!g.status.ok() || g.tokens.size() != 8u) failed.fetch_add(1);
      }
    });
  }
  for (std::thread& t : clients) t.join();
  EXPECT_EQ(failed.load(), 0);
  after = Routed(*cluster_);
  EXPECT_EQ(after[0] + after[1], before[0] + before[1] + kShort);
  EXPECT_GT(after[0], before[0]) << "the short-context worker took none of the short requests";
}

// A fine-tune's context is its own workers': a prompt longer than theirs is refused, naming the
// fine-tune, though other workers of the model would hold it.
TEST_F(ContextRoutingTest, AFineTunesContextIsItsWorkers) {
  v1::GenerateRequest fits = TokenRequest(100, 8, 40);
  fits.set_fine_tune_id("lora-c");
  const Generated g = Generate(cluster_->serving(), fits);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.tokens.size(), 8u);
  v1::GenerateRequest too_long = TokenRequest(300, 8, 41);
  too_long.set_fine_tune_id("lora-c");
  const Generated refused = Generate(cluster_->serving(), too_long);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
      << refused.status.error_message();
  EXPECT_TRUE(absl::StrContains(
      refused.status.error_message(),
      absl::StrCat("fine-tune lora-c of model ", kTinyModel, " has a context of ", kShortContext)))
      << refused.status.error_message();
  // The base model takes it (on the long worker).
  EXPECT_TRUE(Generate(cluster_->serving(), TokenRequest(300, 8, 41)).status.ok());
}

// While the only worker that holds a prompt is drained, the prompt is UNAVAILABLE (the client
// retries it), not INVALID_ARGUMENT; once the worker serves again it goes through.
TEST_F(ContextRoutingTest, APromptOnlyADrainedWorkerHoldsIsRetryable) {
  auto longest = [&] {
    grpc::ClientContext ctx;
    v1::ListModelsResponse models;
    EXPECT_TRUE(cluster_->serving()->ListModels(&ctx, v1::ListModelsRequest(), &models).ok());
    return models.models_size() == 1 ? models.models(0).max_context_tokens() : 0u;
  };
  Drain(cluster_->admin(), cluster_->worker_address(1), /*resume=*/false, /*wait=*/false);
  EXPECT_EQ(longest(), static_cast<uint32_t>(kShortContext));
  const Generated waiting = Generate(cluster_->serving(), TokenRequest(300, 4, 30));
  EXPECT_EQ(waiting.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << waiting.status.error_message();
  EXPECT_TRUE(absl::StrContains(waiting.status.error_message(), "draining or unavailable"))
      << waiting.status.error_message();
  // Short prompts go on meanwhile.
  const Generated short_one = Generate(cluster_->serving(), TokenRequest(30, 4, 31));
  EXPECT_TRUE(short_one.status.ok()) << short_one.status.error_message();
  Drain(cluster_->admin(), cluster_->worker_address(1), /*resume=*/true, /*wait=*/false);
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (longest() != static_cast<uint32_t>(kLongContext) && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  const Generated served = Generate(cluster_->serving(), TokenRequest(300, 4, 30));
  EXPECT_TRUE(served.status.ok()) << served.status.error_message();
}

// The long-context worker dies while it streams a generation only it could hold whole: the
// generation continues on the short-context worker from where it was, and ends, without an
// error, where that worker's context does.
TEST(ContextFailoverTest, AGenerationWhoseWorkerDiesEndsWhereTheSurvivorsContextDoes) {
  auto c = LocalCluster::Start(MixedContexts("context-failover"));
  ASSERT_TRUE(c.ok()) << c.status();
  LocalCluster& cluster = **c;
  constexpr int kPrompt = 40;
  const v1::GenerateRequest r = TokenRequest(kPrompt, 1900, 7);
  OpenStreams streams = StartStreams(cluster.serving(), {r});
  ASSERT_TRUE(streams.ok);
  ASSERT_EQ(Routed(cluster)[1], 1u);
  cluster.worker_process(1).Kill();
  const std::vector<Generated> results = streams.CollectAll();
  ASSERT_EQ(results.size(), 1u);
  const Generated& g = results[0];
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_TRUE(g.contiguous);
  EXPECT_EQ(LastFinish(g), v1::FINISH_REASON_CONTEXT_LENGTH);
  // Either the short worker took it on (and filled its context) or what had arrived was already
  // as long as that context; never past it, unless the long worker got that far before it died.
  const int64_t total = kPrompt + static_cast<int64_t>(g.tokens.size());
  EXPECT_GE(total, kShortContext);
  EXPECT_LT(static_cast<int64_t>(g.tokens.size()), 1900);
  if (Routed(cluster)[0] == 1) {
    EXPECT_EQ(total, kShortContext);  // resumed there, to its end
  }
}

}  // namespace
}  // namespace strata
