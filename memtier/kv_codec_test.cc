#include "memtier/kv_codec.h"

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/dtype.h"

namespace strata {
namespace {

constexpr KvBlockLayout kLayout{2, 16, 4, 32};

std::vector<float> Random(uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(kLayout.block_bytes() / sizeof(float));
  // Heads of very different magnitudes: per-head scales must keep small heads accurate.
  for (size_t i = 0; i < v.size(); ++i) {
    const int64_t head = (i / kLayout.head_dim) % kLayout.num_heads;
    v[i] = dist(rng) * std::pow(10.0f, static_cast<float>(head) - 2.0f);
  }
  return v;
}

std::vector<float> RoundTrip(const KvCodec& codec, const std::vector<float>& x) {
  std::vector<uint8_t> enc(codec.encoded_bytes(), 0xEE);
  codec.Encode(absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(x.data()), x.size() * 4),
               absl::MakeSpan(enc));
  std::vector<float> y(x.size(), std::nanf(""));
  codec.Decode(enc, absl::MakeSpan(reinterpret_cast<uint8_t*>(y.data()), y.size() * 4));
  return y;
}

// Largest |x| of the head that element i belongs to (within its segment).
float HeadMax(const std::vector<float>& x, size_t i) {
  const int64_t D = kLayout.head_dim, H = kLayout.num_heads, T = kLayout.block_tokens;
  const int64_t seg = i / (T * H * D), head = (i / D) % H;
  float m = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t d = 0; d < D; ++d)
      m = std::max(m, std::fabs(x[((seg * T + t) * H + head) * D + d]));
  }
  return m;
}

TEST(KvCodecTest, RawIsExact) {
  KvCodec codec(kLayout, KvCompression::kNone);
  EXPECT_EQ(codec.encoded_bytes(), kLayout.block_bytes());
  const std::vector<float> x = Random(1);
  EXPECT_EQ(RoundTrip(codec, x), x);
}

TEST(KvCodecTest, Int8IsWithinHalfAStepOfEachHeadsScale) {
  KvCodec codec(kLayout, KvCompression::kInt8);
  EXPECT_EQ(codec.encoded_bytes(),
            kLayout.block_bytes() / 4 + kLayout.num_segments * kLayout.num_heads * 4);
  const std::vector<float> x = Random(2);
  const std::vector<float> y = RoundTrip(codec, x);
  for (size_t i = 0; i < x.size(); ++i) {
    const float step = HeadMax(x, i) / 127.0f;
    ASSERT_LE(std::fabs(x[i] - y[i]), step * 0.5f * 1.0001f + 1e-30f) << i;
  }
}

TEST(KvCodecTest, Fp8IsWithinHalfAnUlpOfE4M3) {
  KvCodec codec(kLayout, KvCompression::kFp8E4M3);
  const std::vector<float> x = Random(3);
  const std::vector<float> y = RoundTrip(codec, x);
  for (size_t i = 0; i < x.size(); ++i) {
    const float scale = HeadMax(x, i) / kF8E4M3Max;
    // Normals: 3 mantissa bits, so within 2^-4 relative; subnormals: within half of 2^-9 * scale.
    const float tol = std::max(std::fabs(x[i]) / 16.0f, scale * std::ldexp(1.0f, -10)) * 1.0001f;
    ASSERT_LE(std::fabs(x[i] - y[i]), tol) << i;
  }
}

TEST(KvCodecTest, AllZeroHeadsStayZero) {
  for (KvCompression c : {KvCompression::kInt8, KvCompression::kFp8E4M3}) {
    KvCodec codec(kLayout, c);
    std::vector<float> x(kLayout.block_bytes() / 4, 0.0f);
    EXPECT_EQ(RoundTrip(codec, x), x);
  }
}

TEST(KvCodecTest, LayoutIdsDifferByEncodingAndShape) {
  const uint32_t a = KvCodec(kLayout, KvCompression::kNone).payload_layout();
  const uint32_t b = KvCodec(kLayout, KvCompression::kInt8).payload_layout();
  const uint32_t c = KvCodec(kLayout, KvCompression::kFp8E4M3).payload_layout();
  const uint32_t d = KvCodec(KvBlockLayout{2, 16, 4, 64}, KvCompression::kNone).payload_layout();
  EXPECT_NE(a, b);
  EXPECT_NE(b, c);
  EXPECT_NE(a, d);
  KvCompression parsed;
  EXPECT_TRUE(ParseKvCompression("fp8", &parsed));
  EXPECT_EQ(parsed, KvCompression::kFp8E4M3);
  EXPECT_FALSE(ParseKvCompression("fp4", &parsed));
}

}  // namespace
}  // namespace strata
