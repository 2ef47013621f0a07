// ThreadPool: a fixed set of worker threads for data-parallel loops (ParallelFor). Used by the CPU
// model runner to split a projection's output columns or attention's (token, head) pairs across
// cores; kernels themselves stay single-threaded.
#ifndef STRATA_COMMON_THREAD_POOL_H_
#define STRATA_COMMON_THREAD_POOL_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace strata {

// Thread-compatible: one thread calls ParallelFor at a time (the pool's owner); the calling thread
// takes a share of the work itself. Between loops a worker spins for a few tens of microseconds
// before it sleeps (when the pool has no more threads than usable CPUs), and so does the caller
// waiting for the workers: the loops of one model step
// follow each other closely, and a futex round trip per loop cost more than the loop on small
// models (bench/engine_bench).
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
  // ParallelFor of a fallible fn: OK, or an error of a range that failed (one of them, when
  // several do). Every range runs either way.
  absl::Status ParallelForStatus(int64_t n, int64_t grain,
                                 absl::FunctionRef<absl::Status(int64_t, int64_t)> fn);

 private:
  void Worker(int index);

  const int num_threads_;
  // Spin only when every thread can have a CPU of its own: spinning on a thread whose partner was
  // preempted just burns the CPU the partner needs.
  const bool spin_;
  std::vector<std::thread> threads_;
  // The current loop: written by the caller before it advances posted_ (release), read by workers
  // after they see the advance (acquire), and not written again until pending_ is back to 0.
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int64_t grain_ = 1;
  std::atomic<uint64_t> posted_{0};
  // Workers still running their share of the current loop.
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  // Waiting spins first (a step's loops follow each other within microseconds), then sleeps here.
  absl::Mutex mu_;
  absl::CondVar work_cv_;
  absl::CondVar done_cv_;
  int sleeping_workers_ ABSL_GUARDED_BY(mu_) = 0;
  bool caller_sleeping_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace strata

#endif  // STRATA_COMMON_THREAD_POOL_H_
