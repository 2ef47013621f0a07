#include "common/thread_pool.h"

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

}  // namespace

ThreadPool::ThreadPool(int num_threads) : num_threads_(std::max(1, num_threads)) {
  for (int i = 1; i < num_threads_; ++i) threads_.emplace_back([this, i] { Worker(i); });
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

bool ThreadPool::WorkReady(WaitArg* a) {
  a->pool->mu_.AssertHeld();
  return a->pool->stop_ || a->pool->generation_ != a->seen;
}

void ThreadPool::Worker(int index) {
  uint64_t seen = 0;
  while (true) {
    const std::function<void(int64_t, int64_t)>* fn;
    int64_t n, grain;
    {
      absl::MutexLock lock(&mu_);
      WaitArg arg{this, seen};
      mu_.Await(absl::Condition(&ThreadPool::WorkReady, &arg));
      if (stop_) return;
      seen = generation_;
      fn = fn_;
      n = n_;
      grain = grain_;
    }
    const auto [b, e] = Share(n, grain, index, num_threads_);
    if (b < e) (*fn)(b, e);
    absl::MutexLock lock(&mu_);
    --pending_;
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (num_threads_ == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  {
    absl::MutexLock lock(&mu_);
    fn_ = &fn;
    n_ = n;
    grain_ = grain;
    pending_ = num_threads_ - 1;
    ++generation_;
  }
  const auto [b, e] = Share(n, grain, 0, num_threads_);
  if (b < e) fn(b, e);
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](ThreadPool* p) {
        p->mu_.AssertHeld();
        return p->pending_ == 0;
      },
      this));
  fn_ = nullptr;
}

}  // namespace strata
