#include "kernels/dtype.h"

#include <cmath>
#include <limits>

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(DTypeTest, NamesRoundTrip) {
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI64, DType::kF8E4M3}) {
    DType back;
    ASSERT_TRUE(ParseDType(DTypeName(t), &back));
    EXPECT_EQ(back, t);
  }
  DType unused;
  EXPECT_FALSE(ParseDType("F128", &unused));
  EXPECT_EQ(DTypeBytes(DType::kBF16), 2);
  EXPECT_EQ(DTypeBytes(DType::kI64), 8);
}

TEST(DTypeTest, EveryHalfRoundTripsThroughFloat) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = F16ToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(F16ToFloat(FloatToF16(f))));
      continue;
    }
    EXPECT_EQ(FloatToF16(f), h) << std::hex << h;
  }
}

TEST(DTypeTest, HalfKnownValuesAndRounding) {
  EXPECT_EQ(F16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(F16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(F16ToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(F16ToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(FloatToF16(65520.0f), 0x7c00);                          // rounds to infinity
  EXPECT_EQ(FloatToF16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie to even (down)
  EXPECT_EQ(FloatToF16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie to even (up)
  EXPECT_EQ(FloatToF16(std::ldexp(1.0f, -26)), 0x0000);  // below half the smallest subnormal
}

TEST(DTypeTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(std::bit_cast<float>(0x3f808000u)), 0x3f80);  // tie, even stays
  EXPECT_EQ(FloatToBf16(std::bit_cast<float>(0x3f818000u)), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(FloatToBf16(std::bit_cast<float>(0x3f808001u)), 0x3f81);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = Bf16ToFloat(static_cast<uint16_t>(h));
    if (!std::isnan(f)) {
      EXPECT_EQ(FloatToBf16(f), h);
    }
  }
}

TEST(DTypeTest, F8E4M3KnownValues) {
  EXPECT_EQ(F8E4M3ToFloat(0x38), 1.0f);
  EXPECT_EQ(F8E4M3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(F8E4M3ToFloat(0xfe), -448.0f);
  EXPECT_EQ(F8E4M3ToFloat(0x08), 0.015625f);             // smallest normal, 2^-6
  EXPECT_EQ(F8E4M3ToFloat(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_TRUE(std::isnan(F8E4M3ToFloat(0x7f)));
  EXPECT_EQ(FloatToF8E4M3(1000.0f), 0x7e);  // saturates
  EXPECT_EQ(FloatToF8E4M3(-1000.0f), 0xfe);
  EXPECT_EQ(FloatToF8E4M3(1.0f + 1.0f / 16), 0x38);       // tie to even (down)
  EXPECT_EQ(FloatToF8E4M3(1.0f + 3.0f / 16), 0x3a);       // tie to even (up)
  EXPECT_EQ(FloatToF8E4M3(std::ldexp(1.0f, -11)), 0x00);  // below half the smallest subnormal
  EXPECT_EQ(FloatToF8E4M3(std::ldexp(3.0f, -10)), 0x02);  // 1.5 subnormal steps: tie to even
  EXPECT_EQ(FloatToF8E4M3(0.0156249f), 0x08);             // rounds up into the normals
  EXPECT_EQ(FloatToF8E4M3(std::numeric_limits<float>::quiet_NaN()) & 0x7f, 0x7f);
}

TEST(DTypeTest, F8E4M3RoundTripsEveryValueAndRoundsToNearest) {
  for (int v = 0; v < 256; ++v) {
    const float f = F8E4M3ToFloat(static_cast<uint8_t>(v));
    if (std::isnan(f)) continue;
    EXPECT_EQ(FloatToF8E4M3(f), v) << v;
  }
  // Between neighbours, the nearer one wins.
  for (int v = 0x01; v < 0x7e; ++v) {
    const float lo = F8E4M3ToFloat(static_cast<uint8_t>(v));
    const float hi = F8E4M3ToFloat(static_cast<uint8_t>(v + 1));
    EXPECT_EQ(FloatToF8E4M3(lo + (hi - lo) * 0.3f), v);
    EXPECT_EQ(FloatToF8E4M3(lo + (hi - lo) * 0.7f), v + 1);
  }
}

}  // namespace
}  // namespace strata
