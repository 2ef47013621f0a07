// End-to-end tensor parallelism on the CPU: a strata-worker started with --tensor_parallel=2 runs
// the bundled model as two processes (rank 0 starts rank 1 itself) and serves what a single-rank
// worker serves (with a draft model beside rank 0 too); when a rank dies, the worker fails its
// step, exits non-zero, and the coordinator carries its requests on elsewhere without losing a
// token.
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/cluster_client.h"
#include "tests/local_cluster.h"
#include "tests/process.h"

namespace strata {
namespace {

std::unique_ptr<LocalCluster> StartCluster(int num_workers, const std::string& name,
                                           std::vector<std::string> worker_flags) {
  LocalClusterOptions o;
  o.num_workers = num_workers;
  o.name = name;
  o.worker_flags = std::move(worker_flags);
  auto c = LocalCluster::Start(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

// The processes `pid`'s main thread started (a tensor-parallel worker's other ranks).
std::vector<pid_t> Children(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/task/", pid, "/children"));
  std::stringstream ss;
  ss << in.rdbuf();
  std::vector<pid_t> out;
  for (absl::string_view p : absl::StrSplit(ss.str(), ' ', absl::SkipWhitespace())) {
    int v = 0;
    if (absl::SimpleAtoi(p, &v)) out.push_back(v);
  }
  return out;
}

std::vector<v1::GenerateRequest> Requests(int n, int max_tokens, float temperature) {
  std::vector<v1::GenerateRequest> out;
  for (int i = 0; i < n; ++i) {
    v1::GenerateRequest r =
        TextRequest(absl::StrCat("# part ", i, "\nclass Parser:\n    def "), max_tokens, 40 + i);
    r.mutable_sampling()->set_temperature(temperature);
    out.push_back(r);
  }
  return out;
}

TEST(TensorParallelTest, ATwoRankWorkerServesWhatASingleRankWorkerServes) {
  // Greedy and seeded sampling, through the coordinator, from each kind of worker.
  std::vector<v1::GenerateRequest> requests = Requests(3, 40, 0.0f);
  for (v1::GenerateRequest& r : Requests(3, 40, 0.8f)) requests.push_back(r);
  std::vector<Generated> single;
  {
    auto cluster = StartCluster(1, "tp1", {});
    ASSERT_NE(cluster, nullptr);
    for (const auto& r : requests) single.push_back(Generate(cluster->serving(), r));
  }
  auto cluster = StartCluster(1, "tp2", {"--tensor_parallel=2"});
  ASSERT_NE(cluster, nullptr);
  EXPECT_EQ(Children(cluster->worker_process(0).pid()).size(), 1u);
  {
    grpc::ClientContext ctx;
    v1::WorkerInfo info;
    ASSERT_TRUE(cluster->worker(0)->GetInfo(&ctx, v1::GetInfoRequest(), &info).ok());
    EXPECT_EQ(info.tensor_parallel_size(), 2u);
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("request ", i));
    const Generated g = Generate(cluster->serving(), requests[i]);
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    ASSERT_TRUE(single[i].status.ok()) << single[i].status.error_message();
    EXPECT_EQ(g.tokens.size(), 40u);
    EXPECT_EQ(g.tokens, single[i].tokens);
    EXPECT_EQ(g.text, single[i].text);
  }
  // A clean stop takes the other rank with it.
  const std::vector<pid_t> follower = Children(cluster->worker_process(0).pid());
  ASSERT_EQ(follower.size(), 1u);
  const int status = cluster->worker_process(0).Stop();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_NE(kill(follower[0], 0), 0) << "rank 1 outlived rank 0";
}

// The draft model runs beside rank 0 (one rank of its own): a two-rank worker with
// --draft_model streams what a single-rank worker without it streams, drafts kept.
TEST(TensorParallelTest, ATwoRankWorkerWithADraftModelServesTheSame) {
  std::vector<v1::GenerateRequest> requests = Requests(2, 40, 0.0f);
  for (v1::GenerateRequest& r : Requests(2, 40, 0.8f)) requests.push_back(r);
  std::vector<Generated> single;
  {
    auto cluster = StartCluster(1, "tp1-plain", {});
    ASSERT_NE(cluster, nullptr);
    for (const auto& r : requests) single.push_back(Generate(cluster->serving(), r));
  }
  auto cluster = StartCluster(1, "tp2-draft",
                              {"--tensor_parallel=2", "--draft_model=models/strata-tiny/draft"});
  ASSERT_NE(cluster, nullptr);
  size_t max_chunk = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("request ", i));
    const Generated g = Generate(cluster->serving(), requests[i]);
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    EXPECT_EQ(g.tokens, single[i].tokens);
    for (const auto& c : g.chunks) max_chunk = std::max<size_t>(max_chunk, c.token_ids_size());
  }
  EXPECT_GT(max_chunk, 1u) << "no step kept a draft token";
}

TEST(TensorParallelTest, ALostRankTakesItsWorkerDownAndRequestsFailOverIntact) {
  auto c = StartCluster(2, "tp-failover", {"--tensor_parallel=2"});
  ASSERT_NE(c, nullptr);
  LocalCluster& cluster = *c;
  constexpr int kRequests = 4;
  constexpr int kTokens = 200;
  const std::vector<v1::GenerateRequest> requests = Requests(kRequests, kTokens, 0.8f);
  std::vector<std::vector<int32_t>> expected;
  for (const auto& r : requests) {
    Generated g = Generate(cluster.serving(), r);
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    expected.push_back(g.tokens);
  }
  OpenStreams streams = StartStreams(cluster.serving(), requests);
  ASSERT_TRUE(streams.ok);
  // Kill rank 1 of the worker streaming the most of them.
  const int victim = BusiestWorker(cluster);
  ASSERT_GE(victim, 0);
  const std::vector<pid_t> follower = Children(cluster.worker_process(victim).pid());
  ASSERT_EQ(follower.size(), 1u);
  ASSERT_EQ(kill(follower[0], SIGKILL), 0);
  const std::vector<Generated> results = streams.CollectAll();
  ExpectExactlyTheUndisturbedTokens(results, expected);
  // The worker that lost a rank stopped by itself, reporting failure.
  const int status = cluster.worker_process(victim).Wait(absl::Seconds(30));
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << status;
  EXPECT_GT(Status(cluster.admin()).num_failed_over_requests(), 0u);
  EXPECT_TRUE(Generate(cluster.serving(), TextRequest("after", 4, 1)).status.ok());
}

// Random weights from a config.json alone split across ranks too (benchmarks of model shapes that
// are not on disk): each rank draws its share of the same model.
TEST(TensorParallelTest, ARandomWeightsWorkerSplitsAcrossRanks) {
  const std::string dir = ConfigOnlyModelDir("tp-config-only");
  LocalClusterOptions o;
  o.num_workers = 1;
  o.coordinator = false;
  o.name = "tp-random";
  o.worker_flags = {absl::StrCat("--model=", dir), "--random_weights=bf16", "--tensor_parallel=2"};
  auto c = LocalCluster::Start(o);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(Children((*c)->worker_process(0).pid()).size(), 1u);
  EXPECT_EQ(SubmitAndCountTokens((*c)->worker(0), 6), 6);
}

// Flags that cannot work are refused at start, naming the flag.
TEST(TensorParallelTest, ImpossibleSplitsAreRefusedAtStart) {
  const std::string log = absl::StrCat(TestOutputDir(), "/tp-refused.log");
  for (const char* flag : {"--tensor_parallel=3", "--tensor_parallel=0"}) {
    SCOPED_TRACE(flag);
    auto p = ChildProcess::Start(
        {kWorkerBinary, absl::StrCat("--model=", kTinyModelDir), "--listen=127.0.0.1:0", flag},
        log);
    ASSERT_TRUE(p.ok()) << p.status();
    const int status = p->Wait(absl::Seconds(30));
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << status;
    std::ifstream in(log);
    std::stringstream text;
    text << in.rdbuf();
    EXPECT_NE(text.str().find("--tensor_parallel"), std::string::npos) << text.str();
  }
}

}  // namespace
}  // namespace strata
