// Element types of tensors, and host conversions between them. Host-only; no CUDA.
#ifndef STRATA_KERNELS_DTYPE_H_
#define STRATA_KERNELS_DTYPE_H_

#include <bit>
#include <cstdint>
#include <cstring>

#include "absl/strings/string_view.h"

namespace strata {

enum class DType : uint8_t {
  kF32,
  kF16,
  kBF16,
  kF64,
  kI8,
  kU8,
  kI16,
  kI32,
  kI64,
  kF8E4M3,
  kF8E5M2,
  kBool,
};

// Bytes per element.
int DTypeBytes(DType t);
// The safetensors spelling ("F32", "BF16", ...).
absl::string_view DTypeName(DType t);
// Parses the safetensors spelling; false when unknown.
bool ParseDType(absl::string_view name, DType* out);

// bfloat16 <-> float: bf16 is the high half of an IEEE float; rounding to nearest even.
inline float Bf16ToFloat(uint16_t h) {
  return std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
}
inline uint16_t FloatToBf16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE half <-> float, exact for every half value (subnormals, infinities, NaN); rounding to
// nearest even on the way down.
float F16ToFloat(uint16_t h);
uint16_t FloatToF16(float f);

// Element i of an array of f32, bf16 or f16 values at `data` (any alignment) as f32; 0 for the
// other types.
inline float ElementAsFloat(const void* data, DType t, int64_t i) {
  const auto* p = static_cast<const uint8_t*>(data);
  if (t == DType::kF32) {
    float f;
    std::memcpy(&f, p + 4 * i, 4);
    return f;
  }
  if (t != DType::kBF16 && t != DType::kF16) return 0.0f;
  uint16_t h;
  std::memcpy(&h, p + 2 * i, 2);
  return t == DType::kBF16 ? Bf16ToFloat(h) : F16ToFloat(h);
}

// FP8 E4M3 (the "fn" variant of NVIDIA and OCP: bias 7, no infinities, largest finite 448, NaN
// 0x7f/0xff) <-> float. Rounding to nearest even; values beyond +-448 saturate to +-448 (KV
// quantization scales keep them in range), NaN stays NaN. Every FP8 value converts exactly.
float F8E4M3ToFloat(uint8_t v);
uint8_t FloatToF8E4M3(float f);
inline constexpr float kF8E4M3Max = 448.0f;

}  // namespace strata

#endif  // STRATA_KERNELS_DTYPE_H_
