#include "common/periodic.h"

#include <algorithm>
#include <utility>

namespace strata {

PeriodicThread::PeriodicThread(absl::Duration period, std::function<void()> task) {
  period = std::max(period, absl::Milliseconds(50));
  thread_ = std::thread([this, period, task = std::move(task)] {
    while (true) {
      {
        absl::MutexLock lock(&mu_);
        auto stopped = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_; };
        if (mu_.AwaitWithTimeout(absl::Condition(&stopped), period)) return;
      }
      task();
    }
  });
}

PeriodicThread::~PeriodicThread() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

}  // namespace strata
