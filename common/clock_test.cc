#include "common/clock.h"

#include <thread>
#include <vector>

#include "common/fake_clock.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(FakeClockTest, MovesOnlyWhenTold) {
  const absl::Time start = absl::FromUnixSeconds(1000);
  FakeClock clock(start);
  EXPECT_EQ(clock.Now(), start);
  clock.Advance(absl::Milliseconds(250));
  EXPECT_EQ(clock.Now(), start + absl::Milliseconds(250));
  clock.SleepFor(absl::Seconds(2));  // returns at once, time moves
  EXPECT_EQ(clock.Now(), start + absl::Milliseconds(2250));
  clock.Advance(-absl::Seconds(1));  // ignored
  EXPECT_EQ(clock.Now(), start + absl::Milliseconds(2250));
  clock.SetTime(start);
  EXPECT_EQ(clock.Now(), start);
}

TEST(FakeClockTest, ConcurrentAdvancesAllCount) {
  FakeClock clock(absl::UnixEpoch());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&clock] {
      for (int i = 0; i < 1000; ++i) clock.Advance(absl::Microseconds(1));
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(clock.Now(), absl::UnixEpoch() + absl::Milliseconds(4));
}

TEST(RealClockTest, SleepMovesTimeForward) {
  Clock* clock = RealClock();
  const absl::Time before = clock->Now();
  clock->SleepFor(absl::Milliseconds(5));
  EXPECT_GE(clock->Now() - before, absl::Milliseconds(5));
  EXPECT_EQ(RealClock(), clock);
}

}  // namespace
}  // namespace strata
