// A thread that runs a task every period until destroyed: the reloads of files read again while
// a server runs (API keys, the cluster secret).
#ifndef STRATA_COMMON_PERIODIC_H_
#define STRATA_COMMON_PERIODIC_H_

#include <functional>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace strata {

class PeriodicThread {
 public:
  // Runs `task` every `period` (at least 50 ms), the first time one period from now.
  PeriodicThread(absl::Duration period, std::function<void()> task);
  // Stops it, waiting for a run in progress.
  ~PeriodicThread();
  PeriodicThread(const PeriodicThread&) = delete;
  PeriodicThread& operator=(const PeriodicThread&) = delete;

 private:
  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace strata

#endif  // STRATA_COMMON_PERIODIC_H_
