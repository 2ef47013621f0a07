#include "kernels/attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"

namespace strata {
namespace {

// q . k over n floats, and acc += e * v: with AVX2 and FMA where the processor has them (chosen
// once at run time, like the matmul kernels), else portable loops the compiler vectorizes for the
// baseline instruction set.
__attribute__((target("avx2,fma"))) float DotAvx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8)
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  const __m256 s = _mm256_add_ps(s0, s1);
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  float r = _mm_cvtss_f32(x);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

__attribute__((target("avx2,fma"))) void AxpyAvx2(float e, const float* v, float* acc, int64_t n) {
  const __m256 ev = _mm256_set1_ps(e);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(acc + i,
                     _mm256_fmadd_ps(ev, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
  }
  for (; i < n; ++i) acc[i] += e * v[i];
}

float DotPortable(const float* a, const float* b, int64_t n) {
  float s[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int k = 0; k < 4; ++k) s[k] += a[i + k] * b[i + k];
  }
  float r = (s[0] + s[1]) + (s[2] + s[3]);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

void AxpyPortable(float e, const float* v, float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += e * v[i];
}

bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

}  // namespace

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
  constexpr int64_t kMaxBlockRun = 64;
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
    // Online softmax over runs of keys that share a cache block (consecutive slots): scores for
    // the run, one rescale of the running sum to the run's max, then the weighted values. Running
    // max m, normalizer l, weighted sum of values in acc.
    const bool avx2 = HasAvx2();
    float m = -std::numeric_limits<float>::infinity();
    float l = 0.0f;
    std::fill(acc, acc + d, 0.0f);
    float scores[kMaxBlockRun];
    for (int64_t j0 = first; j0 <= pos;) {
      const int64_t bi = j0 / p.block_tokens;
      const int64_t j1 = std::min<int64_t>(pos + 1, (bi + 1) * p.block_tokens);
      const int32_t block = table[bi];
      if (block < 0 || block >= p.num_blocks) {
        return absl::InvalidArgumentError(
            absl::StrCat("paged_attention: block table entry ", block, " outside the cache"));
      }
      for (int64_t c0 = j0; c0 < j1; c0 += kMaxBlockRun) {
        const int64_t n = std::min<int64_t>(kMaxBlockRun, j1 - c0);
        const int64_t slot0 = static_cast<int64_t>(block) * p.block_tokens + c0 % p.block_tokens;
        float run_max = -std::numeric_limits<float>::infinity();
        for (int64_t r = 0; r < n; ++r) {
          const float* k = p.k_cache + (slot0 + r) * kv_row + kvh * d;
          const float sc = (avx2 ? DotAvx2(q, k, d) : DotPortable(q, k, d)) * p.scale;
          scores[r] = sc;
          run_max = std::max(run_max, sc);
        }
        if (run_max > m) {
          const float c = std::exp(m - run_max);
          l *= c;
          for (int64_t i = 0; i < d; ++i) acc[i] *= c;
          m = run_max;
        }
        for (int64_t r = 0; r < n; ++r) {
          const float e = std::exp(scores[r] - m);
          l += e;
          const float* v = p.v_cache + (slot0 + r) * kv_row + kvh * d;
          if (avx2) {
            AxpyAvx2(e, v, acc, d);
          } else {
            AxpyPortable(e, v, acc, d);
          }
        }
      }
      j0 = j1;
    }
    float* out = p.out + t * os + h * d;
    const float inv = 1.0f / l;
    for (int64_t i = 0; i < d; ++i) out[i] = acc[i] * inv;
  }
  return absl::OkStatus();
}

}  // namespace strata
