// MatMulCpu against a float64 reference over shapes and weight dtypes, on fresh random inputs with
// the output poisoned first.
#include "kernels/matmul.h"

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

class MatMulIsaTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    if (!SetMatMulCpuIsaForTesting(GetParam())) GTEST_SKIP() << "CPU lacks " << GetParam();
  }
  void TearDown() override { SetMatMulCpuIsaForTesting("best"); }
};

INSTANTIATE_TEST_SUITE_P(Isas, MatMulIsaTest, ::testing::Values("scalar", "avx2", "avx512"));

TEST_P(MatMulIsaTest, MatchesFloat64ReferenceAcrossShapesAndDtypes) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  struct Shape {
    int64_t m, n, k;
  };
  for (const Shape s : {Shape{1, 1, 1}, Shape{1, 130, 64}, Shape{3, 65, 33}, Shape{17, 200, 96},
                        Shape{64, 64, 256}}) {
    for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
      for (bool with_bias : {false, true}) {
        SCOPED_TRACE(::testing::Message() << s.m << "x" << s.n << "x" << s.k << " " << DTypeName(dt)
                                          << " bias " << with_bias);
        std::vector<float> x(s.m * s.k), wf(s.n * s.k), bias(s.n);
        for (float& v : x) v = dist(rng);
        for (float& v : bias) v = dist(rng);
        std::vector<uint16_t> w16(s.n * s.k);
        for (int64_t i = 0; i < s.n * s.k; ++i) {
          const float v = dist(rng);
          if (dt == DType::kBF16) {
            w16[i] = FloatToBf16(v);
            wf[i] = Bf16ToFloat(w16[i]);
          } else if (dt == DType::kF16) {
            w16[i] = FloatToF16(v);
            wf[i] = F16ToFloat(w16[i]);
          } else {
            wf[i] = v;
          }
        }
        std::vector<float> y(s.m * s.n, std::numeric_limits<float>::quiet_NaN());
        MatMulParams p;
        p.m = s.m;
        p.n = s.n;
        p.k = s.k;
        p.x = x.data();
        p.w = dt == DType::kF32 ? static_cast<const void*>(wf.data()) : w16.data();
        p.w_dtype = dt;
        p.bias = with_bias ? bias.data() : nullptr;
        p.y = y.data();
        std::vector<char> ws(MatMulCpuWorkspaceBytes(p));
        ASSERT_TRUE(MatMulCpu(p, ws.data(), ws.size()).ok());
        for (int64_t i = 0; i < s.m; ++i) {
          for (int64_t j = 0; j < s.n; ++j) {
            double ref = with_bias ? bias[j] : 0.0, mag = std::fabs(ref);
            for (int64_t l = 0; l < s.k; ++l) {
              ref += static_cast<double>(x[i * s.k + l]) * wf[j * s.k + l];
              mag += std::fabs(static_cast<double>(x[i * s.k + l]) * wf[j * s.k + l]);
            }
            ASSERT_NEAR(y[i * s.n + j], ref, 1e-5 * mag + 1e-6) << i << "," << j;
          }
        }
      }
    }
  }
}

TEST(MatMulCpuTest, ColumnRangeComputesOnlyThoseColumns) {
  std::vector<float> x = {1, 2}, w = {1, 0, 0, 1, 1, 1, 2, 2};  // n=4, k=2
  std::vector<float> y(4, -7.0f);
  MatMulParams p;
  p.m = 1;
  p.n = 4;
  p.k = 2;
  p.x = x.data();
  p.w = w.data();
  p.y = y.data();
  p.n_begin = 1;
  p.n_end = 3;
  ASSERT_TRUE(MatMulCpu(p, nullptr, 0).ok());
  EXPECT_EQ(y, (std::vector<float>{-7, 2, 3, -7}));
}

TEST(MatMulCpuTest, BadParametersAreRefused) {
  MatMulParams p;
  p.m = 1;
  p.n = 0;
  p.k = 2;
  EXPECT_EQ(MatMulCpu(p, nullptr, 0).code(), absl::StatusCode::kInvalidArgument);
  std::vector<float> buf(8);
  p.n = 2;
  p.x = buf.data();
  p.w = buf.data();
  p.y = buf.data() + 4;
  p.w_dtype = DType::kI8;
  EXPECT_NE(MatMulCpu(p, nullptr, 0).message().find("unsupported weight dtype I8"),
            absl::string_view::npos);
  p.w_dtype = DType::kBF16;
  p.m = 16;  // large enough for the BLAS path, which needs a workspace for 16-bit weights
  std::vector<float> big(16 * 2);
  p.x = big.data();
  p.y = big.data();
  EXPECT_NE(MatMulCpu(p, nullptr, 0).message().find("workspace"), absl::string_view::npos);
}

}  // namespace
}  // namespace strata
