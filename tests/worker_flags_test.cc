// A worker given a numeric flag out of its range stops at once (exit status 1), naming the flag
// and its range, before it loads anything: a size in MiB that would wrap when shifted into bytes
// included, which used to surface as an engine error about the cache that did not name the flag.
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/cluster_client.h"
#include "tests/local_cluster.h"

namespace strata {
namespace {

std::string LogPath() {
  const char* tmp = std::getenv("TEST_TMPDIR");
  return absl::StrCat(tmp == nullptr ? "/tmp" : tmp, "/worker-flags.log");
}

TEST(WorkerFlagsTest, OutOfRangeNumbersStopTheWorkerNamingTheFlag) {
  struct Case {
    std::string flag;
    std::string want;  // in the log
  };
  const std::vector<Case> cases = {
      {"--kv_cache_mb=0", "--kv_cache_mb must be 1 to 1073741824, not 0"},
      {"--kv_cache_mb=-5", "--kv_cache_mb must be 1 to 1073741824, not -5"},
      // Shifted into bytes, this one wraps to a negative size.
      {"--kv_cache_mb=9000000000000", "--kv_cache_mb must be 1 to 1073741824, not 9000000000000"},
      {"--host_cache_mb=-1", "--host_cache_mb must be 0 to"},
      {"--disk_cache_mb=2000000000", "--disk_cache_mb must be 0 to"},
      {"--delta_cache_mb=0", "--delta_cache_mb must be 1 to"},
      {"--draft_kv_cache_mb=-3", "--draft_kv_cache_mb must be 0 to"},
      {"--kv_fetch_max_mb=0", "--kv_fetch_max_mb must be 1 to 16777216"},
      {"--kv_copy_slice_mb=2000000", "--kv_copy_slice_mb must be 1 to 1048576"},
      {"--block_tokens=0", "--block_tokens must be 1 to 4096"},
      {"--max_batch_tokens=-1", "--max_batch_tokens must be 1 to"},
      {"--max_context_tokens=-1", "--max_context_tokens must be 0 to"},
      {"--max_running_sequences=0", "--max_running_sequences must be 1 to 65536"},
      {"--max_live_sequences=0", "--max_live_sequences must be 1 to"},
      {"--threads=-2", "--threads must be 0 to 4096"},
      {"--disk_queue_depth=5000", "--disk_queue_depth must be 1 to 4095"},
      {"--inflight_prefill_min_tokens=-1", "--inflight_prefill_min_tokens must be 0 to"},
  };
  const std::string log = LogPath();
  for (const Case& c : cases) {
    const absl::Time start = absl::Now();
    absl::StatusOr<ChildProcess> p = ChildProcess::Start(
        {kWorkerBinary, absl::StrCat("--model=", kTinyModelDir), "--listen=127.0.0.1:0", c.flag},
        log);
    ASSERT_TRUE(p.ok()) << p.status();
    const int status = p->Wait(absl::Seconds(30));
    ASSERT_TRUE(WIFEXITED(status)) << c.flag << ": " << status;
    EXPECT_EQ(WEXITSTATUS(status), 1) << c.flag;
    std::ifstream in(log);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_TRUE(absl::StrContains(text, c.want)) << c.flag << ":\n" << text;
    // Refused before the model is read: nothing of it is in the log.
    EXPECT_FALSE(absl::StrContains(text, "serving")) << c.flag << ":\n" << text;
    EXPECT_LT(absl::Now() - start, absl::Seconds(20)) << c.flag;
  }
}

// A context cap beyond the model's context stops the worker once the model is read, naming the
// flag and the most it can be.
TEST(WorkerFlagsTest, AContextCapLongerThanTheModelsStopsTheWorker) {
  const std::string log = LogPath();
  absl::StatusOr<ChildProcess> p =
      ChildProcess::Start({kWorkerBinary, absl::StrCat("--model=", kTinyModelDir),
                           "--listen=127.0.0.1:0", "--max_context_tokens=1000000"},
                          log);
  ASSERT_TRUE(p.ok()) << p.status();
  const int status = p->Wait(absl::Seconds(60));
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 1);
  std::ifstream in(log);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_TRUE(absl::StrContains(text,
                                "max_context_tokens must be 0 (the model's context) to the "
                                "model's context of 2048 tokens, not 1000000"))
      << text;
}

// The ends of each range are taken: the same worker serves with the least KV cache that holds a
// block, and with no host or disk tier.
TEST(WorkerFlagsTest, TheEndsOfTheRangesAreAccepted) {
  LocalClusterOptions o;
  o.num_workers = 1;
  o.name = "worker-flags";
  o.worker_flags = {"--kv_cache_mb=1",
                    "--host_cache_mb=0",
                    "--disk_cache_mb=0",
                    "--threads=0",
                    "--inflight_prefill_min_tokens=0",
                    "--block_tokens=1"};
  absl::StatusOr<std::unique_ptr<LocalCluster>> c = LocalCluster::Start(o);
  ASSERT_TRUE(c.ok()) << c.status();
  const Generated g = Generate((*c)->serving(), TextRequest("int main(void) {", 24, 1));
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.tokens.size(), 24u);
}

}  // namespace
}  // namespace strata
