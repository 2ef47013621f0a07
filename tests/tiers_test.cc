// End-to-end: a worker with host and disk KV tiers behind a coordinator. A prompt pushed out of the
// worker's device cache comes back from host and disk with the same output; the coordinator's
// routing index learns the tiers from the worker's events; after the worker is killed (SIGKILL)
// and restarted on the same disk file, the prompt is served from disk again.
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/cluster_client.h"
#include "tests/local_cluster.h"
#include "tests/process.h"

namespace strata {
namespace {

std::string LongText(int seed) {
  std::string text;
  for (int i = 0; i < 12; ++i) {
    absl::StrAppend(&text, "def handler_", seed, "_", i, "(request, count=", i * seed + 3,
                    "):\n    return request.value * ", i, "\n");
  }
  return text;
}

v1::GenerateRequest Greedy(const std::string& text) {
  v1::GenerateRequest r = TextRequest(text, 8, 1);
  r.mutable_sampling()->set_temperature(0.0f);
  return r;
}

uint64_t Indexed(const v1::WorkerStatus& w, v1::Tier tier) {
  for (const auto& t : w.indexed()) {
    if (t.tier() == tier) return t.num_total_blocks();
  }
  return 0;
}

TEST(TiersTest, PrefixesComeBackFromHostAndDiskAndSurviveAWorkerRestart) {
  LocalClusterOptions o;
  o.num_workers = 1;
  o.name = "tiers";
  // A 32-block device cache, 15 host slots, a disk file under the test's outputs.
  o.worker_flags = {"--kv_cache_mb=2", "--host_cache_mb=1", "--disk_cache_mb=16",
                    absl::StrCat("--disk_cache_path=", TestOutputDir(), "/kv-{i}"),
                    "--disk_queue_depth=8"};
  auto c = LocalCluster::Start(o);
  ASSERT_TRUE(c.ok()) << c.status();
  LocalCluster& cluster = **c;

  const v1::GenerateRequest p = Greedy(LongText(1));
  const Generated first = Generate(cluster.serving(), p);
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  const v1::Usage u1 = first.chunks.back().usage();
  ASSERT_GT(u1.num_prompt_tokens(), 200u);
  ASSERT_LT(u1.num_prompt_tokens(), 480u);  // fits the 32-block device cache
  ASSERT_EQ(first.tokens.size(), 8u);
  EXPECT_EQ(u1.cached().num_device_tokens() + u1.cached().num_host_tokens() +
                u1.cached().num_disk_tokens(),
            0u);

  // Three other long prompts push it out of the device cache and through the host tier.
  for (int i = 2; i <= 4; ++i) {
    ASSERT_TRUE(Generate(cluster.serving(), Greedy(LongText(i))).status.ok());
  }
  const Generated again = Generate(cluster.serving(), p);
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(again.tokens, first.tokens);
  const v1::CachedTokens& c2 = again.chunks.back().usage().cached();
  EXPECT_EQ(c2.num_device_tokens(), 0u);
  EXPECT_GT(c2.num_host_tokens() + c2.num_disk_tokens(), 0u);
  EXPECT_GE(c2.num_device_tokens() + c2.num_host_tokens() + c2.num_disk_tokens(),
            u1.num_prompt_tokens() - 16);

  // The coordinator's index holds the worker's blocks per tier.
  bool tiers_indexed = false;
  for (int i = 0; i < 100 && !tiers_indexed; ++i) {
    const v1::WorkerStatus w = Status(cluster.admin()).workers(0);
    tiers_indexed = Indexed(w, v1::TIER_HOST) > 0 && Indexed(w, v1::TIER_DISK) > 0;
    if (!tiers_indexed) absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_TRUE(tiers_indexed);
  // The worker's load reports carry the tiers' counters.
  bool counted = false;
  for (int i = 0; i < 100 && !counted; ++i) {
    const v1::KvTierStats k = Status(cluster.admin()).workers(0).load().kv_tiers();
    counted = k.disk_enabled() && k.write_backs() > 0 && k.lower_tier_hits() > 0 &&
              k.corrupt_blocks() == 0 && k.io_errors() == 0;
    if (!counted) absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_TRUE(counted) << Status(cluster.admin()).workers(0).load().DebugString();

  // SIGKILL, restart on the same disk file: the blocks on disk are indexed again and hit.
  const uint64_t epoch = Status(cluster.admin()).workers(0).info().worker_epoch();
  ASSERT_TRUE(cluster.RestartWorker(0).ok());
  bool back = false;
  for (int i = 0; i < 500 && !back; ++i) {
    const v1::WorkerStatus w = Status(cluster.admin()).workers(0);
    back = w.state() == v1::WORKER_STATE_SERVING && w.info().worker_epoch() != epoch &&
           Indexed(w, v1::TIER_DISK) > 0;
    if (!back) absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_TRUE(back) << "the restarted worker's disk blocks never reached the coordinator";
  const Generated after = Generate(cluster.serving(), p);
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.tokens, first.tokens);
  const v1::CachedTokens& c3 = after.chunks.back().usage().cached();
  EXPECT_EQ(c3.num_device_tokens() + c3.num_host_tokens(), 0u);
  EXPECT_GT(c3.num_disk_tokens(), 0u);
}

}  // namespace
}  // namespace strata
