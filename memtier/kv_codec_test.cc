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
// KvCodec(kLayout, kNone).payload_layout() as computed before layouts named an element type.
constexpr uint32_t kF32LayoutIdBeforeDTypes = 0x001557b9;

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

TEST(KvCodecTest, LayoutIdsDifferByElementTypeAndF32KeepsItsOldId) {
  KvBlockLayout bf16 = kLayout, f16 = kLayout;
  bf16.dtype = DType::kBF16;
  f16.dtype = DType::kF16;
  const uint32_t a = KvCodec(kLayout, KvCompression::kNone).payload_layout();
  const uint32_t b = KvCodec(bf16, KvCompression::kNone).payload_layout();
  const uint32_t c = KvCodec(f16, KvCompression::kNone).payload_layout();
  EXPECT_NE(a, b);
  EXPECT_NE(a, c);
  EXPECT_NE(b, c);
  // Disk files written before layouts had an element type stay readable: an f32 layout's id is
  // the one its shape alone gave then.
  EXPECT_EQ(a, kF32LayoutIdBeforeDTypes);
}

// A GPU engine's blocks: f16 or bf16 elements. Raw stays exact; quantized values come back within
// the quantization bound plus half an ulp of the element type.
TEST(KvCodecTest, SixteenBitElementsRoundTrip) {
  for (DType dt : {DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(DTypeName(dt));
    KvBlockLayout layout = kLayout;
    layout.dtype = dt;
    const std::vector<float> x = Random(4);
    std::vector<uint8_t> raw(layout.block_bytes());
    ASSERT_EQ(raw.size(), x.size() * 2);
    std::vector<float> xr(x.size());  // x as the element type holds it
    for (size_t i = 0; i < x.size(); ++i) {
      const uint16_t h = dt == DType::kBF16 ? FloatToBf16(x[i]) : FloatToF16(x[i]);
      std::memcpy(raw.data() + 2 * i, &h, 2);
      xr[i] = dt == DType::kBF16 ? Bf16ToFloat(h) : F16ToFloat(h);
    }
    const float rel_ulp = dt == DType::kBF16 ? std::ldexp(1.0f, -8) : std::ldexp(1.0f, -11);
    for (KvCompression c : {KvCompression::kNone, KvCompression::kInt8, KvCompression::kFp8E4M3}) {
      SCOPED_TRACE(KvCompressionName(c));
      KvCodec codec(layout, c);
      EXPECT_EQ(codec.raw_bytes(), static_cast<int64_t>(raw.size()));
      if (c != KvCompression::kNone) {
        EXPECT_EQ(codec.encoded_bytes(),
                  layout.block_bytes() / 2 + layout.num_segments * layout.num_heads * 4);
      }
      std::vector<uint8_t> enc(codec.encoded_bytes(), 0xEE);
      codec.Encode(raw, absl::MakeSpan(enc));
      std::vector<uint8_t> back(raw.size(), 0xFF);
      codec.Decode(enc, absl::MakeSpan(back));
      if (c == KvCompression::kNone) {
        EXPECT_EQ(back, raw);
        continue;
      }
      for (size_t i = 0; i < x.size(); ++i) {
        uint16_t h;
        std::memcpy(&h, back.data() + 2 * i, 2);
        const float y = dt == DType::kBF16 ? Bf16ToFloat(h) : F16ToFloat(h);
        const float scale = HeadMax(xr, i) / (c == KvCompression::kInt8 ? 127.0f : kF8E4M3Max);
        const float quant = c == KvCompression::kInt8
                                ? scale * 0.5f
                                : std::max(std::fabs(xr[i]) / 16.0f, scale * std::ldexp(1.0f, -10));
        // f16's subnormals (below 2^-14) are spaced 2^-24 apart.
        const float tol = (quant + std::fabs(y) * rel_ulp) * 1.0001f + std::ldexp(1.0f, -24);
        ASSERT_LE(std::fabs(xr[i] - y), tol) << i;
      }
    }
  }
}

}  // namespace
}  // namespace strata
