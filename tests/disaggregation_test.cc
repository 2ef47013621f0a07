// Disaggregated serving through real processes on loopback: a coordinator, a worker started with
// --role=prefill and one with --role=decode. A long prompt is computed on the prefill worker with
// its first token; the decode worker copies the prompt's KV blocks from there and generates the
// rest, and the client gets exactly the tokens one worker alone produces.
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/cluster_client.h"
#include "tests/http_client.h"
#include "tests/local_cluster.h"
#include "tests/process.h"

namespace strata {
namespace {

// Requests routed to each worker so far (attempts, prefill legs included), by worker id.
std::map<std::string, uint64_t> Routed(v1::Admin::Stub* admin) {
  std::map<std::string, uint64_t> out;
  const v1::ClusterStatus status = Status(admin);
  for (const auto& w : status.workers()) out[w.info().worker_id()] = w.num_routed_requests();
  return out;
}

struct Cluster {
  std::unique_ptr<LocalCluster> cluster;
  int coordinator_metrics = 0;
  int decode_metrics = 0;
};

Cluster StartDisaggregated(const std::string& name,
                           const std::vector<std::string>& coordinator_flags = {},
                           const std::vector<std::string>& decode_flags = {}) {
  Cluster c;
  c.coordinator_metrics = FreePort();
  c.decode_metrics = FreePort();
  LocalClusterOptions o;
  o.num_workers = 2;
  o.name = name;
  o.per_worker_flags = {
      {"--role=prefill"},
      {"--role=decode", absl::StrCat("--metrics_listen=127.0.0.1:", c.decode_metrics)}};
  o.coordinator_flags = {"--disaggregate_min_uncached_tokens=64",
                         absl::StrCat("--metrics_listen=127.0.0.1:", c.coordinator_metrics)};
  o.coordinator_flags.insert(o.coordinator_flags.end(), coordinator_flags.begin(),
                             coordinator_flags.end());
  o.per_worker_flags[1].insert(o.per_worker_flags[1].end(), decode_flags.begin(),
                               decode_flags.end());
  auto started = LocalCluster::Start(o);
  EXPECT_TRUE(started.ok()) << started.status();
  if (started.ok()) c.cluster = *std::move(started);
  return c;
}

// A sampled request whose prompt is some 200 tokens: 12 or more full KV blocks.
v1::GenerateRequest LongRequest() {
  std::string text;
  for (int i = 0; i < 20; ++i) absl::StrAppend(&text, "def step_", i, "(x): return x + ", i, "\n");
  v1::GenerateRequest req = TextRequest(text, 24, 11);
  req.mutable_sampling()->set_temperature(0.8f);
  req.mutable_sampling()->set_logprobs(2);
  return req;
}

// The lines of `path` that contain `needle`, once there are at least `n` (up to 10 s).
std::vector<std::string> WaitForLines(const std::string& path, const std::string& needle, int n) {
  std::vector<std::string> lines;
  for (const absl::Time give_up = absl::Now() + absl::Seconds(10); absl::Now() < give_up;) {
    lines.clear();
    std::ifstream in(path);
    for (std::string line; std::getline(in, line);) {
      if (line.find(needle) != std::string::npos) lines.push_back(line);
    }
    if (static_cast<int>(lines.size()) >= n) break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  return lines;
}

TEST(DisaggregationTest, ALongPromptIsPrefilledThereAndDecodedHereToTheSameTokens) {
  const std::string access_log = TestOutputDir() + "/disagg-access.log";
  Cluster c = StartDisaggregated("disagg", {"--access_log=" + access_log});
  ASSERT_NE(c.cluster, nullptr);
  LocalCluster& cluster = *c.cluster;
  const v1::GenerateRequest req = LongRequest();

  // The reference: the decode worker alone (the prefill worker drained), in a cache namespace of
  // its own so that the run below finds nothing cached.
  Drain(cluster.admin(), "worker-0", /*resume=*/false, /*wait=*/true);
  v1::GenerateRequest alone = req;
  alone.set_cache_salt("reference");
  const Generated reference = Generate(cluster.serving(), alone);
  ASSERT_TRUE(reference.status.ok()) << reference.status.error_message();
  ASSERT_EQ(reference.tokens.size(), 24u);
  Drain(cluster.admin(), "worker-0", /*resume=*/true, /*wait=*/false);

  const auto before = Routed(cluster.admin());
  const Generated split = Generate(cluster.serving(), req);
  ASSERT_TRUE(split.status.ok()) << split.status.error_message();
  EXPECT_EQ(split.tokens, reference.tokens);
  EXPECT_EQ(split.text, reference.text);
  const auto after = Routed(cluster.admin());
  EXPECT_EQ(after.at("worker-0"), before.at("worker-0") + 1);  // the prefill leg
  EXPECT_EQ(after.at("worker-1"), before.at("worker-1") + 1);  // the rest
  // One response stream, its logprobs and usage whole: nothing was cached on the prefill worker
  // (the decode worker's copies do not count as cache hits).
  const v1::GenerateResponse& last = split.chunks.back();
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(last.usage().num_completion_tokens(), 24u);
  EXPECT_EQ(last.usage().cached().num_device_tokens(), 0u);
  int logprobs = 0;
  for (const auto& chunk : split.chunks) logprobs += chunk.logprobs_size();
  EXPECT_EQ(logprobs, 24);
  const uint32_t full_blocks = (last.usage().num_prompt_tokens() - 1) / 16;
  ASSERT_GE(full_blocks, 10u);

  std::map<std::string, double> m = WaitForMetrics(c.coordinator_metrics, [](auto& m) {
    return m["strata_coordinator_prefill_handoffs_total"] >= 1;
  });
  EXPECT_EQ(m["strata_coordinator_prefill_handoffs_total"], 1);
  // The decode worker copied the prompt's blocks rather than computing them.
  m = WaitForMetrics(c.decode_metrics, [](auto& m) {
    return m["strata_worker_kv_fetches_total{outcome=\"copied\"}"] >= 1;
  });
  EXPECT_EQ(m["strata_worker_kv_fetches_total{outcome=\"copied\"}"], 1);
  EXPECT_EQ(m["strata_worker_kv_blocks_received_total"], full_blocks);
  EXPECT_EQ(m["strata_worker_role{role=\"decode\"}"], 1);
  // The access log names both workers, the prefill worker first, and the handoff.
  const std::vector<std::string> handed = WaitForLines(access_log, "\"prefill_handoff\":1", 1);
  ASSERT_EQ(handed.size(), 1u);
  EXPECT_NE(handed[0].find(absl::StrCat("\"workers\":[\"", cluster.worker_address(0), "\",\"",
                                        cluster.worker_address(1), "\"]")),
            std::string::npos)
      << handed[0];

  // The same prompt again: the decode worker holds it now, so it goes there whole.
  const Generated again = Generate(cluster.serving(), req);
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(again.tokens, reference.tokens);
  const auto third = Routed(cluster.admin());
  EXPECT_EQ(third.at("worker-0"), after.at("worker-0"));
  EXPECT_EQ(third.at("worker-1"), after.at("worker-1") + 1);
  EXPECT_GE(again.chunks.back().usage().cached().num_device_tokens(), full_blocks * 16);

  // A short prompt goes straight to the decode worker too.
  const Generated small = Generate(cluster.serving(), TextRequest("x = ", 4, 1));
  ASSERT_TRUE(small.status.ok()) << small.status.error_message();
  const auto fourth = Routed(cluster.admin());
  EXPECT_EQ(fourth.at("worker-0"), third.at("worker-0"));
  EXPECT_EQ(fourth.at("worker-1"), third.at("worker-1") + 1);
  m = WaitForMetrics(c.coordinator_metrics, [](auto&) { return true; });
  EXPECT_EQ(m["strata_coordinator_prefill_handoffs_total"], 1);

  // With prompt logprobs: the prefill worker computes them; the decode leg does not ask again
  // (it would recompute the whole prompt), so it still copies the blocks.
  v1::GenerateRequest scored = req;
  scored.set_cache_salt("scored");
  scored.mutable_sampling()->set_prompt_logprobs(1);
  const Generated with_lp = Generate(cluster.serving(), scored);
  ASSERT_TRUE(with_lp.status.ok()) << with_lp.status.error_message();
  EXPECT_EQ(with_lp.tokens, reference.tokens);
  EXPECT_EQ(with_lp.chunks.front().prompt_logprobs_size(),
            static_cast<int>(last.usage().num_prompt_tokens()) - 1);  // the first has none
  m = WaitForMetrics(c.decode_metrics, [](auto& m) {
    return m["strata_worker_kv_fetches_total{outcome=\"copied\"}"] >= 2;
  });
  EXPECT_EQ(m["strata_worker_kv_fetches_total{outcome=\"copied\"}"], 2);
}

// A request of one token ends on the prefill worker; a stop string in the first token too.
TEST(DisaggregationTest, AGenerationThatEndsAtItsFirstTokenEndsOnThePrefillWorker) {
  Cluster c = StartDisaggregated("disagg-one");
  ASSERT_NE(c.cluster, nullptr);
  LocalCluster& cluster = *c.cluster;
  v1::GenerateRequest req = LongRequest();
  req.mutable_sampling()->set_max_tokens(1);
  const auto before = Routed(cluster.admin());
  const Generated one = Generate(cluster.serving(), req);
  ASSERT_TRUE(one.status.ok()) << one.status.error_message();
  EXPECT_EQ(one.tokens.size(), 1u);
  EXPECT_EQ(one.chunks.back().finish_reason(), v1::FINISH_REASON_LENGTH);
  const auto after = Routed(cluster.admin());
  EXPECT_EQ(after.at("worker-0"), before.at("worker-0") + 1);
  EXPECT_EQ(after.at("worker-1"), before.at("worker-1"));
  std::map<std::string, double> m =
      WaitForMetrics(c.coordinator_metrics, [](auto&) { return true; });
  EXPECT_EQ(m["strata_coordinator_prefill_handoffs_total"], 0);
}

// With the prefill worker's queue bounded, long prompts arriving together spill to the decode
// worker once the first is queued there, and every one gets its undisturbed tokens.
TEST(DisaggregationTest, PromptsSpillToTheDecodeWorkerWhileThePrefillWorkerIsBusy) {
  Cluster c = StartDisaggregated("disagg-spill", {"--disaggregate_max_prefill_queue_tokens=1"});
  ASSERT_NE(c.cluster, nullptr);
  LocalCluster& cluster = *c.cluster;
  std::vector<v1::GenerateRequest> requests;
  std::vector<std::vector<int32_t>> expected;
  for (int i = 0; i < 4; ++i) {
    v1::GenerateRequest r = LongRequest();
    r.mutable_sampling()->set_seed(100 + i);
    v1::GenerateRequest alone = r;
    alone.set_cache_salt(absl::StrCat("alone-", i));
    const Generated g = Generate(cluster.serving(), alone);
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    r.set_cache_salt(absl::StrCat("together-", i));
    requests.push_back(r);
    expected.push_back(g.tokens);
  }
  std::map<std::string, double> m =
      WaitForMetrics(c.coordinator_metrics, [](auto&) { return true; });
  const double before = m["strata_coordinator_prefill_handoffs_total"];
  OpenStreams streams = StartStreams(cluster.serving(), requests);
  ASSERT_TRUE(streams.ok);
  ExpectExactlyTheUndisturbedTokens(streams.CollectAll(), expected);
  m = WaitForMetrics(c.coordinator_metrics, [](auto&) { return true; });
  const double split = m["strata_coordinator_prefill_handoffs_total"] - before;
  EXPECT_GE(split, 1);  // the first
  EXPECT_LT(split, 4);  // the others found it queued
}

// A decode worker that copies no KV blocks (--kv_fetch=false) could take no handoff but by
// computing the prompt again: the coordinator sends long prompts to it whole, and the prefill
// worker gets none.
TEST(DisaggregationTest, WithoutADecodeWorkerThatCopiesPromptsAreNotSplit) {
  Cluster c = StartDisaggregated("disagg-no-copy", {}, {"--kv_fetch=false"});
  ASSERT_NE(c.cluster, nullptr);
  LocalCluster& cluster = *c.cluster;
  const auto before = Routed(cluster.admin());
  const Generated g = Generate(cluster.serving(), LongRequest());
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.tokens.size(), 24u);
  const auto after = Routed(cluster.admin());
  EXPECT_EQ(after.at("worker-0"), before.at("worker-0"));
  EXPECT_EQ(after.at("worker-1"), before.at("worker-1") + 1);
  std::map<std::string, double> m =
      WaitForMetrics(c.coordinator_metrics, [](auto&) { return true; });
  EXPECT_EQ(m["strata_coordinator_prefill_handoffs_total"], 0);
}

// The prefill worker dies: long prompts are computed on the decode worker, and nothing fails.
TEST(DisaggregationTest, WithoutAPrefillWorkerTheDecodeWorkerTakesWholeRequests) {
  Cluster c = StartDisaggregated("disagg-dead");
  ASSERT_NE(c.cluster, nullptr);
  LocalCluster& cluster = *c.cluster;
  cluster.worker_process(0).Kill();
  v1::GenerateRequest req = LongRequest();
  req.set_cache_salt("after");
  const Generated g = Generate(cluster.serving(), req);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.tokens.size(), 24u);
}

}  // namespace
}  // namespace strata
