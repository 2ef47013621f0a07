// The CUDA twins of the CPU ops of a transformer layer: embedding, fused residual add + RMSNorm,
// per-head RMSNorm, rotary embedding, SiLU-mul, KV cache writes, paged attention, greedy argmax,
// conversions and seeded random fills. Each validates its arguments (INVALID_ARGUMENT naming the
// field) and launches asynchronously on `stream`; the argument structs and their meaning are in
// kernels/cuda/ops_kernel.h. GEMMs are in kernels/cuda/gemm.h, KV block copies in
// kernels/kv_block_copy.h.
#ifndef STRATA_KERNELS_CUDA_OPS_H_
#define STRATA_KERNELS_CUDA_OPS_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kernels/cuda/ops_kernel.h"
#include "kernels/dtype.h"
#include "kernels/stream.h"

namespace strata {

// The activation type for a weight dtype: f32, f16 and bf16 map to themselves; INVALID_ARGUMENT for
// the rest.
absl::Status ActTypeOf(DType dtype, gpu::ActType* out);

absl::Status EmbedCuda(const gpu::EmbedArgs& a, CudaStreamHandle stream);
absl::Status AddRmsNormCuda(const gpu::AddRmsNormArgs& a, CudaStreamHandle stream);
absl::Status HeadRmsNormCuda(const gpu::HeadRmsNormArgs& a, CudaStreamHandle stream);
absl::Status RopeCuda(const gpu::RopeArgs& a, CudaStreamHandle stream);
absl::Status SiluMulCuda(const gpu::SiluMulArgs& a, CudaStreamHandle stream);
absl::Status WriteKvCacheCuda(const gpu::WriteKvArgs& a, CudaStreamHandle stream);
// RopeCuda(rope) then WriteKvCacheCuda(kv) in one launch; kv.k and kv.k_stride must be rope's.
absl::Status RopeWriteKvCuda(const gpu::RopeArgs& rope, const gpu::WriteKvArgs& kv,
                             CudaStreamHandle stream);
// The decode GEMV (gpu::GemvArgs) called directly, for its fused forms (input RMSNorm over the
// f32 residual, accumulation into it); INVALID_ARGUMENT when the kernel cannot take the arguments.
absl::Status GemvCuda(const gpu::GemvArgs& a, CudaStreamHandle stream);
absl::Status PagedAttentionCuda(const gpu::PagedAttentionArgs& a, CudaStreamHandle stream);
absl::Status ArgmaxCuda(const gpu::ArgmaxArgs& a, CudaStreamHandle stream);
// Seeded sampling (penalties, bans, temperature, top-k / min-p / top-p, the host's draw): see
// gpu::SampleArgs. Needs gpu::SampleWorkspaceBytes(rows, vocab, sorted_draws) bytes of workspace.
absl::Status SampleCuda(const gpu::SampleArgs& a, CudaStreamHandle stream);

// Host-side planning of paged attention: cuts the batch's query tokens (host copies of token_seq
// and token_pos) into tiles of at most `max_tile_tokens` consecutive tokens of one sequence at
// consecutive positions. Returns (first token, count) pairs, flattened.
std::vector<int32_t> PlanAttentionTiles(absl::Span<const int32_t> token_seq,
                                        absl::Span<const int32_t> token_pos,
                                        int64_t max_tile_tokens);

// Tokens per tile that fit one block for this head_dim and GQA group.
int64_t AttentionTileTokens(int64_t head_dim, int64_t group);
// Tokens per tile for the tensor-core kernel (PagedAttentionArgs::mma_prefill) and this group.
int64_t AttentionMmaTileTokens(int64_t group);
// Whether the tensor-core kernel supports this shape and fits the current device's shared memory.
bool AttentionMmaRunsHere(gpu::ActType act, int64_t head_dim, int64_t group);

// Chooses num_partitions and partition_keys (set num_tiles and num_kv_heads first) for queries that
// see at most `max_keys` keys: split-K only when the tiles alone leave `multiprocessors` short of
// about two blocks each, with at most one partition per 128 keys (64 for the decode kernel: set
// decode_kernel and tiles first too).
void ChooseAttentionPartitions(int64_t max_keys, int64_t multiprocessors,
                               gpu::PagedAttentionArgs* a);

}  // namespace strata

#endif  // STRATA_KERNELS_CUDA_OPS_H_
