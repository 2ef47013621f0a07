#include "memtier/kv_codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/hash.h"
#include "common/log.h"
#include "kernels/dtype.h"

namespace strata {

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
  return scales + layout_.num_segments * layout_.segment_floats();
}

uint32_t KvCodec::payload_layout() const {
  const int64_t dims[] = {layout_.num_segments, layout_.block_tokens, layout_.num_heads,
                          layout_.head_dim};
  const uint64_t h = Hash64(absl::string_view(reinterpret_cast<const char*>(dims), sizeof(dims)));
  return (static_cast<uint32_t>(compression_) << 24) | static_cast<uint32_t>(h & 0xffffffu);
}

void KvCodec::Encode(absl::Span<const uint8_t> raw, absl::Span<uint8_t> out) const {
  CHECK_EQ(static_cast<int64_t>(raw.size()), raw_bytes());
  CHECK_EQ(static_cast<int64_t>(out.size()), encoded_bytes());
  if (compression_ == KvCompression::kNone) {
    std::memcpy(out.data(), raw.data(), raw.size());
    return;
  }
  const int64_t S = layout_.num_segments, T = layout_.block_tokens, H = layout_.num_heads,
                D = layout_.head_dim;
  const float* x = reinterpret_cast<const float*>(raw.data());
  float* scales = reinterpret_cast<float*>(out.data());
  uint8_t* q = out.data() + S * H * sizeof(float);
  const bool fp8 = compression_ == KvCompression::kFp8E4M3;
  const float qmax = fp8 ? kF8E4M3Max : 127.0f;
  for (int64_t s = 0; s < S; ++s) {
    const float* xs = x + s * T * H * D;
    uint8_t* qs = q + s * T * H * D;
    for (int64_t h = 0; h < H; ++h) {
      float amax = 0.0f;
      for (int64_t t = 0; t < T; ++t) {
        const float* row = xs + (t * H + h) * D;
        for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(row[d]));
      }
      const float scale = amax > 0.0f ? amax / qmax : 0.0f;
      const float inv = amax > 0.0f ? qmax / amax : 0.0f;
      scales[s * H + h] = scale;
      for (int64_t t = 0; t < T; ++t) {
        const float* row = xs + (t * H + h) * D;
        uint8_t* qrow = qs + (t * H + h) * D;
        if (fp8) {
          for (int64_t d = 0; d < D; ++d) qrow[d] = FloatToF8E4M3(row[d] * inv);
        } else {
          for (int64_t d = 0; d < D; ++d) {
            const float v = std::clamp(std::nearbyint(row[d] * inv), -127.0f, 127.0f);
            qrow[d] = static_cast<uint8_t>(static_cast<int8_t>(v));
          }
        }
      }
    }
  }
}

void KvCodec::Decode(absl::Span<const uint8_t> encoded, absl::Span<uint8_t> raw) const {
  CHECK_EQ(static_cast<int64_t>(encoded.size()), encoded_bytes());
  CHECK_EQ(static_cast<int64_t>(raw.size()), raw_bytes());
  if (compression_ == KvCompression::kNone) {
    std::memcpy(raw.data(), encoded.data(), raw.size());
    return;
  }
  const int64_t S = layout_.num_segments, T = layout_.block_tokens, H = layout_.num_heads,
                D = layout_.head_dim;
  float* x = reinterpret_cast<float*>(raw.data());
  const float* scales = reinterpret_cast<const float*>(encoded.data());
  const uint8_t* q = encoded.data() + S * H * sizeof(float);
  const bool fp8 = compression_ == KvCompression::kFp8E4M3;
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
        for (int64_t d = 0; d < D; ++d) x[base + d] = lut[q[base + d]] * scale;
      }
    }
  }
}

}  // namespace strata
