#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"

namespace strata {

absl::Status WriteKvCacheCpu(const WriteKvParams& p) {
  if (p.num_tokens < 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 || p.block_tokens <= 0 ||
      p.num_blocks <= 0) {
    return absl::InvalidArgumentError("write_kv: bad shape");
  }
  if (p.num_tokens == 0) return absl::OkStatus();
  if (!p.k || !p.v || !p.slots || !p.k_cache || !p.v_cache) {
    return absl::InvalidArgumentError("write_kv: null pointer");
  }
  const int64_t row = p.num_kv_heads * p.head_dim;
  const int64_t ks = p.k_stride ? p.k_stride : row;
  const int64_t vs = p.v_stride ? p.v_stride : row;
  const int64_t num_slots = p.num_blocks * p.block_tokens;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t slot = p.slots[t];
    if (slot < 0 || slot >= num_slots) {
      return absl::InvalidArgumentError(
          absl::StrCat("write_kv: slot ", slot, " outside the cache"));
    }
    std::memcpy(p.k_cache + slot * row, p.k + t * ks, row * sizeof(float));
    std::memcpy(p.v_cache + slot * row, p.v + t * vs, row * sizeof(float));
  }
  return absl::OkStatus();
}

absl::Status PagedAttentionCpu(const PagedAttentionParams& p) {
  if (p.num_tokens < 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 ||
      p.num_heads % p.num_kv_heads != 0 || p.head_dim <= 0 || p.head_dim > 512 ||
      p.block_tokens <= 0 || p.num_blocks <= 0 || p.max_blocks_per_seq <= 0 || p.num_seqs <= 0 ||
      p.sliding_window < 0) {
    return absl::InvalidArgumentError("paged_attention: bad shape");
  }
  if (p.num_tokens == 0) return absl::OkStatus();
  if (!p.q || !p.k_cache || !p.v_cache || !p.token_seq || !p.token_pos || !p.block_tables ||
      !p.out) {
    return absl::InvalidArgumentError("paged_attention: null pointer");
  }
  const int64_t total = p.num_tokens * p.num_heads;
  const int64_t end = p.work_end == 0 ? total : std::min(p.work_end, total);
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t qs = p.q_stride ? p.q_stride : p.num_heads * p.head_dim;
  const int64_t os = p.out_stride ? p.out_stride : p.num_heads * p.head_dim;
  const int64_t kv_row = p.num_kv_heads * p.head_dim;
  const int64_t d = p.head_dim;
  float acc[512];
  for (int64_t w = p.work_begin; w < end; ++w) {
    const int64_t t = w / p.num_heads;
    const int64_t h = w % p.num_heads;
    const int64_t kvh = h / group;
    const int32_t seq = p.token_seq[t];
    const int32_t pos = p.token_pos[t];
    if (seq < 0 || seq >= p.num_seqs || pos < 0 || pos / p.block_tokens >= p.max_blocks_per_seq) {
      return absl::InvalidArgumentError(
          absl::StrCat("paged_attention: token ", t, " has sequence ", seq, " position ", pos));
    }
    const int32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;
    const float* q = p.q + t * qs + h * d;
    const int64_t first =
        p.sliding_window > 0 ? std::max<int64_t>(0, pos - p.sliding_window + 1) : 0;
    // Online softmax: running max m, normalizer l, and the weighted sum of values in acc.
    float m = -std::numeric_limits<float>::infinity();
    float l = 0.0f;
    std::fill(acc, acc + d, 0.0f);
    for (int64_t j = first; j <= pos; ++j) {
      const int32_t block = table[j / p.block_tokens];
      if (block < 0 || block >= p.num_blocks) {
        return absl::InvalidArgumentError(
            absl::StrCat("paged_attention: block table entry ", block, " outside the cache"));
      }
      const int64_t slot = static_cast<int64_t>(block) * p.block_tokens + j % p.block_tokens;
      const float* k = p.k_cache + slot * kv_row + kvh * d;
      const float* v = p.v_cache + slot * kv_row + kvh * d;
      float s = 0.0f;
      for (int64_t i = 0; i < d; ++i) s += q[i] * k[i];
      s *= p.scale;
      if (s > m) {
        const float c = std::exp(m - s);
        l *= c;
        for (int64_t i = 0; i < d; ++i) acc[i] *= c;
        m = s;
      }
      const float e = std::exp(s - m);
      l += e;
      for (int64_t i = 0; i < d; ++i) acc[i] += e * v[i];
    }
    float* out = p.out + t * os + h * d;
    const float inv = 1.0f / l;
    for (int64_t i = 0; i < d; ++i) out[i] = acc[i] * inv;
  }
  return absl::OkStatus();
}

}  // namespace strata
