// FakeClock: a Clock that moves only when told to. For tests.
#ifndef STRATA_COMMON_FAKE_CLOCK_H_
#define STRATA_COMMON_FAKE_CLOCK_H_

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/clock.h"

namespace strata {

// Time starts at `start` and changes only through Advance, SetTime and SleepFor. SleepFor advances
// the clock by the requested duration and returns at once, so code that sleeps runs instantly and
// deterministically. Thread-safe.
class FakeClock final : public Clock {
 public:
  explicit FakeClock(absl::Time start = absl::FromUnixSeconds(1'700'000'000)) : now_(start) {}

  absl::Time Now() const override ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  void SleepFor(absl::Duration d) override { Advance(d); }

  // Moves time forward by `d` (which must not be negative; a negative d is ignored).
  void Advance(absl::Duration d) ABSL_LOCKS_EXCLUDED(mu_) {
    if (d < absl::ZeroDuration()) return;
    absl::MutexLock lock(&mu_);
    now_ += d;
  }
  // Sets the time; may move it backwards, as a wall clock can.
  void SetTime(absl::Time t) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    now_ = t;
  }

 private:
  mutable absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
};

}  // namespace strata

#endif  // STRATA_COMMON_FAKE_CLOCK_H_
