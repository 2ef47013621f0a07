// The CUDA twins of the CPU ops of a transformer layer (kernels/elementwise.h, kernels/attention.h,
// the embedding lookup and greedy token choice), as plain argument structs and launchers kept free
// of Abseil so that nvcc compiles only CUDA code. Callers go through kernels/cuda/ops.h, which
// validates the arguments and turns errors into absl::Status.
//
// Activations and weights are f32, f16 or bf16 (`ActType`); every reduction and every product
// accumulates in f32. The residual stream between layers stays f32. All pointers are device memory
// unless a field says otherwise; every launcher is asynchronous on `stream` and returns the launch
// error. Kernels launch with programmatic dependent launch (cuda_types.cuh's PdlBegin): fields
// marked "read early" are read before a kernel waits for the one launched before it, so the kernel
// just before must not write them (weights, constants and a step's inputs uploaded before it).
#ifndef STRATA_KERNELS_CUDA_OPS_KERNEL_H_
#define STRATA_KERNELS_CUDA_OPS_KERNEL_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/sample_row.h"

namespace strata::gpu {

enum class ActType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline int ActBytes(ActType t) { return t == ActType::kF32 ? 4 : 2; }

// out[t, :] = table[tokens[t], :] as f32 (the residual stream).
struct EmbedArgs {
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  int64_t vocab = 0;
  const int32_t* tokens = nullptr;  // [num_tokens]; ids outside [0, vocab) give zero rows
  const void* table = nullptr;      // [vocab, hidden], table_type
  ActType table_type = ActType::kBF16;
  float* out = nullptr;  // [num_tokens, hidden]
};
cudaError_t LaunchEmbed(const EmbedArgs& a, cudaStream_t stream);

// Fused residual add and RMSNorm, one row per token:
//   if delta: residual[r, :] += delta[r, :]
//   out[r, :] = residual[r, :] / sqrt(mean(residual[r, :]^2) + eps) * weight
struct AddRmsNormArgs {
  int64_t rows = 0;
  int64_t dim = 0;
  float eps = 1e-6f;
  float* residual = nullptr;      // [rows, dim], f32, dense; updated in place when delta is set
  const void* delta = nullptr;    // [rows, dim] with row stride delta_stride, act; may be null
  int64_t delta_stride = 0;       // 0: dim
  const float* weight = nullptr;  // [dim], f32; read early
  void* out = nullptr;            // [rows, dim] with row stride out_stride, act
  int64_t out_stride = 0;         // 0: dim
  ActType act = ActType::kBF16;   // of delta and out
};
cudaError_t LaunchAddRmsNorm(const AddRmsNormArgs& a, cudaStream_t stream);

// In-place RMSNorm of each head of each token (Qwen3's q_norm / k_norm):
//   x[t, h, :] = x[t, h, :] / sqrt(mean(x[t, h, :]^2) + eps) * weight
struct HeadRmsNormArgs {
  int64_t num_tokens = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  float eps = 1e-6f;
  void* x = nullptr;  // token t, head h at x + t * token_stride + h * head_dim (elements), act
  int64_t token_stride = 0;
  const float* weight = nullptr;  // [head_dim], f32
  ActType act = ActType::kBF16;
};
cudaError_t LaunchHeadRmsNorm(const HeadRmsNormArgs& a, cudaStream_t stream);

// Rotary embedding in place, rotate-half convention, angle position * inv_freq[i] in double (as
// RopeCpu computes it).
struct RopeArgs {
  int64_t num_tokens = 0;
  int64_t num_q_heads = 0;
  int64_t num_k_heads = 0;
  int64_t head_dim = 0;                // even, <= 1024
  const int32_t* positions = nullptr;  // [num_tokens]; read early
  const float* inv_freq = nullptr;     // [head_dim / 2]; read early
  void* q = nullptr;                   // [num_tokens, num_q_heads, head_dim], token stride q_stride
  int64_t q_stride = 0;
  void* k = nullptr;  // [num_tokens, num_k_heads, head_dim], token stride k_stride
  int64_t k_stride = 0;
  ActType act = ActType::kBF16;
};
cudaError_t LaunchRope(const RopeArgs& a, cudaStream_t stream);

// out[r, i] = silu(in[r, i]) * in[r, dim + i].
struct SiluMulArgs {
  int64_t rows = 0;
  int64_t dim = 0;
  const void* in = nullptr;  // [rows, 2 * dim]
  void* out = nullptr;       // [rows, dim]
  ActType act = ActType::kBF16;
};
cudaError_t LaunchSiluMul(const SiluMulArgs& a, cudaStream_t stream);

// Writes each token's K and V into its cache slot (block * block_tokens + row); a negative slot
// writes nothing (padding rows of a captured decode graph).
struct WriteKvArgs {
  int64_t num_tokens = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_tokens = 0;
  int64_t num_blocks = 0;
  const void* k = nullptr;  // [num_tokens, num_kv_heads, head_dim], token stride k_stride
  int64_t k_stride = 0;
  const void* v = nullptr;
  int64_t v_stride = 0;
  const int64_t* slots = nullptr;  // [num_tokens]; read early
  void* k_cache = nullptr;         // [num_blocks, block_tokens, num_kv_heads, head_dim]
  void* v_cache = nullptr;
  ActType act = ActType::kBF16;
};
cudaError_t LaunchWriteKv(const WriteKvArgs& a, cudaStream_t stream);

// Rotary embedding of q and k fused with the KV cache write (one launch instead of two, for
// decode): exactly LaunchRope(rope) then LaunchWriteKv(kv), where kv.k must be rope.k (the rotated
// keys are what gets written).
cudaError_t LaunchRopeWriteKv(const RopeArgs& rope, const WriteKvArgs& kv, cudaStream_t stream);

// Paged attention (see kernels/attention.h for the cache layout and the causal rule), for prefill
// and decode alike. Work is cut into tiles: a tile is a run of consecutive query tokens of one
// sequence at consecutive positions, and one thread block serves one tile for one KV head, i.e.
// tile_tokens x group query rows that share every K and V load (GQA). The four warps of a block
// split the tile's keys; long key ranges are further split across `num_partitions` blocks whose
// partial results a second kernel merges (split-K, for decode of long contexts).
struct PagedAttentionArgs {
  int64_t num_tokens = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // 16, 32, 64, 128 or 256
  float scale = 1.0f;
  int64_t sliding_window = 0;
  const void* q = nullptr;  // [num_tokens, num_heads, head_dim], token stride q_stride
  int64_t q_stride = 0;
  const void* k_cache = nullptr;  // [num_blocks, block_tokens, num_kv_heads, head_dim]
  const void* v_cache = nullptr;
  int64_t block_tokens = 0;
  int64_t num_blocks = 0;
  const int32_t* token_seq = nullptr;     // [num_tokens]
  const int32_t* token_pos = nullptr;     // [num_tokens]
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks_per_seq]
  int64_t num_seqs = 0;
  int64_t max_blocks_per_seq = 0;
  void* out = nullptr;  // [num_tokens, num_heads, head_dim], token stride out_stride
  int64_t out_stride = 0;
  ActType act = ActType::kBF16;
  // [num_tiles] (first token, token count) pairs, device; null means one tile per token.
  const int32_t* tiles = nullptr;
  int64_t num_tiles = 0;
  // Most query tokens in one tile (1 when tiles is null).
  int64_t tile_tokens = 1;
  // Split-K: each tile's key range is cut into at most num_partitions partitions, each a multiple
  // of partition_keys keys (itself a multiple of 32), as few as cover the range; the split is made
  // on the device from the actual range. 1 partition needs no workspace.
  int64_t num_partitions = 1;
  int64_t partition_keys = 0;
  // f32 scratch of PagedAttentionWorkspaceFloats() floats when num_partitions > 1.
  float* workspace = nullptr;
  // Decode kernel: for one query token per tile (tiles null) and a group of at most 8 query heads
  // per KV head, lanes share each key (16 bytes of its row apiece) and keep their slice of the
  // query rows and the output in registers; its partitions take multiples of 64 keys, and the last
  // partition block of each (tile, KV head) to finish merges them (no second kernel). Other shapes
  // use the tiled kernel whatever this says.
  bool decode_kernel = false;
  // [num_tiles, num_kv_heads] u32, device, zero before the first launch; each launch leaves them
  // zero. Needed by the decode kernel with num_partitions > 1 (it counts finished partitions).
  uint32_t* counters = nullptr;
  // With the decode kernel: its build for one block an SM, which may use up to 255 registers a
  // thread (16-bit activations at head_dim 128 only; elsewhere ignored). The usual build is held
  // to 168 there and spills in its key loop.
  bool decode_one_block = false;
  // Tensor-core kernel for planned tiles (prefill and chunked prefill) in bf16 and f16: one block
  // takes up to kPagedAttentionMmaRows query rows (plan tiles of AttentionMmaTileTokens(group)
  // tokens, kernels/cuda/ops.h) and 64 keys at a time, Q.K and P.V on tensor cores with f32
  // accumulation, the probabilities rounded to the activation type. Other shapes use the CUDA-core
  // kernels whatever this says (PagedAttentionUsesMmaKernel).
  bool mma_prefill = false;
  // With mma_prefill: the same tiles through the mma.sync kernel, which keeps the scores and the
  // probabilities in registers (the wmma kernel passes them through shared memory). Same tiles,
  // workspace and rounding; the sums in another order.
  bool mma_sync = false;
};
// Whether these arguments run the decode kernel (decode_kernel set and the shape allows it).
bool PagedAttentionUsesDecodeKernel(const PagedAttentionArgs& a);
// Query rows (tile tokens x GQA group) one block of the tensor-core kernel serves.
inline constexpr int64_t kPagedAttentionMmaRows = 64;
// Whether the tensor-core kernel can serve this activation type, head_dim and GQA group at all
// (16-bit activations, head_dim 16 to 128, a group of at most kPagedAttentionMmaRows).
bool PagedAttentionMmaSupported(ActType act, int64_t head_dim, int64_t group);
// Shared memory one block of the tensor-core kernel takes for this head_dim (0 if unsupported):
// a device whose per-block opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin) is smaller
// cannot run it (head_dim 128 needs about 104 KiB: A100, H100 and H200 can, sm_86/sm_89 cannot).
int64_t PagedAttentionMmaSharedBytes(int64_t head_dim);
// Whether these arguments run the tensor-core kernel: mma_prefill set, planned tiles of at most
// kPagedAttentionMmaRows rows, a supported shape, and queries in whole 16-byte rows (q 16-byte
// aligned, q_stride a multiple of 8).
bool PagedAttentionUsesMmaKernel(const PagedAttentionArgs& a);
// Query rows one block can hold for this head_dim (the tile_tokens x group limit).
int64_t PagedAttentionMaxRows(int64_t head_dim);
int64_t PagedAttentionWorkspaceFloats(const PagedAttentionArgs& a);
cudaError_t LaunchPagedAttention(const PagedAttentionArgs& a, cudaStream_t stream);

// Greedy choice per row: the index of the largest logit (the lowest index among equals, as the CPU
// sampler picks), and its log-probability under log-softmax of the row.
struct ArgmaxArgs {
  int64_t rows = 0;
  int64_t vocab = 0;
  const void* logits = nullptr;  // [rows, vocab] with row stride ld (0: vocab)
  int64_t ld = 0;
  ActType type = ActType::kF32;
  int32_t* token = nullptr;  // [rows]
  float* logprob = nullptr;  // [rows]; may be null
};
cudaError_t LaunchArgmax(const ArgmaxArgs& a, cudaStream_t stream);

// Seeded sampling on the GPU, the twin of the CPU sampler (worker/engine/sampler.h): per row,
// repetition / presence / frequency penalties, banned tokens, temperature, then greedy (temperature
// 0) or a draw from the candidates in (logit descending, id ascending) order truncated by top-k,
// min-p and top-p, or by an exponential race where no truncation depends on that order
// (DrawsByRace in sample_row.h). The draws come from the host (SampleRow::u and race_key, from
// SampleUniform and SampleRaceKey of (seed, position)), so the GPU picks the token the CPU would.
// The logits are modified in place exactly as the CPU modifies its copy.
struct SampleArgs {
  int64_t rows = 0;
  int64_t vocab = 0;
  float* logits = nullptr;            // [rows, vocab], f32, dense; modified in place
  const SampleRow* params = nullptr;  // [rows]
  // Tokens each row has seen (prompt or output), each once, with its count in the output (0: prompt
  // only), as row ranges [pen_offsets[r], pen_offsets[r + 1]); may be null for no penalties.
  const int32_t* pen_offsets = nullptr;
  const int32_t* pen_tokens = nullptr;
  const int32_t* pen_counts = nullptr;
  // Banned tokens (probability zero) per row, the same way; may be null.
  const int32_t* ban_offsets = nullptr;
  const int32_t* ban_tokens = nullptr;
  int32_t* token = nullptr;   // [rows]
  float* logprob = nullptr;   // [rows]: log-probability after penalties and temperature
  void* workspace = nullptr;  // SampleWorkspaceBytes(rows, vocab, sorted_draws) bytes
  // Some row draws from sorted candidates (temperature above 0 and not DrawsByRace). False (the
  // caller knows) skips the sort and the kernel after it, and needs only the small workspace; a
  // row that should sort is then drawn by the race instead.
  bool sorted_draws = true;
  // Each row's logits split over blocks of 8192 (three kernels: the scan, the sum and race, a
  // fold of the chunks' results) instead of one block a row walking the whole vocabulary (a
  // double-precision exp per logit on one SM: 0.16 ms of a batch-1 step on an H200). The same
  // tokens; the log-sum-exp's sum in another order. Experiment, off until measured.
  bool split_rows = false;
};
// The workspace for `rows` rows: with `sorted_draws`, the sort's buffers too (about 24 bytes a
// logit: about 200 MB for 64 rows of a 128,256-token vocabulary); without, about 32 bytes a row
// for every 8192 logits.
size_t SampleWorkspaceBytes(int64_t rows, int64_t vocab, bool sorted_draws = true);
cudaError_t LaunchSample(const SampleArgs& a, cudaStream_t stream);

// dst[i, :] = src[rows[i], :] for i < num_rows (width elements each, row strides ld_src, ld_dst).
struct GatherRowsArgs {
  int64_t num_rows = 0;
  int64_t width = 0;
  const void* src = nullptr;
  int64_t ld_src = 0;
  const int32_t* rows = nullptr;  // [num_rows]
  void* dst = nullptr;
  int64_t ld_dst = 0;
  ActType type = ActType::kBF16;
};
cudaError_t LaunchGatherRows(const GatherRowsArgs& a, cudaStream_t stream);

// y[m, n] = x[m, k] . w[n, k]^T (+ bias[n]) for small m (decode): every weight row is streamed once
// in 16-byte loads with all m rows of x applied to it, f32 accumulation. Needs m <= 8, k a multiple
// of 16 / sizeof(act) and 16-byte aligned x, w and row strides.
inline constexpr int kGemvVariants = 11;  // GemvArgs::variant's shapes
struct GemvArgs {
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  const void* x = nullptr;  // [m, k], row stride ldx, act
  int64_t ldx = 0;
  const void* w = nullptr;     // [n, k], act; its first loads may start before the kernel
                               // launched just before this one finishes (read-only weights)
  const void* bias = nullptr;  // [n], out_type; may be null
  void* y = nullptr;           // [m, n], row stride ldy, out_type
  int64_t ldy = 0;
  ActType act = ActType::kBF16;
  ActType out_type = ActType::kBF16;
  // The kernel's block shape (see gemv.cu), 0 to kGemvVariants - 1; GpuModelRunner takes 1
  // (GpuRunnerOptions::gemv_variant).
  int variant = 0;
  // Before waiting for the kernel launched just before this one (programmatic dependent launch),
  // each warp asks L2 for all of its weight rows (cp.async.bulk.prefetch; Hopper and newer, else
  // ignored), so they stream in while that kernel still runs. A cache hint: the same bits either
  // way. For a projection whose weights fit in L2 behind a long kernel (o_proj after attention):
  // asked of every GEMV it made batch-1 decode 13% slower on an H200 (docs/PERFORMANCE.md).
  bool l2_prefetch = false;
  // Input RMSNorm (a decode step's residual-add RMSNorm folded into the projection that follows
  // it): when set, x is the f32 residual stream [m, k] (row stride ldx, 16-byte aligned) and the
  // GEMV applies W to x * rsqrt(mean(x^2) + norm_eps) * norm_weight, in f32, instead of x.
  const float* norm_weight = nullptr;  // [k], f32, 16-byte aligned
  float norm_eps = 0.0f;
  // y += x W^T (+ bias) instead of y = ...: the projection adds itself to the residual stream.
  // out_type must be f32, and y must not alias x.
  bool accumulate = false;
  // SiLU-mul folded into the gate/up projection: W holds the n / 2 gate rows, then the n / 2 up
  // rows (n even), and y [m, n / 2] (row stride ldy) gets silu(g_i) * u_i for g_i = x.W_i and
  // u_i = x.W_{n/2+i}, each rounded to out_type first: exactly what LaunchSiluMul computes from
  // this GEMV's plain output. out_type must be act; no bias, no accumulate; `variant` is ignored.
  bool silu_pairs = false;
  // RoPE and the KV cache write folded into the q/k/v projection (rope_heads > 0): W holds
  // rope_heads q heads, then kv_heads k heads, then kv_heads v heads of head_dim rows each
  // (n = (rope_heads + 2 kv_heads) head_dim), and out_type is act. Each output is rounded to act;
  // q and k rows i and i + head_dim / 2 of a head are rotated by positions[r] * inv_freq[i]; y gets
  // them all, and the k and v heads of row r also go to cache slot slots[r] (none for a negative
  // slot or one at or past cache_slots): exactly this GEMV's plain output followed by
  // LaunchRopeWriteKv. No accumulate; `variant` is ignored.
  int64_t rope_heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;                // even
  const int32_t* positions = nullptr;  // [m]
  const float* inv_freq = nullptr;     // [head_dim / 2]
  const int64_t* slots = nullptr;      // [m]
  int64_t cache_slots = 0;             // num_blocks * block_tokens
  void* k_cache = nullptr;             // [cache_slots, kv_heads, head_dim], act
  void* v_cache = nullptr;
};
bool GemvSupported(const GemvArgs& a);
cudaError_t LaunchGemv(const GemvArgs& a, cudaStream_t stream);

// Element type conversion: out[i] = (out_type) in[i].
cudaError_t LaunchConvert(const void* in, ActType in_type, void* out, ActType out_type, int64_t n,
                          cudaStream_t stream);

// out[i] = mean + stddev * N(0, 1), drawn from a counter-based hash of (seed, i): the same values
// for the same seed on any GPU, in any launch shape.
cudaError_t LaunchRandomNormal(void* out, ActType type, int64_t n, float mean, float stddev,
                               uint64_t seed, cudaStream_t stream);

}  // namespace strata::gpu

#endif  // STRATA_KERNELS_CUDA_OPS_KERNEL_H_
