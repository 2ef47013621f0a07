#include "kernels/elementwise.h"

#include <cmath>
#include <limits>
#include <numbers>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

TEST(RmsNormCpuTest, MatchesDefinitionWithStrides) {
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> dist(0.0f, 2.0f);
  for (int64_t dim : {1, 7, 64, 1000}) {
    const int64_t rows = 3, stride = dim + 5;
    std::vector<float> x(rows * stride), w(dim), out(rows * dim, kNaN);
    for (float& v : x) v = dist(rng);
    for (float& v : w) v = dist(rng);
    ASSERT_TRUE(RmsNormCpu({rows, dim, 1e-5f, x.data(), stride, w.data(), out.data(), 0}).ok());
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += double(x[r * stride + i]) * x[r * stride + i];
      const double inv = 1.0 / std::sqrt(ss / dim + 1e-5);
      for (int64_t i = 0; i < dim; ++i) {
        const double want = x[r * stride + i] * inv * w[i];
        ASSERT_NEAR(out[r * dim + i], want, 1e-5 * std::fabs(want) + 1e-6);
      }
    }
  }
}

TEST(SiluMulCpuTest, MatchesDefinition) {
  const std::vector<float> in = {0.0f, 1.0f, -2.0f, 3.0f, 4.0f, 5.0f};  // rows=1, dim=3
  std::vector<float> out(3, kNaN);
  ASSERT_TRUE(SiluMulCpu({1, 3, in.data(), out.data()}).ok());
  for (int i = 0; i < 3; ++i) {
    const double g = in[i];
    EXPECT_NEAR(out[i], g / (1 + std::exp(-g)) * in[3 + i], 1e-6);
  }
}

TEST(RopeCpuTest, RotatesHalvesByPositionAngle) {
  const int64_t d = 8, half = 4;
  std::vector<float> inv(half);
  ComputeRopeInvFreq(d, 10000.0, {}, inv.data());
  for (int64_t i = 0; i < half; ++i) EXPECT_FLOAT_EQ(inv[i], std::pow(10000.0, -2.0 * i / d));
  std::mt19937 rng(7);
  std::normal_distribution<float> dist;
  std::vector<float> q(2 * 2 * d), k(2 * 1 * d);
  for (float& v : q) v = dist(rng);
  for (float& v : k) v = dist(rng);
  const std::vector<float> q0 = q, k0 = k;
  const std::vector<int32_t> pos = {0, 1000};
  RopeParams p;
  p.num_tokens = 2;
  p.num_q_heads = 2;
  p.num_k_heads = 1;
  p.head_dim = d;
  p.positions = pos.data();
  p.inv_freq = inv.data();
  p.q = q.data();
  p.k = k.data();
  ASSERT_TRUE(RopeCpu(p).ok());
  // Position 0 is the identity.
  for (int64_t i = 0; i < 2 * d; ++i) EXPECT_FLOAT_EQ(q[i], q0[i]);
  for (int64_t i = 0; i < d; ++i) EXPECT_FLOAT_EQ(k[i], k0[i]);
  // Position 1000, head 1 of q.
  const float* x0 = &q0[(1 * 2 + 1) * d];
  const float* x = &q[(1 * 2 + 1) * d];
  for (int64_t i = 0; i < half; ++i) {
    const double a = 1000.0 * inv[i];
    EXPECT_NEAR(x[i], x0[i] * std::cos(a) - x0[i + half] * std::sin(a), 1e-5);
    EXPECT_NEAR(x[i + half], x0[i + half] * std::cos(a) + x0[i] * std::sin(a), 1e-5);
  }
}

TEST(RopeCpuTest, Llama3ScalingKeepsHighAndSlowsLowFrequencies) {
  const int64_t d = 128;
  std::vector<float> plain(d / 2), scaled(d / 2);
  ComputeRopeInvFreq(d, 500000.0, {}, plain.data());
  RopeScalingParams s;
  s.type = RopeScalingParams::Type::kLlama3;
  s.factor = 8;
  s.low_freq_factor = 1;
  s.high_freq_factor = 4;
  s.original_max_position_embeddings = 8192;
  ComputeRopeInvFreq(d, 500000.0, s, scaled.data());
  for (int64_t i = 0; i < d / 2; ++i) {
    const double wavelen = 2 * std::numbers::pi / plain[i];
    if (wavelen < 8192.0 / 4) {
      EXPECT_FLOAT_EQ(scaled[i], plain[i]) << i;  // high frequency: unchanged
    } else if (wavelen > 8192.0) {
      EXPECT_FLOAT_EQ(scaled[i], plain[i] / 8) << i;  // low frequency: divided by factor
    } else {
      EXPECT_LT(scaled[i], plain[i]);  // blended band
      EXPECT_GT(scaled[i], plain[i] / 8);
    }
  }
  RopeScalingParams linear;
  linear.type = RopeScalingParams::Type::kLinear;
  linear.factor = 4;
  std::vector<float> lin(d / 2);
  ComputeRopeInvFreq(d, 500000.0, linear, lin.data());
  EXPECT_FLOAT_EQ(lin[3], plain[3] / 4);
}

TEST(ElementwiseCpuTest, BadShapesAreRefused) {
  EXPECT_FALSE(RmsNormCpu({1, 0, 1e-5f, nullptr, 0, nullptr, nullptr, 0}).ok());
  RopeParams p;
  p.num_tokens = 1;
  p.head_dim = 7;
  EXPECT_EQ(RopeCpu(p).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace strata
