// Paged attention over a block-structured KV cache, for prefill (many query tokens per sequence,
// causal) and decode (one query token per sequence) alike.
//
// KV cache layout, per layer: k_cache and v_cache are [num_blocks, block_tokens, num_kv_heads,
// head_dim]. A sequence's token at position p lives in block block_table[p / block_tokens], row p %
// block_tokens. A query token at position p attends to every key of its sequence at positions
// max(0, p - sliding_window + 1) .. p (all of 0..p without a window). The keys of the query tokens
// themselves must already be written (WriteKvCacheCpu) before the attention call.
#ifndef STRATA_KERNELS_ATTENTION_H_
#define STRATA_KERNELS_ATTENTION_H_

#include <cstdint>

#include "absl/status/status.h"

namespace strata {

struct WriteKvParams {
  int64_t num_tokens = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_tokens = 0;
  int64_t num_blocks = 0;
  // [num_tokens, num_kv_heads, head_dim] with token stride k_stride / v_stride (0: dense), host,
  // f32.
  const float* k = nullptr;
  int64_t k_stride = 0;
  const float* v = nullptr;
  int64_t v_stride = 0;
  // [num_tokens], host, int64: block * block_tokens + row, the cache slot each token goes to.
  const int64_t* slots = nullptr;
  // [num_blocks, block_tokens, num_kv_heads, head_dim], host, f32.
  float* k_cache = nullptr;
  float* v_cache = nullptr;
};
absl::Status WriteKvCacheCpu(const WriteKvParams& p);

struct PagedAttentionParams {
  int64_t num_tokens = 0;  // query tokens, across all sequences
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;    // divides num_heads
  int64_t head_dim = 0;        // <= 512
  float scale = 1.0f;          // usually 1 / sqrt(head_dim)
  int64_t sliding_window = 0;  // 0: none
  // [num_tokens, num_heads, head_dim] with token stride q_stride (0: dense), host, f32.
  const float* q = nullptr;
  int64_t q_stride = 0;
  // [num_blocks, block_tokens, num_kv_heads, head_dim], host, f32.
  const float* k_cache = nullptr;
  const float* v_cache = nullptr;
  int64_t block_tokens = 0;
  int64_t num_blocks = 0;
  // [num_tokens], host, int32: the sequence (row of block_tables) and position of each query token.
  const int32_t* token_seq = nullptr;
  const int32_t* token_pos = nullptr;
  // [num_seqs, max_blocks_per_seq], host, int32.
  const int32_t* block_tables = nullptr;
  int64_t num_seqs = 0;
  int64_t max_blocks_per_seq = 0;
  // [num_tokens, num_heads, head_dim] with token stride out_stride (0: dense), host, f32.
  float* out = nullptr;
  int64_t out_stride = 0;
  // Only (token, head) pairs with token * num_heads + head in [work_begin, work_end) are computed
  // (work_end 0 means all): callers split the work across threads.
  int64_t work_begin = 0;
  int64_t work_end = 0;
};
// INVALID_ARGUMENT for bad shapes, or a block table entry or position outside the cache.
absl::Status PagedAttentionCpu(const PagedAttentionParams& p);
// The softmax weights PagedAttentionCpu takes for a run of scores: out[i] = exp(s[i] - m), for
// s[i] <= m (a polynomial eight at a time on AVX2, within a few ulp of std::exp; std::exp
// elsewhere). For tests.
void SoftmaxWeightsCpu(const float* s, float m, float* out, int64_t n);

}  // namespace strata

#endif  // STRATA_KERNELS_ATTENTION_H_
