#include "memtier/kv_codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/copy.h"
#include "common/hash.h"
#include "common/log.h"
#include "kernels/dtype.h"

namespace strata {
namespace {

// Element i of a raw payload of element type `kType` (f32, f16 or bf16), as a float, and back.
template <DType kType>
float LoadElement(const uint8_t* raw, int64_t i) {
  if constexpr (kType == DType::kF32) {
    float f;
    std::memcpy(&f, raw + 4 * i, 4);
    return f;
  } else {
    uint16_t h;
    std::memcpy(&h, raw + 2 * i, 2);
    return kType == DType::kF16 ? F16ToFloat(h) : Bf16ToFloat(h);
  }
}

template <DType kType>
void StoreElement(uint8_t* raw, int64_t i, float value) {
  if constexpr (kType == DType::kF32) {
    std::memcpy(raw + 4 * i, &value, 4);
  } else {
    const uint16_t h = kType == DType::kF16 ? FloatToF16(value) : FloatToBf16(value);
    std::memcpy(raw + 2 * i, &h, 2);
  }
}

// [S, T, H, D] raw elements -> [S, H] f32 scales and [S, T, H, D] one-byte codes.
template <DType kType>
void Quantize(const KvBlockLayout& l, bool fp8, const uint8_t* x, float* scales, uint8_t* q) {
  const int64_t S = l.num_segments, T = l.block_tokens, H = l.num_heads, D = l.head_dim;
  const float qmax = fp8 ? kF8E4M3Max : 127.0f;
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t h = 0; h < H; ++h) {
      float amax = 0.0f;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = ((s * T + t) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          amax = std::max(amax, std::fabs(LoadElement<kType>(x, row + d)));
        }
      }
      const float scale = amax > 0.0f ? amax / qmax : 0.0f;
      const float inv = amax > 0.0f ? qmax / amax : 0.0f;
      scales[s * H + h] = scale;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = ((s * T + t) * H + h) * D;
        if (fp8) {
          for (int64_t d = 0; d < D; ++d) {
            q[row + d] = FloatToF8E4M3(LoadElement<kType>(x, row + d) * inv);
          }
        } else {
          for (int64_t d = 0; d < D; ++d) {
            const float v =
                std::clamp(std::nearbyint(LoadElement<kType>(x, row + d) * inv), -127.0f, 127.0f);
            q[row + d] = static_cast<uint8_t>(static_cast<int8_t>(v));
          }
        }
      }
    }
  }
}

template <DType kType>
void Dequantize(const KvBlockLayout& l, bool fp8, const float* scales, const uint8_t* q,
                uint8_t* x) {
  const int64_t S = l.num_segments, T = l.block_tokens, H = l.num_heads, D = l.head_dim;
  float lut[256];
  for (int v = 0; v < 256; ++v) {
    lut[v] = fp8 ? F8E4M3ToFloat(static_cast<uint8_t>(v))
                 : static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(v)));
  }
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        const float scale = scales[s * H + h];
        const int64_t base = ((s * T + t) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) StoreElement<kType>(x, base + d, lut[q[base + d]] * scale);
      }
    }
  }
}

}  // namespace

bool ParseKvCompression(absl::string_view name, KvCompression* out) {
  if (name == "none") {
    *out = KvCompression::kNone;
  } else if (name == "int8") {
    *out = KvCompression::kInt8;
  } else if (name == "fp8") {
    *out = KvCompression::kFp8E4M3;
  } else {
    return false;
  }
  return true;
}

absl::string_view KvCompressionName(KvCompression c) {
  switch (c) {
    case KvCompression::kNone:
      return "none";
    case KvCompression::kInt8:
      return "int8";
    case KvCompression::kFp8E4M3:
      return "fp8";
  }
  return "unknown";
}

KvCodec::KvCodec(KvBlockLayout layout, KvCompression compression)
    : layout_(layout), compression_(compression) {
  CHECK(layout_.valid()) << "KvCodec needs a valid block layout";
}

int64_t KvCodec::encoded_bytes() const {
  if (compression_ == KvCompression::kNone) return raw_bytes();
  const int64_t scales = layout_.num_segments * layout_.num_heads * int64_t{sizeof(float)};
  return scales + layout_.num_segments * layout_.segment_elements();
}

uint32_t KvCodec::payload_layout() const {
  // f32 layouts hash only their shape, as before element types other than f32 existed, so that
  // disk files written then still match.
  const int64_t dims[] = {layout_.num_segments, layout_.block_tokens, layout_.num_heads,
                          layout_.head_dim, static_cast<int64_t>(layout_.dtype)};
  const size_t dims_bytes = layout_.dtype == DType::kF32 ? 4 * sizeof(int64_t) : sizeof(dims);
  const uint64_t h = Hash64(absl::string_view(reinterpret_cast<const char*>(dims), dims_bytes));
  return (static_cast<uint32_t>(compression_) << 24) | static_cast<uint32_t>(h & 0xffffffu);
}

void KvCodec::Encode(absl::Span<const uint8_t> raw, absl::Span<uint8_t> out) const {
  CHECK_EQ(static_cast<int64_t>(raw.size()), raw_bytes());
  CHECK_EQ(static_cast<int64_t>(out.size()), encoded_bytes());
  if (compression_ == KvCompression::kNone) {
    CopyBytes(out.data(), raw.data(), raw.size());
    return;
  }
  const bool fp8 = compression_ == KvCompression::kFp8E4M3;
  float* scales = reinterpret_cast<float*>(out.data());
  uint8_t* q = out.data() + layout_.num_segments * layout_.num_heads * sizeof(float);
  switch (layout_.dtype) {
    case DType::kF16:
      return Quantize<DType::kF16>(layout_, fp8, raw.data(), scales, q);
    case DType::kBF16:
      return Quantize<DType::kBF16>(layout_, fp8, raw.data(), scales, q);
    default:
      return Quantize<DType::kF32>(layout_, fp8, raw.data(), scales, q);
  }
}

void KvCodec::Decode(absl::Span<const uint8_t> encoded, absl::Span<uint8_t> raw) const {
  CHECK_EQ(static_cast<int64_t>(encoded.size()), encoded_bytes());
  CHECK_EQ(static_cast<int64_t>(raw.size()), raw_bytes());
  if (compression_ == KvCompression::kNone) {
    CopyBytes(raw.data(), encoded.data(), raw.size());
    return;
  }
  const bool fp8 = compression_ == KvCompression::kFp8E4M3;
  const float* scales = reinterpret_cast<const float*>(encoded.data());
  const uint8_t* q = encoded.data() + layout_.num_segments * layout_.num_heads * sizeof(float);
  switch (layout_.dtype) {
    case DType::kF16:
      return Dequantize<DType::kF16>(layout_, fp8, scales, q, raw.data());
    case DType::kBF16:
      return Dequantize<DType::kBF16>(layout_, fp8, scales, q, raw.data());
    default:
      return Dequantize<DType::kF32>(layout_, fp8, scales, q, raw.data());
  }
}

}  // namespace strata
