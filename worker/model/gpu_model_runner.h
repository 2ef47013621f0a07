// GpuModelRunner: the forward pass of a Llama-family decoder on one GPU, the twin of ModelRunner
// (worker/model/model_runner.h) with the same ForwardBatch.
//
// Weights (converted to the activation type: f32, f16 or bf16, with q/k/v and gate/up fused into
// one matrix each), the paged KV cache and all scratch live in one device allocation made at
// creation (plain cudaMalloc, no managed memory); only seeded sampling's buffers (about 28 bytes x
// max_seqs x vocab) are allocated apart, on its first use. A step's inputs go up from pinned host
// memory on a copy stream, which the compute stream waits for through an event; results come back
// the same way. Decode steps (one token per sequence) run as CUDA graphs captured once per padded
// batch size, so a step costs one launch instead of hundreds. The residual stream is f32; every
// GEMM (cuBLASLt) and reduction accumulates in f32.
//
// Fine-tunes (ForwardBatch::seq_deltas) run as on the CPU runner: the base's projections for the
// whole batch, then each fine-tune's delta for its own rows, through the CUDA delta kernels
// (kernels/cuda/delta.h): a decode GEMV over the packed delta for a few rows, or panels of the
// delta unpacked for a cuBLASLt GEMM over many. A delta is copied to a device region of
// GpuRunnerOptions::delta_bytes on its first step and stays there until room is needed (least
// recently used first); steps with fine-tunes run without CUDA graphs and without the fused
// decode projections.
//
// World size 1 only for now: tensor parallelism over NCCL is not wired here yet. Thread contract:
// one thread at a time. In a build without CUDA every entry point returns UNAVAILABLE.
#ifndef STRATA_WORKER_MODEL_GPU_MODEL_RUNNER_H_
#define STRATA_WORKER_MODEL_GPU_MODEL_RUNNER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/cuda/sample_row.h"
#include "kernels/dtype.h"
#include "worker/model/config.h"
#include "worker/model/model_runner.h"
#include "worker/model/weights.h"

namespace strata {

struct GpuRunnerOptions {
  // The paged KV cache: num_blocks blocks of block_tokens tokens, in the activation type.
  int64_t num_blocks = 1024;
  int64_t block_tokens = 16;
  // Activation (and weight) type on the GPU: kF32, kF16 or kBF16.
  DType act = DType::kBF16;
  // Most tokens in one forward pass, most sequences in one batch, longest block table.
  int64_t max_batch_tokens = 4096;
  int64_t max_seqs = 64;
  int64_t max_blocks_per_seq = 256;
  // Capture decode steps as CUDA graphs (per padded batch size 1, 2, 4, ... up to max_seqs).
  bool cuda_graphs = true;
  // GEMMs of up to gemv_max_rows rows (decode) through Strata's GEMV kernel rather than
  // cuBLASLt (0 to 8: the kernel takes at most 8). On an H200 (2026-11-27, Llama-3-8B shape, bf16)
  // the GEMV made batch-1 steps 2.8% faster (down_proj keeps cuBLASLt), but batch 2 4% slower, 4
  // 25% and 8 83% (it reads x once per weight vector for every row); docs/PERFORMANCE.md. Both
  // row limits here are rounded down to a power of two (the batch sizes decode graphs run at).
  bool small_m_gemv = true;
  int64_t gemv_max_rows = 1;
  // The GEMV kernel's block shape (gpu::GemvArgs::variant, 0 to gpu::kGemvVariants - 1; see
  // gemv.cu). 1 (a row a warp, 4 warps a block, 4 vectors in flight a lane) made batch-1 decode
  // 3.4% faster than 0 (2 rows a warp, 8 warps, 2 vectors) on an H200 (2026-11-27; 4, the same
  // with 8 warps, 3.1%). The two-stage shapes (8 to 10) are not yet measured.
  int gemv_variant = 1;
  // Which decode projections may take the GEMV kernel (the others take cuBLASLt), to measure them
  // one at a time (gpu_bench's gemv_routes). down_proj's rows are longer than CublasLtGemm gives
  // the GEMV (k over 8192: Llama-3-8B's 14336); `down` sends them to it anyway (experiment, off:
  // with variant 0 it was 2% slower than cuBLASLt's split-K on an H200; the two-stage shapes are
  // not yet measured; gpu_bench's gemv_down runs).
  struct GemvRoutes {
    bool qkv = true, o_proj = true, gate_up = true, lm_head = true, down = false;
  };
  GemvRoutes gemv_routes;
  // Experiment, off: o_proj's GEMV asks L2 for its weights while attention runs
  // (GemvArgs::l2_prefetch); asked of every GEMV it was 13% slower, not yet measured alone.
  bool gemv_prefetch_o_proj = false;
  // Experiment, off: decode steps the GEMV takes (up to gemv_max_rows rows, qkv routed to it, no
  // fine-tunes, no per-head q/k norms) apply RoPE and write the KV cache in the q/k/v GEMV
  // (GemvArgs::rope_heads) instead of a kernel of their own: one kernel less a layer. Part of
  // fused_residual_norm, which was slower for its norms; not yet measured alone. The GEMV then
  // takes variant 0's shape.
  bool gemv_rope = false;
  // Experiment, off: seeded sampling splits each row's logits over blocks
  // (gpu::SampleArgs::split_rows) instead of one block walking the vocabulary; the same tokens.
  bool sampler_split_rows = false;
  // Decode steps' attention through the decode kernel (PagedAttentionArgs::decode_kernel: lanes
  // share each key, partitions merge in the same kernel) instead of the tiled one, for steps of
  // up to decode_attention_max_rows sequences. On an H200 (2026-11-27, Llama-3-8B shape, bf16)
  // 3-8% faster from batch 1 to 16 (512- and 2048-token contexts); since the tiled kernel's
  // 16-byte loads, slower at batch 32 and 64 (15% and 36% at 2048 tokens).
  bool decode_attention_kernel = true;
  int64_t decode_attention_max_rows = 16;
  // Decode steps (up to 4 tokens, with small_m_gemv) fold each residual-add RMSNorm into the
  // projections around it: o_proj and down_proj add themselves to the f32 residual, qkv and
  // gate_up normalize it as they read it (GemvArgs::norm_weight, accumulate), so a layer runs
  // no norm kernel; gate_up also applies SiLU-mul itself (GemvArgs::silu_pairs). Models with an
  // o_proj bias keep the separate kernels. Off: its tests pass, but on an H200 it made batch-1
  // decode 3.6% slower than the decode attention kernel alone (the norm-reading GEMVs were slower
  // than the norm kernels they replace; docs/PERFORMANCE.md). Since then each GEMV block writes
  // the normalized rows to shared memory once instead of scaling every load of x, and, for models
  // without per-head q/k norms, the qkv GEMV also applies RoPE and writes the KV cache
  // (GemvArgs::rope_heads), so a layer is five kernels (with the decode attention kernel): qkv,
  // attention, o_proj, gate_up, down; still 7% slower on an H200 (2026-11-27). Fused steps are
  // GEMVs: up to gemv_max_rows rows.
  bool fused_residual_norm = false;
  // Attention over planned tiles (prefill and prompt chunks) in bf16 and f16 through the
  // tensor-core kernel (PagedAttentionArgs::mma_prefill; tiles of 64 query rows). On an H200
  // (2026-11-27) 2.5x the tiled kernel's prefill of 2048 tokens, with every GPU test passing.
  bool prefill_mma_attention = true;
  // With prefill_mma_attention: the mma.sync kernel (PagedAttentionArgs::mma_sync), which keeps
  // scores and probabilities in registers where the wmma kernel passes them through shared
  // memory, flash-attention-2 style. Same tiles and rounding. Off until a GPU run shows it
  // correct and faster (built 2026-11-27 without a GPU).
  bool prefill_mma_sync = false;
  // The decode attention kernel's build for one block an SM (PagedAttentionArgs::
  // decode_one_block): up to 255 registers a thread where the usual build spills in its key loop
  // (bf16 and f16 at head_dim 128: Llama-3-8B's shape). Off until measured on a GPU.
  bool decode_attention_one_block = false;
  // Device memory for fine-tunes' packed deltas (0: steps with fine-tunes are refused). A step's
  // fine-tunes must fit together. Steps with fine-tunes also take a scratch of about 64 MiB (less
  // for small models) for delta panels.
  int64_t delta_bytes = 0;
};

// What the runner holds on the device.
struct GpuRunnerMemory {
  int64_t weight_bytes = 0;
  int64_t kv_cache_bytes = 0;
  int64_t scratch_bytes = 0;
  // The fine-tune delta region and its panel scratch.
  int64_t delta_bytes = 0;
};

// The fine-tune deltas on the device.
struct GpuDeltaStats {
  int64_t capacity_bytes = 0;  // the region (GpuRunnerOptions::delta_bytes)
  int64_t resident = 0;
  int64_t bytes_used = 0;
  int64_t uploads = 0;
  int64_t evictions = 0;
};

class GpuModelRunner {
 public:
  // Uploads `weights` (world size 1). UNAVAILABLE without a usable GPU; INVALID_ARGUMENT for a
  // model the kernels cannot run (head_dim not 16/32/64/128/256, a GQA group over the rows a block
  // holds) or bad options; RESOURCE_EXHAUSTED when it does not fit.
  static absl::StatusOr<std::unique_ptr<GpuModelRunner>> Create(const ModelWeights& weights,
                                                                const GpuRunnerOptions& options);
  // Random weights (normal, std 0.02; norms 1) drawn on the GPU from `seed`, for benchmarks of
  // models whose files are not at hand: only config.json is needed.
  static absl::StatusOr<std::unique_ptr<GpuModelRunner>> CreateRandom(
      const ModelConfig& config, const GpuRunnerOptions& options, uint64_t seed);
  ~GpuModelRunner();
  GpuModelRunner(const GpuModelRunner&) = delete;
  GpuModelRunner& operator=(const GpuModelRunner&) = delete;

  // logits: [logit_tokens.size(), vocab_size] f32, host. The batch's slots and block tables refer
  // to this runner's KV cache. INVALID_ARGUMENT as ModelRunner::Forward, and for batches over the
  // options' limits.
  absl::Status Forward(const ForwardBatch& batch, absl::Span<float> logits);
  // Greedy decoding on the GPU: tokens[i] is the argmax of logit_tokens[i]'s logits (lowest id
  // among equals, as the CPU sampler), logprobs[i] its log-probability (logprobs may be empty).
  absl::Status ForwardGreedy(const ForwardBatch& batch, absl::Span<int32_t> tokens,
                             absl::Span<float> logprobs);

  // Seeded sampling on the GPU (gpu::SampleArgs), one row per logit token (at most max_seqs): the
  // token the CPU sampler would draw from these logits with these options, and its
  // log-probability, without bringing the logits to the host. The lists are CSR ranges per row as
  // SampleArgs describes them (offsets may be empty for none).
  struct Sampling {
    absl::Span<const gpu::SampleRow> rows;
    absl::Span<const int32_t> pen_offsets, pen_tokens, pen_counts;
    absl::Span<const int32_t> ban_offsets, ban_tokens;
    // Rows (indices into the logit tokens, ascending) whose logits also come back to the host as
    // the model produced them, before the sampler's penalties and temperature: rows the caller
    // samples itself (one that reports log-probabilities), while the GPU samples the rest.
    // host_logits: [host_rows.size(), vocab_size] f32, host.
    absl::Span<const int32_t> host_rows;
    absl::Span<float> host_logits;
  };
  absl::Status ForwardSample(const ForwardBatch& batch, const Sampling& sampling,
                             absl::Span<int32_t> tokens, absl::Span<float> logprobs);

  // The paged KV cache, for tier copies: 2 x num_layers device arrays, K then V of each layer, each
  // [num_blocks, block_tokens, num_kv_heads, head_dim] in the activation type. Every step's
  // writes to them are complete when its Forward call returns, and a step reads them only after
  // it is called, so host-ordered copies between steps need no further synchronization.
  std::vector<void*> KvSegments() const;

  const ModelConfig& config() const;
  GpuRunnerMemory memory() const;
  GpuDeltaStats delta_stats() const;
  int64_t graphs_captured() const;
  // Device time of the last step's work, from its inputs' arrival to its results (CUDA events): the
  // step's wall time less the host's share.
  double last_step_device_ms() const;

 private:
  struct Impl;
  // Runs the batch and copies out the logits, or (greedy, or sampled when `sampling` is set) the
  // tokens and log-probabilities.
  absl::Status Step(const ForwardBatch& batch, bool greedy, const Sampling* sampling,
                    float* logits_out, int32_t* tokens_out, float* logprobs_out);
  // Step's work; Step makes sure the GPU is idle when it returns, on every path.
  absl::Status RunStep(const ForwardBatch& batch, bool greedy, const Sampling* sampling,
                       float* logits_out, int32_t* tokens_out, float* logprobs_out);
  explicit GpuModelRunner(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata

#endif  // STRATA_WORKER_MODEL_GPU_MODEL_RUNNER_H_
