// ThreadPool: a fixed set of worker threads for data-parallel loops (ParallelFor). Used by the CPU
// model runner to split a projection's output columns or attention's (token, head) pairs across
// cores; kernels themselves stay single-threaded.
#ifndef STRATA_COMMON_THREAD_POOL_H_
#define STRATA_COMMON_THREAD_POOL_H_

#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace strata {

// Thread-compatible: one thread calls ParallelFor at a time (the pool's owner); the calling thread
// takes a share of the work itself.
class ThreadPool {
 public:
  // `num_threads` total workers including the caller; 1 runs everything inline.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Calls fn(begin, end) on disjoint ranges covering [0, n), in parallel, rounding range boundaries
  // to multiples of `grain`; returns when all calls have returned.
  void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

 private:
  struct WaitArg {
    ThreadPool* pool;
    uint64_t seen;
  };
  static bool WorkReady(WaitArg* a);
  void Worker(int index);

  const int num_threads_;
  std::vector<std::thread> threads_;
  absl::Mutex mu_;
  const std::function<void(int64_t, int64_t)>* fn_ ABSL_GUARDED_BY(mu_) = nullptr;
  int64_t n_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t grain_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  int pending_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace strata

#endif  // STRATA_COMMON_THREAD_POOL_H_
