#include "common/thread_pool.h"

#include <atomic>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(ThreadPoolTest, CoversTheRangeExactlyOnceWithGrainAlignedCuts) {
  for (int threads : {1, 2, 4}) {
    ThreadPool pool(threads);
    for (int64_t n : {1, 7, 64, 1000, 1001}) {
      std::vector<std::atomic<int>> hits(n);
      for (auto& h : hits) h = 0;
      pool.ParallelFor(n, 8, [&](int64_t b, int64_t e) {
        EXPECT_EQ(b % 8, 0);
        for (int64_t i = b; i < e; ++i) ++hits[i];
      });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i], 1) << threads << " " << n << " " << i;
    }
  }
}

TEST(ThreadPoolTest, ManyRoundsReuseTheWorkers) {
  ThreadPool pool(3);
  std::atomic<int64_t> sum{0};
  for (int round = 0; round < 500; ++round) {
    pool.ParallelFor(100, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) sum += i;
    });
  }
  EXPECT_EQ(sum.load(), 500 * 4950);
}

TEST(ThreadPoolTest, ParallelForStatusRunsEveryRangeAndReportsAFailure) {
  ThreadPool pool(3);
  std::atomic<int64_t> covered{0};
  const absl::Status s = pool.ParallelForStatus(1000, 10, [&](int64_t begin, int64_t end) {
    covered += end - begin;
    return begin <= 500 && 500 < end ? absl::InternalError("range with 500") : absl::OkStatus();
  });
  EXPECT_EQ(covered.load(), 1000);
  EXPECT_TRUE(absl::IsInternal(s)) << s;
  EXPECT_TRUE(
      pool.ParallelForStatus(1000, 10, [](int64_t, int64_t) { return absl::OkStatus(); }).ok());
}

}  // namespace
}  // namespace strata
