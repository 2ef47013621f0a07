// KvCodec: how the host and disk tiers store a block's payload, raw or quantized.
//
// A raw payload is KvBlockLayout's segments in the layout's element type (f32, f16 or bf16).
// Quantized, each segment stores one f32 scale per head, then every element as one byte: INT8
// (x / scale rounded, scale = max|x| / 127 over the head's block_tokens x head_dim values) or FP8
// E4M3 (x / scale, scale = max|x| / 448). Encoded:
//   [num_segments, num_heads] f32 scales, then [num_segments, block_tokens, num_heads, head_dim]
//   u8.
// That is a quarter of the f32 bytes or half of the f16/bf16 bytes, plus the scales. Decoding an
// encoded block is exact for kNone; quantized values come back within half a quantization step of
// the original (scale / 2 for INT8; 2^-4 relative for FP8's normals), then rounded to the element
// type.
//
// The codec is pure computation on host memory; thread-compatible (const methods only).
#ifndef STRATA_MEMTIER_KV_CODEC_H_
#define STRATA_MEMTIER_KV_CODEC_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "memtier/block_tier.h"

namespace strata {

enum class KvCompression : uint8_t { kNone = 0, kInt8 = 1, kFp8E4M3 = 2 };

// "none", "int8", "fp8"; false for anything else.
bool ParseKvCompression(absl::string_view name, KvCompression* out);
absl::string_view KvCompressionName(KvCompression c);

class KvCodec {
 public:
  KvCodec(KvBlockLayout layout, KvCompression compression);

  const KvBlockLayout& layout() const { return layout_; }
  KvCompression compression() const { return compression_; }
  int64_t raw_bytes() const { return layout_.block_bytes(); }
  int64_t encoded_bytes() const;
  // Names the encoding and the layout's shape; slot headers carry it, and a reader refuses slots
  // written under another (a tier reopened with other settings finds misses, not garbage).
  uint32_t payload_layout() const;

  // raw: raw_bytes(); out: encoded_bytes(). Spans of other sizes are a caller bug (CHECK).
  void Encode(absl::Span<const uint8_t> raw, absl::Span<uint8_t> out) const;
  // encoded: encoded_bytes(); raw: raw_bytes().
  void Decode(absl::Span<const uint8_t> encoded, absl::Span<uint8_t> raw) const;

 private:
  KvBlockLayout layout_;
  KvCompression compression_;
};

}  // namespace strata

#endif  // STRATA_MEMTIER_KV_CODEC_H_
