#include "worker/server/follower_ranks.h"

#include <signal.h>

#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

constexpr char kChild[] = "worker/server/follower_ranks_test_child";

// Starts `world - 1` children told to do `what`, recording every on_failure call.
struct Started {
  std::unique_ptr<FollowerRanks> ranks;
  absl::Mutex mu;
  std::vector<std::string> failures;
};

void Start(Started* s, int world, const std::string& what) {
  auto r = FollowerRanks::Start(kChild, {"follower", "--", what}, world, 7, 8,
                                [s](const std::string& why) {
                                  absl::MutexLock lock(&s->mu);
                                  s->failures.push_back(why);
                                });
  ASSERT_TRUE(r.ok()) << r.status();
  s->ranks = *std::move(r);
  EXPECT_EQ(s->ranks->pids().size(), static_cast<size_t>(world - 1));
}

TEST(FollowerRanksTest, ExitingZeroIsAStopNotAFailure) {
  Started s;
  Start(&s, 3, "exit0");
  // Before Stop too: a follower exits 0 only when rank 0 stopped it.
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_TRUE(s.ranks->Stop(absl::Seconds(10)));
  absl::MutexLock lock(&s.mu);
  EXPECT_TRUE(s.failures.empty()) << s.failures[0];
}

TEST(FollowerRanksTest, AnyOtherExitIsReportedOnceNamingRankAndStatus) {
  Started s;
  Start(&s, 3, "exit3");
  {
    absl::MutexLock lock(&s.mu);
    EXPECT_TRUE(s.mu.AwaitWithTimeout(
        absl::Condition(
            +[](std::vector<std::string>* f) { return !f->empty(); }, &s.failures),
        absl::Seconds(10)));
  }
  EXPECT_FALSE(s.ranks->Stop(absl::Seconds(10)));
  absl::MutexLock lock(&s.mu);
  ASSERT_EQ(s.failures.size(), 1u);
  EXPECT_TRUE(absl::StrContains(s.failures[0], "exited with status 3")) << s.failures[0];
  EXPECT_TRUE(absl::StrContains(s.failures[0], "tensor-parallel rank ")) << s.failures[0];
}

TEST(FollowerRanksTest, StopKillsRanksThatDoNotExit) {
  Started s;
  Start(&s, 2, "hang");
  const pid_t pid = s.ranks->pids()[0];
  EXPECT_FALSE(s.ranks->Stop(absl::Milliseconds(200)));
  EXPECT_NE(kill(pid, 0), 0) << "the hanging rank is still there";
  absl::MutexLock lock(&s.mu);
  EXPECT_TRUE(s.failures.empty());
}

TEST(FollowerRanksTest, DescribesWaitStatuses) {
  EXPECT_EQ(DescribeWaitStatus(3 << 8), "exited with status 3");
  EXPECT_EQ(DescribeWaitStatus(SIGKILL), "was killed by signal 9");
}

}  // namespace
}  // namespace strata
