#include "common/thread_pool.h"

#include <sched.h>

#include <algorithm>

namespace strata {
namespace {

// The share [begin, end) of worker `index` of `parts`.
std::pair<int64_t, int64_t> Share(int64_t n, int64_t grain, int index, int parts) {
  const int64_t units = (n + grain - 1) / grain;
  const int64_t b = units * index / parts * grain;
  const int64_t e = std::min(n, units * (index + 1) / parts * grain);
  return {b, e};
}

// Spins until `cond()` holds, for a bounded time (about 20 to 100 us, depending on the CPU's
// pause instruction); false if it never did.
template <typename Cond>
bool SpinUntil(const Cond& cond, bool spin) {
  for (int i = 0; spin && i < 2048; ++i) {
    if (cond()) return true;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }
  return cond();
}

// CPUs this process may run on (its affinity mask).
int UsableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return CPU_COUNT(&set);
}

}  // namespace

ThreadPool::ThreadPool(int num_threads)
    : num_threads_(std::max(1, num_threads)), spin_(num_threads_ <= UsableCpus()) {
  for (int i = 1; i < num_threads_; ++i) threads_.emplace_back([this, i] { Worker(i); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true, std::memory_order_seq_cst);
  {
    absl::MutexLock lock(&mu_);
    work_cv_.SignalAll();
  }
  for (std::thread& t : threads_) t.join();
}

void ThreadPool::Worker(int index) {
  uint64_t seen = 0;
  const auto ready = [&] {
    return posted_.load(std::memory_order_acquire) != seen || stop_.load(std::memory_order_acquire);
  };
  while (true) {
    if (!SpinUntil(ready, spin_)) {
      absl::MutexLock lock(&mu_);
      ++sleeping_workers_;
      while (!ready()) work_cv_.Wait(&mu_);
      --sleeping_workers_;
    }
    if (stop_.load(std::memory_order_acquire)) return;
    // The caller posts the next loop only after this worker finished this one, so posted_ moved
    // exactly once.
    seen = posted_.load(std::memory_order_acquire);
    const auto [b, e] = Share(n_, grain_, index, num_threads_);
    if (b < e) (*fn_)(b, e);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      absl::MutexLock lock(&mu_);
      if (caller_sleeping_) done_cv_.Signal();
    }
  }
}

absl::Status ThreadPool::ParallelForStatus(int64_t n, int64_t grain,
                                           absl::FunctionRef<absl::Status(int64_t, int64_t)> fn) {
  absl::Mutex mu;
  absl::Status status;
  ParallelFor(n, grain, [&](int64_t begin, int64_t end) {
    absl::Status s = fn(begin, end);
    if (!s.ok()) {
      absl::MutexLock lock(&mu);
      status.Update(s);
    }
  });
  return status;
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (num_threads_ == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  fn_ = &fn;
  n_ = n;
  grain_ = grain;
  pending_.store(num_threads_ - 1, std::memory_order_relaxed);
  posted_.fetch_add(1, std::memory_order_seq_cst);
  {
    // A worker about to sleep re-checks posted_ under the lock, so it either sees the new loop or
    // is asleep by the time this signal comes.
    absl::MutexLock lock(&mu_);
    if (sleeping_workers_ > 0) work_cv_.SignalAll();
  }
  const auto [b, e] = Share(n, grain, 0, num_threads_);
  if (b < e) fn(b, e);
  const auto done = [this] { return pending_.load(std::memory_order_acquire) == 0; };
  if (!SpinUntil(done, spin_)) {
    absl::MutexLock lock(&mu_);
    caller_sleeping_ = true;
    while (!done()) done_cv_.Wait(&mu_);
    caller_sleeping_ = false;
  }
  fn_ = nullptr;
}

}  // namespace strata
