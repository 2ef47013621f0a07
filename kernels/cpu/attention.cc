#include "kernels/attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

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

// out[i] = exp(s[i] - m), eight at a time: Cephes' single-precision exp (range reduction by
// ln 2 in two parts, a degree-5 polynomial; within a few ulp of std::exp over the softmax's range
// x <= 0, which attention_test checks), instead of a libm call per key. Arguments below -87.3 give
// 0, as the true value (under 1e-38) does beside a normalizer of at least 1.
// (SoftmaxWeightsCpu, below, picks it.)
__attribute__((target("avx2,fma"))) void ExpShiftedAvx2(const float* s, float m, float* out,
                                                        int64_t n) {
  const __m256 mv = _mm256_set1_ps(m);
  const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 c1 = _mm256_set1_ps(0.693359375f), c2 = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 p0 = _mm256_set1_ps(1.9875691500e-4f), p1 = _mm256_set1_ps(1.3981999507e-3f),
               p2 = _mm256_set1_ps(8.3334519073e-3f), p3 = _mm256_set1_ps(4.1665795894e-2f),
               p4 = _mm256_set1_ps(1.6666665459e-1f), p5 = _mm256_set1_ps(5.0000001201e-1f);
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x0 = _mm256_sub_ps(_mm256_loadu_ps(s + i), mv);
    const __m256 under = _mm256_cmp_ps(x0, lo, _CMP_LT_OQ);
    __m256 x = _mm256_min_ps(_mm256_max_ps(x0, lo), hi);
    // x = k ln2 + r, |r| <= ln2 / 2.
    const __m256 k =
        _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(k, c1, x);
    x = _mm256_fnmadd_ps(k, c2, x);
    __m256 y = _mm256_fmadd_ps(p0, x, p1);
    y = _mm256_fmadd_ps(y, x, p2);
    y = _mm256_fmadd_ps(y, x, p3);
    y = _mm256_fmadd_ps(y, x, p4);
    y = _mm256_fmadd_ps(y, x, p5);
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, one));
    // 2^k through the exponent bits.
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    _mm256_storeu_ps(out + i, _mm256_andnot_ps(under, y));
  }
  for (; i < n; ++i) out[i] = std::exp(s[i] - m);
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

void SoftmaxWeightsCpu(const float* s, float m, float* out, int64_t n) {
  if (HasAvx2()) {
    ExpShiftedAvx2(s, m, out, n);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = std::exp(s[i] - m);
  }
}

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
  if (p.work_begin >= end) return absl::OkStatus();
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t qs = p.q_stride ? p.q_stride : p.num_heads * p.head_dim;
  const int64_t os = p.out_stride ? p.out_stride : p.num_heads * p.head_dim;
  const int64_t kv_row = p.num_kv_heads * p.head_dim;
  const int64_t d = p.head_dim;
  const int64_t bt = p.block_tokens;
  const bool avx2 = HasAvx2();
  constexpr int64_t kMaxBlockRun = 64;
  // One query: a (token, head) pair, and its online softmax over the keys so far: running max m,
  // normalizer l, weighted sum of values in acc.
  struct Query {
    int64_t t, h, kvh;
    int32_t seq, pos;
    int64_t first;  // its first key (a sliding window starts later)
    float m, l;
  };
  std::vector<Query> queries;
  queries.reserve(static_cast<size_t>(end - p.work_begin));
  for (int64_t w = p.work_begin; w < end; ++w) {
    const int64_t t = w / p.num_heads;
    const int64_t h = w % p.num_heads;
    const int32_t seq = p.token_seq[t];
    const int32_t pos = p.token_pos[t];
    if (seq < 0 || seq >= p.num_seqs || pos < 0 || pos / bt >= p.max_blocks_per_seq) {
      return absl::InvalidArgumentError(
          absl::StrCat("paged_attention: token ", t, " has sequence ", seq, " position ", pos));
    }
    const int64_t first =
        p.sliding_window > 0 ? std::max<int64_t>(0, pos - p.sliding_window + 1) : 0;
    queries.push_back(
        {t, h, h / group, seq, pos, first, -std::numeric_limits<float>::infinity(), 0.0f});
  }
  // The queries that read the same keys (one sequence, one KV head: its tokens here and the query
  // heads sharing the KV head) go over them together, a cache block at a time, so that each
  // block's keys and values are read from memory once for all of them rather than once each
  // (a long context's K and V far outgrow the caches). Each query's arithmetic is what it would
  // be alone: the same runs of keys in the same order.
  std::vector<size_t> order(queries.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return std::pair(queries[a].seq, queries[a].kvh) < std::pair(queries[b].seq, queries[b].kvh);
  });
  std::vector<float> acc;
  float scores[kMaxBlockRun], weights[kMaxBlockRun];
  for (size_t g0 = 0; g0 < order.size();) {
    size_t g1 = g0 + 1;
    while (g1 < order.size() && queries[order[g1]].seq == queries[order[g0]].seq &&
           queries[order[g1]].kvh == queries[order[g0]].kvh) {
      ++g1;
    }
    const int64_t n_q = static_cast<int64_t>(g1 - g0);
    acc.assign(static_cast<size_t>(n_q * d), 0.0f);
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1;
    for (size_t i = g0; i < g1; ++i) {
      lo = std::min(lo, queries[order[i]].first);
      hi = std::max<int64_t>(hi, queries[order[i]].pos);
    }
    const int32_t* table =
        p.block_tables + static_cast<int64_t>(queries[order[g0]].seq) * p.max_blocks_per_seq;
    const int64_t kvh = queries[order[g0]].kvh;
    for (int64_t bi = lo / bt; bi <= hi / bt; ++bi) {
      const int64_t block_start = bi * bt, block_end = (bi + 1) * bt;
      const int32_t block = table[bi];
      bool checked = false;
      for (size_t i = g0; i < g1; ++i) {
        Query& qr = queries[order[i]];
        // This query's run of keys in this block: [j0, j1).
        const int64_t j0 = std::max(block_start, qr.first);
        const int64_t j1 = std::min<int64_t>(block_end, qr.pos + 1);
        if (j0 >= j1) continue;
        if (!checked) {
          if (block < 0 || block >= p.num_blocks) {
            return absl::InvalidArgumentError(
                absl::StrCat("paged_attention: block table entry ", block, " outside the cache"));
          }
          checked = true;
        }
        const float* q = p.q + qr.t * qs + qr.h * d;
        float* a = acc.data() + static_cast<int64_t>(i - g0) * d;
        for (int64_t c0 = j0; c0 < j1; c0 += kMaxBlockRun) {
          const int64_t n = std::min<int64_t>(kMaxBlockRun, j1 - c0);
          const int64_t slot0 = static_cast<int64_t>(block) * bt + c0 % bt;
          float run_max = -std::numeric_limits<float>::infinity();
          for (int64_t r = 0; r < n; ++r) {
            const float* k = p.k_cache + (slot0 + r) * kv_row + kvh * d;
            const float sc = (avx2 ? DotAvx2(q, k, d) : DotPortable(q, k, d)) * p.scale;
            scores[r] = sc;
            run_max = std::max(run_max, sc);
          }
          if (run_max > qr.m) {
            const float c = std::exp(qr.m - run_max);
            qr.l *= c;
            for (int64_t x = 0; x < d; ++x) a[x] *= c;
            qr.m = run_max;
          }
          SoftmaxWeightsCpu(scores, qr.m, weights, n);
          for (int64_t r = 0; r < n; ++r) {
            const float e = weights[r];
            qr.l += e;
            const float* v = p.v_cache + (slot0 + r) * kv_row + kvh * d;
            if (avx2) {
              AxpyAvx2(e, v, a, d);
            } else {
              AxpyPortable(e, v, a, d);
            }
          }
        }
      }
    }
    for (size_t i = g0; i < g1; ++i) {
      const Query& qr = queries[order[i]];
      float* out = p.out + qr.t * os + qr.h * d;
      const float* a = acc.data() + static_cast<int64_t>(i - g0) * d;
      const float inv = 1.0f / qr.l;
      for (int64_t x = 0; x < d; ++x) out[x] = a[x] * inv;
    }
    g0 = g1;
  }
  return absl::OkStatus();
}

}  // namespace strata
