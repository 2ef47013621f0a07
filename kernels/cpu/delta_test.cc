#include "kernels/delta.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/delta_test_util.h"

namespace strata {
namespace {

using delta_test::Pack;
using delta_test::Packed;

std::vector<float> Unpack(const PackedDelta& d) {
  std::vector<float> out(d.rows * d.cols, std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(UnpackDeltaCpu(d, 0, d.rows, out.data(), /*accumulate=*/false).ok());
  return out;
}

std::vector<float> RandomVector(std::mt19937* rng, int64_t n, float stddev) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(*rng);
  return v;
}

TEST(DeltaPackTest, ExactlyRepresentableRowsRoundTrip) {
  // Kept values are multiples of 0.25 up to 7 * 0.25: 4-bit codes hold them exactly.
  const std::vector<float> delta = {0.25f, -1.75f, 0.0f, 0.5f,    // keeps -1.75 and 0.5
                                    0.0f,  0.0f,   1.0f, -0.25f,  // keeps 1.0 and -0.25
                                    0.0f,  0.75f,  0.0f, 0.0f,    // keeps 0.75 and (tie) column 0
                                    1.5f,  0.0f,   0.0f, -1.25f};
  Packed p = Pack(delta, 1, 16, 4, /*sparse=*/true);
  EXPECT_FLOAT_EQ(p.scale[0], 0.25f);
  const std::vector<float> want = {0, -1.75f, 0, 0.5f, 0,    0, 1.0f, -0.25f,
                                   0, 0.75f,  0, 0,    1.5f, 0, 0,    -1.25f};
  EXPECT_EQ(Unpack(p.view), want);

  Packed dense = Pack(delta, 1, 16, 8, /*sparse=*/false);
  const std::vector<float> back = Unpack(dense.view);
  for (int i = 0; i < 16; ++i) EXPECT_NEAR(back[i], delta[i], 1.75f / 127 / 2 + 1e-7f) << i;
}

TEST(DeltaPackTest, ImportanceDecidesWhichTwoOfFourAreKept) {
  const std::vector<float> delta = {1.0f, 0.9f, 0.8f, 0.7f, 0, 0, 0, 0};
  const std::vector<float> importance = {0.1f, 0.1f, 2.0f, 2.0f, 1, 1, 1, 1};
  Packed plain = Pack(delta, 1, 8, 8, true);
  Packed weighted = Pack(delta, 1, 8, 8, true, importance.data());
  const std::vector<float> a = Unpack(plain.view), b = Unpack(weighted.view);
  EXPECT_NE(a[0], 0.0f);
  EXPECT_NE(a[1], 0.0f);
  EXPECT_EQ(a[2], 0.0f);
  EXPECT_EQ(b[0], 0.0f);
  EXPECT_EQ(b[1], 0.0f);
  EXPECT_NE(b[2], 0.0f);
  EXPECT_NE(b[3], 0.0f);
}

TEST(DeltaPackTest, ZeroRowsPackToZero) {
  Packed p = Pack(std::vector<float>(2 * 8, 0.0f), 2, 8, 2, true);
  EXPECT_EQ(p.scale[0], 0.0f);
  EXPECT_EQ(Unpack(p.view), std::vector<float>(16, 0.0f));
}

struct Shape {
  int64_t rows, cols;
};

// Every shape, bit width and sparsity: the unpacked delta keeps at most 2 of each 4 (2:4), and its
// error against the kept values is within what the bit width allows.
TEST(DeltaPackTest, SweepReconstructionError) {
  std::mt19937 rng(7);
  for (Shape s : {Shape{1, 8}, Shape{3, 24}, Shape{17, 520}, Shape{40, 1032}}) {
    for (int bits : {2, 4, 8}) {
      for (bool sparse : {true, false}) {
        SCOPED_TRACE(testing::Message() << s.rows << "x" << s.cols << " bits " << bits
                                        << (sparse ? " 2:4" : " dense"));
        const std::vector<float> delta = RandomVector(&rng, s.rows * s.cols, 0.01f);
        Packed p = Pack(delta, s.rows, s.cols, bits, sparse);
        const std::vector<float> back = Unpack(p.view);
        double err = 0, norm = 0;
        for (int64_t r = 0; r < s.rows; ++r) {
          for (int64_t g = 0; g < s.cols / 4; ++g) {
            int nonzero = 0;
            for (int c = 0; c < 4; ++c) {
              const int64_t i = r * s.cols + 4 * g + c;
              ASSERT_TRUE(std::isfinite(back[i]));
              if (back[i] != 0) ++nonzero;
              // Compare with what was kept: a pruned value contributes nothing to either.
              if (!sparse || back[i] != 0) {
                err += (back[i] - delta[i]) * (back[i] - delta[i]);
                norm += delta[i] * delta[i];
              }
            }
            if (sparse) {
              EXPECT_LE(nonzero, 2);
            }
          }
        }
        const double relative = std::sqrt(err / norm);
        const double bound = bits == 8 ? 0.01 : bits == 4 ? 0.15 : 0.6;
        EXPECT_LT(relative, bound);
      }
    }
  }
}

// y += x · Δᵀ against a float64 reference on the unpacked delta, over shapes, bit widths, row
// subsets, strides and column splits, with each instruction set the CPU has; rows outside the
// subset stay bitwise unchanged.
class DeltaMatMulIsaTest : public ::testing::TestWithParam<const char*> {
 protected:
  void TearDown() override { SetDeltaCpuIsaForTesting("best"); }
};

TEST_P(DeltaMatMulIsaTest, SweepMatchesUnpackedReference) {
  if (!SetDeltaCpuIsaForTesting(GetParam())) GTEST_SKIP() << "this CPU lacks " << GetParam();
  std::mt19937 rng(11);
  for (Shape s : {Shape{1, 8}, Shape{5, 40}, Shape{33, 520}, Shape{64, 1544}}) {
    for (int bits : {2, 4, 8}) {
      for (bool sparse : {true, false}) {
        for (int64_t m : {1, 3, 9, 40}) {
          SCOPED_TRACE(testing::Message() << s.rows << "x" << s.cols << " bits " << bits
                                          << (sparse ? " 2:4" : " dense") << " m " << m);
          Packed p = Pack(RandomVector(&rng, s.rows * s.cols, 0.02f), s.rows, s.cols, bits, sparse);
          const std::vector<float> dense = Unpack(p.view);
          const int64_t total_rows = 2 * m + 4, ldx = s.cols + 3, ldy = s.rows + 5;
          const std::vector<float> x = RandomVector(&rng, total_rows * ldx, 1.0f);
          const std::vector<float> y0 = RandomVector(&rng, total_rows * ldy, 1.0f);
          // Every other row, from the back: a scattered subset.
          std::vector<int32_t> rows;
          for (int64_t i = 0; i < m; ++i)
            rows.push_back(static_cast<int32_t>(total_rows - 1 - 2 * i));
          std::vector<float> y = y0;
          DeltaMatMulParams mp;
          mp.m = m;
          mp.rows = rows.data();
          mp.x = x.data();
          mp.ldx = ldx;
          mp.delta = p.view;
          mp.y = y.data();
          mp.ldy = ldy;
          // Two column ranges, as two threads would run them.
          if (s.rows / 2 > 0) {
            mp.n_end = s.rows / 2;
            ASSERT_TRUE(DeltaMatMulCpu(mp).ok());
          }
          mp.n_begin = s.rows / 2;
          mp.n_end = 0;
          ASSERT_TRUE(DeltaMatMulCpu(mp).ok());
          std::vector<bool> in_subset(total_rows, false);
          for (int32_t r : rows) in_subset[r] = true;
          for (int64_t r = 0; r < total_rows; ++r) {
            for (int64_t j = 0; j < ldy; ++j) {
              const float got = y[r * ldy + j];
              if (!in_subset[r] || j >= s.rows) {
                ASSERT_EQ(got, y0[r * ldy + j]) << r << "," << j;
                continue;
              }
              double want = y0[r * ldy + j];
              for (int64_t k = 0; k < s.cols; ++k) {
                want += static_cast<double>(x[r * ldx + k]) * dense[j * s.cols + k];
              }
              ASSERT_NEAR(got, want, 1e-5 + 1e-5 * std::fabs(want)) << r << "," << j;
            }
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isas, DeltaMatMulIsaTest, ::testing::Values("scalar", "avx2"));

TEST(DeltaMatMulTest, BadParamsNameTheField) {
  std::vector<uint8_t> q(64), index(8);
  std::vector<float> scale(4), x(64), y(64);
  PackedDelta d{4, 12, 4, true, q.data(), index.data(), scale.data()};
  DeltaMatMulParams p;
  p.m = 1;
  p.x = x.data();
  p.y = y.data();
  p.delta = d;
  EXPECT_NE(DeltaMatMulCpu(p).message().find("cols must be a positive multiple of 8"),
            absl::string_view::npos);
  p.delta.cols = 8;
  p.delta.bits = 3;
  EXPECT_NE(DeltaMatMulCpu(p).message().find("bits must be 2, 4 or 8"), absl::string_view::npos);
  p.delta.bits = 4;
  p.delta.index = nullptr;
  EXPECT_NE(DeltaMatMulCpu(p).message().find("index is null"), absl::string_view::npos);
  p.delta.index = index.data();
  p.n_end = 5;
  EXPECT_NE(DeltaMatMulCpu(p).message().find("n_begin, n_end"), absl::string_view::npos);
  p.n_end = 0;
  const int32_t negative = -1;
  p.rows = &negative;
  EXPECT_NE(DeltaMatMulCpu(p).message().find("rows[0] = -1"), absl::string_view::npos);
  p.rows = nullptr;
  EXPECT_TRUE(DeltaMatMulCpu(p).ok());

  DeltaPackParams pack;
  pack.rows = 1;
  pack.cols = 8;
  pack.delta = x.data();
  pack.q = q.data();
  pack.index = index.data();
  pack.scale = scale.data();
  EXPECT_NE(PackDeltaCpu(pack).message().find("workspace"), absl::string_view::npos);
  std::vector<float> workspace(16);
  pack.workspace = workspace.data();
  pack.workspace_bytes = 64;
  std::vector<float> importance(8, 1.0f);
  importance[3] = -1;
  pack.column_importance = importance.data();
  EXPECT_NE(PackDeltaCpu(pack).message().find("column_importance[3]"), absl::string_view::npos);
}

}  // namespace
}  // namespace strata
