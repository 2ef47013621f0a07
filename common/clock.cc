#include "common/clock.h"

#include "absl/time/clock.h"

namespace strata {
namespace {

class SystemClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
  void SleepFor(absl::Duration d) override { absl::SleepFor(d); }
};

}  // namespace

Clock* RealClock() {
  static auto* clock = new SystemClock();
  return clock;
}

}  // namespace strata
