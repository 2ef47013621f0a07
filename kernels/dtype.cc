#include "kernels/dtype.h"

#include <cmath>
#include <limits>

namespace strata {

int DTypeBytes(DType t) {
  switch (t) {
    case DType::kF64:
    case DType::kI64:
      return 8;
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
    case DType::kI16:
      return 2;
    case DType::kI8:
    case DType::kU8:
    case DType::kF8E4M3:
    case DType::kF8E5M2:
    case DType::kBool:
      return 1;
  }
  return 0;
}

namespace {

struct DTypeNameEntry {
  DType type;
  absl::string_view name;
};

constexpr DTypeNameEntry kNames[] = {
    {DType::kF32, "F32"},        {DType::kF16, "F16"},        {DType::kBF16, "BF16"},
    {DType::kF64, "F64"},        {DType::kI8, "I8"},          {DType::kU8, "U8"},
    {DType::kI16, "I16"},        {DType::kI32, "I32"},        {DType::kI64, "I64"},
    {DType::kF8E4M3, "F8_E4M3"}, {DType::kF8E5M2, "F8_E5M2"}, {DType::kBool, "BOOL"},
};

}  // namespace

absl::string_view DTypeName(DType t) {
  for (const auto& e : kNames) {
    if (e.type == t) return e.name;
  }
  return "?";
}

bool ParseDType(absl::string_view name, DType* out) {
  for (const auto& e : kNames) {
    if (e.name == name) {
      *out = e.type;
      return true;
    }
  }
  return false;
}

float F16ToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24.
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t FloatToF16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: infinity
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): round abs * 2^24 to an integer, ties to even.
    const float scaled = std::bit_cast<float>(abs) * 16777216.0f;  // exact: power-of-two scaling
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  uint32_t h = ((abs >> 13) - (112u << 10));
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return sign | static_cast<uint16_t>(h);
}

float F8E4M3ToFloat(uint8_t v) {
  const float sign = (v & 0x80u) ? -1.0f : 1.0f;
  const int exp = (v >> 3) & 0xf;
  const int mant = v & 0x7;
  if (exp == 0xf && mant == 0x7) return std::numeric_limits<float>::quiet_NaN();
  if (exp == 0) return sign * std::ldexp(static_cast<float>(mant), -9);  // subnormal: m * 2^-9
  return sign * std::ldexp(1.0f + static_cast<float>(mant) / 8.0f, exp - 7);
}

uint8_t FloatToF8E4M3(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t abs_bits = u & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return sign | 0x7f;  // NaN
  const float a = std::bit_cast<float>(abs_bits);
  if (a >= kF8E4M3Max) return sign | 0x7e;
  if (a < 0.015625f) {  // below the smallest normal, 2^-6: multiples of 2^-9, 0..8
    return sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f));
  }
  // Keep 3 mantissa bits, rounding the 20 dropped bits to nearest even (a carry moves into the
  // exponent, which is what rounding up to the next binade means).
  uint32_t r = abs_bits + 0x7ffffu + ((abs_bits >> 20) & 1u);
  const int exp = static_cast<int>(r >> 23) - 127 + 7;
  const uint32_t bits = (static_cast<uint32_t>(exp) << 3) | ((r >> 20) & 0x7u);
  return sign | static_cast<uint8_t>(bits > 0x7eu ? 0x7eu : bits);
}

}  // namespace strata
