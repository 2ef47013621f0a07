#include "common/periodic.h"

#include <atomic>

#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(PeriodicThreadTest, RunsEveryPeriodAndStopsWhenDestroyed) {
  std::atomic<int> runs{0};
  {
    PeriodicThread t(absl::Milliseconds(50), [&] { runs.fetch_add(1); });
    EXPECT_EQ(runs.load(), 0);  // not at once
    for (int i = 0; i < 400 && runs.load() < 3; ++i) absl::SleepFor(absl::Milliseconds(5));
    EXPECT_GE(runs.load(), 3);
  }
  const int after = runs.load();
  absl::SleepFor(absl::Milliseconds(120));
  EXPECT_EQ(runs.load(), after);  // none once destroyed
  // Destroyed long before its first period: it does not wait for it.
  const absl::Time start = absl::Now();
  {
    PeriodicThread t(absl::Seconds(60), [] {});
  }
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

}  // namespace
}  // namespace strata
