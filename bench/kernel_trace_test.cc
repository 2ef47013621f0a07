#include "bench/kernel_trace.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(KernelTraceTest, ShortNamesKeepTheFunctionAndItsTemplateArguments) {
  // Mangled names as nvcc emits them for kernels in anonymous namespaces.
  EXPECT_EQ(
      ShortKernelName("_ZN6strata3gpu39_GLOBAL__N__c77b7fcf_7_gemv_cu_66765ef210GemvKernelIffLi1E"
                      "Li2ELi8ELi2ELb1ELb1EEEvNS0_8GemvArgsE"),
      "GemvKernel<float, float, 1, 2, 8, 2, true, true>");
  EXPECT_EQ(ShortKernelName("strata::gpu::(anonymous namespace)::PrepareKernel(strata::gpu::"
                            "SampleArgs, strata::gpu::(anonymous namespace)::Layout)"),
            "PrepareKernel");
  // Qualified template arguments stay whole; names that are not C++ stay as they are.
  EXPECT_EQ(ShortKernelName("void cub::detail::Scan<cub::Policy<int>, (bool)1>(int*)"),
            "Scan<cub::Policy<int>, (bool)1>");
  EXPECT_EQ(ShortKernelName("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64"),
            "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64");
  EXPECT_EQ(ShortKernelName(std::string(300, 'k')).size(), 200u);
}

TEST(KernelTraceTest, SummaryCountsOverlapsOnceAndGapsAsIdle) {
  // a [0, 10), b [8, 20) overlapping a (a programmatic dependent launch), idle [20, 25), a again
  // [25, 30), c inside b [12, 14).
  const std::vector<KernelRecord> records = {
      {"b", 8000, 20000}, {"a", 0, 10000}, {"a", 25000, 30000}, {"c", 12000, 14000}};
  const KernelTraceSummary s = Summarize(records);
  EXPECT_EQ(s.kernels, 4);
  EXPECT_DOUBLE_EQ(s.span_us, 30.0);
  EXPECT_DOUBLE_EQ(s.busy_us, 25.0);
  EXPECT_DOUBLE_EQ(s.idle_us, 5.0);
  ASSERT_EQ(s.by_name.size(), 3u);
  EXPECT_EQ(s.by_name[0].name, "a");  // 15 us over 2 launches
  EXPECT_EQ(s.by_name[0].count, 2);
  EXPECT_DOUBLE_EQ(s.by_name[0].total_us, 15.0);
  EXPECT_EQ(s.by_name[1].name, "b");
  EXPECT_DOUBLE_EQ(s.by_name[1].total_us, 12.0);
  EXPECT_EQ(s.by_name[2].name, "c");
  EXPECT_EQ(Summarize({}).kernels, 0);
}

// Without the library, Start says so and nothing else is touched (where CUPTI loads, tracing
// itself is checked on a GPU machine: gpu_bench's traces).
TEST(KernelTraceTest, StartingWithoutCuptiSaysWhy) {
  auto t = KernelTrace::Start("libcupti-absent.so.13");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kUnavailable) << t.status();
#ifdef STRATA_HAVE_CUDA
  EXPECT_NE(t.status().message().find("libcupti-absent.so.13"), std::string::npos) << t.status();
#endif
}

}  // namespace
}  // namespace strata
