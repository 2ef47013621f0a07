// Capacity planning: how to size Strata workers for a model, a GPU and a workload.
//
// MakePlan is a pure function of its inputs. It counts the model's weights and per-token KV bytes
// from config.json, then gives each GPU its weights, a scratch estimate and a KV cache. From the
// KV cache it works out how many sequences fit, and from the time-per-output-token target how many
// may share a decode step. The decode step is memory-bound: it reads every weight once plus the
// batch's KV at the GPU's copy bandwidth times a measured efficiency. Prefill is compute-bound: two
// FLOPs per parameter per token plus attention, at the GPU's dense bf16 rate times a measured
// efficiency. The plan then gives:
//   - requests per second per worker, and the workers a request rate needs at a target utilization;
//   - host and disk KV tiers, sized to keep a set of conversations warm between turns, with each
//     tier slot's exact size (memtier's slot format, compression included);
//   - the worker flags and pod resources that would deploy it (EmitK8sPatch).
// The efficiencies default to what bench/gpu_bench measured of Strata on each GPU
// (docs/PERFORMANCE.md). The plan models neither queueing nor the coordinator; TTFT is the
// prefill time of one uncached prompt on an otherwise idle GPU. cli/simulate.h replays a workload
// with queueing, batching and caching, at step costs from PlanStepCost.
#ifndef STRATA_CLI_PLAN_H_
#define STRATA_CLI_PLAN_H_

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "cli/args.h"
#include "cli/simulate.h"
#include "kernels/dtype.h"
#include "memtier/kv_codec.h"
#include "worker/model/config.h"

namespace strata {

struct GpuSpec {
  std::string name;
  double memory_bytes = 0;
  // Device-to-device copy bandwidth, bytes read plus written per second: what gpu_bench divides a
  // decode step's bytes by for its roofline.
  double copy_bytes_per_s = 0;
  // Dense bf16 tensor-core FLOP/s.
  double flops = 0;
  // Achieved share of the copy-bandwidth roofline in decode steps' weight (and delta) reads, and
  // of the dense FLOP rate in prefill: measured of Strata by bench/gpu_bench where the card was
  // available, else the H100's. H100 (2026-11-26, tiled attention kernels): 76% at batch 1, 71% at
  // batch 64, prefill of a 2048-token prompt at 33% of the GEMM rate, fitted with one efficiency.
  // H200 (2026-11-27, decode attention kernel and tensor-core prefill): the weights at 74%, the
  // KV cache at 29% (kv_efficiency; attention at batch 64 is far from the bandwidth), prefill at
  // 58%.
  double decode_efficiency = 0.73;
  double prefill_efficiency = 0.33;
  // Where the figures come from ("measured by bench/gpu_bench ..." or "datasheet x 0.9").
  std::string source;
  // Share of the copy bandwidth at which decode attention reads the KV cache (0: as the weights,
  // decode_efficiency).
  double kv_efficiency = 0;
};

// The built-in GPUs, by the names --gpu takes.
const std::vector<GpuSpec>& KnownGpus();
// INVALID_ARGUMENT naming the known ones for any other name.
absl::StatusOr<GpuSpec> FindGpu(const std::string& name);

struct Workload {
  // Requests per second the cluster must serve (0: plan one worker and report its capacity).
  double rate_rps = 0;
  int64_t prompt_tokens = 1024;
  int64_t output_tokens = 256;
  // Leading prompt tokens every request shares (a system prompt): computed once per worker.
  int64_t shared_prefix_tokens = 0;
  // Time per output token target for each sequence (0: none).
  double tpot_ms = 0;
  // Conversations whose KV should stay cached between turns, and their length in tokens (0:
  // prompt plus output tokens).
  int64_t conversations = 0;
  int64_t conversation_tokens = 0;
  // Fine-tunes served as deltas over the base (tenants), and how many of them a worker's batch
  // mixes at once (0: as many as the batch can hold, up to fine_tunes). Each distinct fine-tune in
  // a decode step reads its whole delta (DeltaZip's cost), and the active ones stay in memory.
  int64_t fine_tunes = 0;
  int64_t active_fine_tunes = 0;
};

struct PlanOptions {
  DType dtype = DType::kBF16;
  int tensor_parallel = 1;
  int64_t block_tokens = 16;
  int64_t max_running_sequences = 64;
  int64_t max_batch_tokens = 2048;
  KvCompression lower_tier_compression = KvCompression::kNone;
  // Host RAM a worker may take for its KV tier (0: as much as the conversations need).
  double host_cache_budget_bytes = 0;
  // Share of GPU memory Strata may allocate (the rest: CUDA context, cuBLAS workspaces).
  double gpu_memory_utilization = 0.92;
  // Override the GPU's decode, KV-read and prefill efficiencies (GpuSpec) when more than 0.
  double decode_efficiency = 0;
  double kv_efficiency = 0;
  double prefill_efficiency = 0;
  // Busiest share of each worker's capacity the plan allows (headroom for bursts).
  double target_utilization = 0.8;
  // The fine-tunes' delta format (stratactl delta compress --bits, --sparsity).
  int delta_bits = 4;
  bool delta_sparse_2_4 = true;
  // More than 0: the fine-tunes are LoRA adapters of this rank on every projection instead.
  int64_t lora_rank = 0;
  // GPU memory set aside on every GPU before the KV cache is sized (a draft model's weights and
  // cache, for speculative decoding).
  double reserved_gpu_bytes = 0;
  // strata-worker's --speculative_max_batch: drafts only while at most this many sequences decode,
  // and its draft model's default cache holds kDraftKvTokensPerSequence tokens of each.
  int speculative_max_batch = kGpuSpeculativeMaxBatch;
};

struct Plan {
  // The model.
  int64_t parameters = 0;
  double weight_bytes = 0;         // all ranks
  int64_t kv_bytes_per_token = 0;  // all layers, K and V, all ranks, in the cache's dtype
  double prefill_flops_per_token = 0;
  // One GPU (one tensor-parallel rank).
  double gpu_weight_bytes = 0;
  double gpu_scratch_bytes = 0;
  int64_t kv_cache_mb = 0;      // --kv_cache_mb
  int64_t kv_cache_tokens = 0;  // whole blocks, one worker (all ranks)
  // The longest sequence a worker serves: the model's context, or what the KV cache holds when
  // that is less (the worker's max_context_tokens).
  int64_t context_tokens = 0;
  // Decode.
  int64_t batch = 0;
  std::string batch_limit;            // "memory", "tpot" or "max_running_sequences"
  int64_t max_running_sequences = 0;  // --max_running_sequences
  double step_ms = 0;                 // decode step at `batch`, mean context
  double batch1_step_ms = 0;
  double decode_tokens_per_s = 0;  // one worker at `batch`
  // Prefill.
  double prefill_tokens_per_s = 0;  // one worker
  double ttft_ms = 0;               // one uncached prompt (after the shared prefix) on an idle GPU
  // Capacity.
  double gpu_seconds_per_request = 0;
  double requests_per_s_per_worker = 0;  // at 100% busy
  int64_t workers = 0;                   // for rate_rps at target_utilization (>= 1)
  double utilization = 0;                // of each worker at rate_rps
  // Disaggregated serving instead (strata-worker --role): prefill workers for the prompts'
  // uncached tokens, decode workers for the generations, each pool at target_utilization; and the
  // KV a request's handoff copies (its whole prompt) and how long that takes at kKvCopyBytesPerS,
  // a gap between its first and second token.
  int64_t split_prefill_workers = 0;
  int64_t split_decode_workers = 0;
  double handoff_bytes = 0;
  double handoff_ms = 0;
  // Tiers (per worker).
  int64_t tier_slot_bytes = 0;  // one block in the host or disk tier
  double warm_set_bytes = 0;    // conversations' KV per worker, in tier slots
  int64_t host_cache_mb = 0;    // --host_cache_mb
  int64_t disk_cache_mb = 0;    // --disk_cache_mb
  // Fine-tunes (when Workload::fine_tunes > 0).
  double delta_bytes = 0;           // one fine-tune's delta (its projection matrices), as the
                                    // delta cache counts it (a LoRA adapter's factors in f32)
  double delta_read_bytes = 0;      // what a decode step reads of it on the GPU
  int64_t active_fine_tunes = 0;    // distinct fine-tunes in a full decode batch
  int64_t delta_cache_mb = 0;       // --delta_cache_mb: the active deltas, on the GPU and in RAM
  double batch1_delta_step_ms = 0;  // a batch-1 step of a fine-tune's sequence
  // Pod resources.
  int64_t pod_memory_request_mb = 0;
  int64_t pod_memory_limit_mb = 0;
  int64_t disk_volume_gib = 0;
  std::vector<std::string> notes;
};

absl::StatusOr<Plan> MakePlan(const ModelConfig& model, const GpuSpec& gpu,
                              const Workload& workload, const PlanOptions& options);

// What a step of one worker (all its tensor-parallel ranks) costs under the plan's roofline, for
// the simulator (cli/simulate.h): the bandwidth and FLOP terms that MakePlan's decode and prefill
// figures come from, and a host-tier block's copy at kHostToDeviceBytesPerS.
StepCost PlanStepCost(const ModelConfig& model, const GpuSpec& gpu, const PlanOptions& options);
// Host-to-device copies from pinned memory (PCIe Gen4 x16 in practice; Gen5 is about twice).
inline constexpr double kHostToDeviceBytesPerS = 25e9;
// KV blocks copied between workers over gRPC on TCP (Worker.FetchKvBlocks): 0.5-0.9 GB/s measured
// on loopback between CPU workers (docs/PERFORMANCE.md); not measured between GPU workers.
inline constexpr double kKvCopyBytesPerS = 1e9;
// Reading a fine-tune's delta file that is not in the page cache (one NVMe drive).
inline constexpr double kDeltaReadBytesPerS = 2e9;
// One fine-tune's delta in options' format: its projection matrices packed as `stratactl delta
// compress` packs them (kernels/delta.h); norms and biases are negligible, and the embedding and
// LM head are left out (a fine-tune that changes them adds their share).
double DeltaBytes(const ModelConfig& model, int bits, bool sparse_2_4);
// A LoRA adapter of rank `rank` on all seven projections of every layer: rank x (in + out) values
// a projection, at `value_bytes` each (4 in the delta cache, the activations' size on the GPU).
double LoraBytes(const ModelConfig& model, int64_t rank, double value_bytes);

// Speculative decoding with a draft model (strata-worker --draft_model) at batch 1, under the
// same roofline as the plan: each step the draft runs k batch-1 passes and the target one pass
// over 1 + k rows, and keeps a draft token with probability `acceptance` (independently, so a
// step yields (1 - a^(k+1)) / (1 - a) tokens).
struct SpeculationPlan {
  int64_t draft_parameters = 0;
  double draft_gpu_weight_bytes = 0;  // on each GPU (the draft runs whole beside rank 0: on one)
  // Its KV cache as strata-worker sizes it by default (DraftReservation).
  double draft_kv_cache_bytes = 0;
  int num_speculative_tokens = 0;
  int speculative_max_batch = 0;  // PlanOptions::speculative_max_batch
  double acceptance = 0;
  double draft_step_ms = 0;   // one batch-1 pass of the draft
  double verify_step_ms = 0;  // the target's pass over its last token and k drafts
  double tokens_per_step = 0;
  double ms_per_token = 0;  // against the plan's batch1_step_ms without drafts
  double speedup = 0;
};
// What a draft model takes on the GPU beside the model: its weights, and its KV cache as
// strata-worker sizes it by default (--draft_kv_cache_mb=0): kDraftKvTokensPerSequence tokens of
// each of the options.speculative_max_batch sequences that may draft at once, or, where the model's
// own cache would then hold fewer tokens, as many tokens as it holds (the two sharing the room), in
// `options.dtype`. The errors are MakePlan's for the model beside the draft's weights alone.
struct DraftReservation {
  double weight_bytes = 0;
  double kv_cache_bytes = 0;
};
absl::StatusOr<DraftReservation> ReserveForDraft(const ModelConfig& model, const ModelConfig& draft,
                                                 const GpuSpec& gpu, const Workload& workload,
                                                 const PlanOptions& options);
// INVALID_ARGUMENT naming --draft-model when its vocabulary is not the model's, or the flags'
// names for an acceptance outside (0, 1] or k outside 1..32.
absl::StatusOr<SpeculationPlan> PlanSpeculation(const ModelConfig& model, const ModelConfig& draft,
                                                const GpuSpec& gpu, const Workload& workload,
                                                const PlanOptions& options, const Plan& plan,
                                                double acceptance, int num_speculative_tokens);

// The strata-worker flags that deploy `plan` (without --listen, --model or --worker_id).
std::vector<std::string> WorkerFlags(const Plan& plan, const PlanOptions& options);

// A kustomize patch of k8s/gpu's StatefulSet strata-worker: replicas, args, resources and the
// disk tier's volume, for an overlay whose resources include k8s/gpu.
std::string EmitK8sPatch(const Plan& plan, const PlanOptions& options);
// The same for k8s/gpu-disaggregated: its decode StatefulSet (strata-worker, --role=decode,
// split_decode_workers replicas) and its prefill one (strata-prefill, --role=prefill,
// split_prefill_workers), each with the plan's flags and resources.
std::string EmitK8sDisaggregatedPatch(const Plan& plan, const PlanOptions& options);

// The flags of `stratactl plan`, parsed (unknown ones refused by name).
absl::StatusOr<Args> ParsePlanArgs(const std::vector<std::string>& argv);

// The names of the flags those three read (the model, the GPU and PlanOptions), which `stratactl
// plan` and `stratactl simulate` both take.
absl::flat_hash_set<std::string> PlanMachineFlags();
// The model, GPU and options flags `stratactl plan` shares with `stratactl simulate`.
absl::StatusOr<ModelConfig> PlanModelFromArgs(const Args& args);
absl::StatusOr<GpuSpec> PlanGpuFromArgs(const Args& args);
absl::StatusOr<PlanOptions> PlanOptionsFromArgs(const Args& args, const GpuSpec& gpu);

// `stratactl plan`: reads --model (a directory with config.json, or the file), --gpu or the
// --gpu-* figures, the workload and options; prints a table, --json, or --emit k8s.
absl::Status PlanCommand(const Args& args, std::FILE* out);

}  // namespace strata

#endif  // STRATA_CLI_PLAN_H_
