// Clock: the source of time for every component that times out, expires or measures, so that tests
// can substitute FakeClock (common/fake_clock.h) and step time by hand.
#ifndef STRATA_COMMON_CLOCK_H_
#define STRATA_COMMON_CLOCK_H_

#include "absl/time/time.h"

namespace strata {

// Thread-safe. Components take a `Clock*` at construction (not owned) and default to RealClock().
class Clock {
 public:
  virtual ~Clock() = default;
  // Wall-clock time.
  virtual absl::Time Now() const = 0;
  // Blocks the calling thread for `d` of this clock's time.
  virtual void SleepFor(absl::Duration d) = 0;
};

// The system clock (absl::Now, absl::SleepFor). Lives for the whole process.
Clock* RealClock();

}  // namespace strata

#endif  // STRATA_COMMON_CLOCK_H_
