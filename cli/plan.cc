#include "cli/plan.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "common/json.h"
#include "common/mapped_file.h"
#include "common/status_macros.h"
#include "kernels/delta.h"
#include "memtier/slot_format.h"

namespace strata {
namespace {

constexpr double kMiB = 1024.0 * 1024.0;
constexpr double kGiB = 1024.0 * kMiB;
// Host memory a GPU worker needs besides its host KV tier: the process, the CUDA context's host
// side, pinned staging, and page cache while the weights load.
constexpr int64_t kPodOverheadMiB = 8192;
// Sequential write rate assumed for the disk tier when sizing --persist_kv_s (one NVMe drive).
constexpr double kPersistBytesPerS = 2e9;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The spelling of strata-worker's --gpu_dtype: safetensors' name in lower case.
std::string FlagName(DType t) { return absl::AsciiStrToLower(DTypeName(t)); }

}  // namespace

double DeltaBytes(const ModelConfig& m, int bits, bool sparse_2_4) {
  const int64_t h = m.hidden_size, q = m.q_dim(), kv = m.kv_dim(), f = m.intermediate_size;
  const int64_t shapes[][2] = {{q, h}, {kv, h}, {kv, h}, {h, q}, {f, h}, {f, h}, {h, f}};
  double bytes = 0;
  for (const auto& s : shapes) {
    PackedDelta d;
    d.rows = s[0];
    d.cols = s[1];
    d.bits = bits;
    d.sparse_2_4 = sparse_2_4;
    bytes += static_cast<double>(d.PackedBytes());
  }
  return bytes * m.num_layers;
}

double LoraBytes(const ModelConfig& m, int64_t rank, double value_bytes) {
  const int64_t h = m.hidden_size, q = m.q_dim(), kv = m.kv_dim(), f = m.intermediate_size;
  const int64_t in_plus_out = (q + h) + 2 * (kv + h) + (h + q) + 2 * (f + h) + (h + f);
  return static_cast<double>(rank) * in_plus_out * value_bytes * m.num_layers;
}

namespace {

// What tp ranks of a GPU achieve: bytes/s for weights and deltas, for the KV cache, and FLOP/s
// for prefill (the GPU's efficiencies unless the options override them).
struct Rates {
  double bandwidth, kv_bandwidth, flops;
};

Rates RatesOf(const GpuSpec& gpu, const PlanOptions& options, int64_t tp) {
  const double decode =
      options.decode_efficiency > 0 ? options.decode_efficiency : gpu.decode_efficiency;
  const double kv = options.kv_efficiency > 0 ? options.kv_efficiency
                    : gpu.kv_efficiency > 0   ? gpu.kv_efficiency
                                              : decode;
  const double prefill =
      options.prefill_efficiency > 0 ? options.prefill_efficiency : gpu.prefill_efficiency;
  return {tp * gpu.copy_bytes_per_s * decode, tp * gpu.copy_bytes_per_s * kv,
          tp * gpu.flops * prefill};
}

}  // namespace

const std::vector<GpuSpec>& KnownGpus() {
  static const std::vector<GpuSpec>* gpus = new std::vector<GpuSpec>{
      {"h100", 80e9, 3009e9, 794e12, 0.73, 0.33,
       "H100 80GB HBM3 (SXM): bandwidth, GEMM rate and Strata's efficiencies measured by "
       "bench/gpu_bench"},
      {"h200", 141e9, 4205e9, 780e12, 0.748, 0.575,
       "H200 141GB HBM3e: bandwidth, GEMM rate and Strata's efficiencies measured by "
       "bench/gpu_bench",
       0.394},
      {"a100", 80e9, 0.9 * 2039e9, 0.9 * 312e12, 0.73, 0.33,
       "A100 80GB SXM: datasheet bandwidth and dense bf16 rate x 0.9, the H100's efficiencies "
       "(not measured)"},
      {"l40s", 48e9, 0.9 * 864e9, 0.9 * 362e12, 0.73, 0.33,
       "L40S 48GB: datasheet bandwidth and dense bf16 rate x 0.9, the H100's efficiencies (not "
       "measured)"},
  };
  return *gpus;
}

absl::StatusOr<GpuSpec> FindGpu(const std::string& name) {
  std::vector<std::string> names;
  for (const GpuSpec& g : KnownGpus()) {
    if (g.name == name) return g;
    names.push_back(g.name);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--gpu \"", name, "\" is not one of ", absl::StrJoin(names, ", "),
                   " (or give --gpu-memory-gib, --gpu-bandwidth-gbps and "
                   "--gpu-tflops)"));
}

absl::StatusOr<Plan> MakePlan(const ModelConfig& model, const GpuSpec& gpu,
                              const Workload& workload, const PlanOptions& options) {
  const int tp = options.tensor_parallel;
  if (tp < 1 || model.num_kv_heads % tp != 0 || model.num_heads % tp != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tensor-parallel ", tp, " must divide the model's ", model.num_heads,
                     " attention heads and ", model.num_kv_heads, " KV heads"));
  }
  if (workload.prompt_tokens < 1 || workload.output_tokens < 1) {
    return absl::InvalidArgumentError("--prompt-tokens and --output-tokens must be at least 1");
  }
  if (workload.prompt_tokens + workload.output_tokens > model.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--prompt-tokens plus --output-tokens (", workload.prompt_tokens + workload.output_tokens,
        ") exceed the model's max_position_embeddings (", model.max_position_embeddings, ")"));
  }
  if (workload.shared_prefix_tokens < 0 || workload.shared_prefix_tokens > workload.prompt_tokens) {
    return absl::InvalidArgumentError("--shared-prefix-tokens must be 0 to --prompt-tokens");
  }
  const double dtype_bytes = DTypeBytes(options.dtype);
  const int64_t bt = options.block_tokens;
  Plan p;
  p.parameters = model.NumParameters();
  p.weight_bytes = static_cast<double>(p.parameters) * dtype_bytes;
  p.kv_bytes_per_token = 2 * model.num_layers * model.kv_dim() * DTypeBytes(options.dtype);
  if (workload.fine_tunes < 0 || workload.active_fine_tunes < 0 ||
      workload.active_fine_tunes > workload.fine_tunes) {
    return absl::InvalidArgumentError(
        "--fine-tunes must be 0 or more and --active-fine-tunes 0 to --fine-tunes");
  }
  if (workload.fine_tunes > 0 && options.lora_rank > 0) {
    // Held as the base's weights are (bf16 over a 16-bit base, f32 over f32: LoraFactorType) and
    // read so by a step.
    p.delta_bytes = LoraBytes(model, options.lora_rank, dtype_bytes);
    p.delta_read_bytes = p.delta_bytes;
  } else if (workload.fine_tunes > 0) {
    p.delta_bytes = DeltaBytes(model, options.delta_bits, options.delta_sparse_2_4);
    p.delta_read_bytes = p.delta_bytes;
  }

  // Prefill FLOPs per token: two per weight used (every matrix but the embedding table), plus
  // Q.K and P.V over the mean causal context of an uncached prompt.
  const int64_t shared_full = workload.shared_prefix_tokens / bt * bt;
  const int64_t uncached = workload.prompt_tokens - shared_full;
  const double embedding = static_cast<double>(model.vocab_size) * model.hidden_size;
  const double matrix_params =
      static_cast<double>(p.parameters) - (model.tie_word_embeddings ? 0.0 : embedding);
  double mean_keys = shared_full + uncached / 2.0;
  if (model.sliding_window > 0) mean_keys = std::min<double>(mean_keys, model.sliding_window);
  p.prefill_flops_per_token =
      2 * matrix_params + 4.0 * model.num_layers * model.q_dim() * mean_keys;

  // One GPU's memory.
  p.gpu_weight_bytes = p.weight_bytes / tp;
  p.gpu_scratch_bytes =
      4.0 * options.max_batch_tokens *
          (3.0 * model.hidden_size +
           (2.0 * model.intermediate_size + model.q_dim() + 2.0 * model.kv_dim()) / tp) +
      8.0 * options.max_running_sequences * model.vocab_size;
  // The active fine-tunes' deltas live on the GPU beside the KV cache (at most one per running
  // sequence).
  if (workload.fine_tunes > 0) {
    p.active_fine_tunes =
        workload.active_fine_tunes > 0
            ? workload.active_fine_tunes
            : std::min<int64_t>(workload.fine_tunes, options.max_running_sequences);
    p.delta_cache_mb =
        static_cast<int64_t>(std::ceil(p.active_fine_tunes * p.delta_bytes / tp * 1.05 / kMiB));
  }
  const double kv_bytes = gpu.memory_bytes * options.gpu_memory_utilization - p.gpu_weight_bytes -
                          p.gpu_scratch_bytes - p.delta_cache_mb * kMiB -
                          options.reserved_gpu_bytes;
  const int64_t block_bytes_rank = p.kv_bytes_per_token / tp * bt;
  if (kv_bytes < block_bytes_rank) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s's weights (%.1f GiB per GPU), scratch (%.1f GiB) and fine-tune deltas (%.1f GiB) leave "
        "no room for a KV cache in %.0f%% of %s's %.0f GB: use a larger --tensor-parallel, "
        "another --gpu or fewer --active-fine-tunes",
        model.architecture_name, p.gpu_weight_bytes / kGiB, p.gpu_scratch_bytes / kGiB,
        p.delta_cache_mb * kMiB / kGiB, 100 * options.gpu_memory_utilization, gpu.name,
        gpu.memory_bytes / 1e9));
  }
  p.kv_cache_mb = static_cast<int64_t>(kv_bytes / kMiB);
  const int64_t blocks = static_cast<int64_t>(p.kv_cache_mb * kMiB) / block_bytes_rank;
  p.kv_cache_tokens = blocks * bt;
  p.context_tokens = std::min<int64_t>(model.max_position_embeddings, p.kv_cache_tokens);

  // Decode: a step reads every weight once (one row of the embedding table per sequence) and
  // each sequence's KV over its mean context.
  const double mean_context = workload.prompt_tokens + workload.output_tokens / 2.0;
  const double step_weight_bytes =
      p.weight_bytes - (model.tie_word_embeddings ? 0.0 : embedding * dtype_bytes);
  const Rates r = RatesOf(gpu, options, tp);
  // A decode step of b sequences; with fine-tunes, every distinct one in the batch reads its delta
  // (the batch mixes min(b, active) of them).
  auto step_s = [&](double b, double deltas) {
    const double memory = (step_weight_bytes + deltas * p.delta_read_bytes) / r.bandwidth +
                          b * mean_context * p.kv_bytes_per_token / r.kv_bandwidth;
    const double compute = 2 * matrix_params * b / r.flops;
    return std::max(memory, compute);
  };
  // Distinct fine-tunes in a batch of b (base requests read none).
  auto deltas_in = [&](double b) {
    return std::min<double>(b, static_cast<double>(p.active_fine_tunes));
  };
  p.batch1_step_ms = 1e3 * step_s(1, 0);
  if (workload.fine_tunes > 0) p.batch1_delta_step_ms = 1e3 * step_s(1, 1);
  const double slowest_batch1_ms = std::max(p.batch1_step_ms, p.batch1_delta_step_ms);
  const int64_t per_sequence =
      CeilDiv(workload.prompt_tokens + workload.output_tokens - shared_full, bt) * bt;
  const int64_t by_memory = (p.kv_cache_tokens - shared_full) / per_sequence;
  if (by_memory < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "one sequence of %d tokens does not fit in the %d-token KV cache of one %s",
        workload.prompt_tokens + workload.output_tokens, p.kv_cache_tokens, gpu.name));
  }
  int64_t by_tpot = std::numeric_limits<int64_t>::max();
  if (workload.tpot_ms > 0) {
    if (slowest_batch1_ms > workload.tpot_ms) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "--tpot-ms %.1f is below a batch-1 decode step of this model on %s (%.2f ms%s)",
          workload.tpot_ms, gpu.name, slowest_batch1_ms,
          workload.fine_tunes > 0 ? ", a fine-tune's" : ""));
    }
    // The largest batch whose step fits (the step grows with the batch).
    const double t = workload.tpot_ms / 1e3;
    int64_t lo = 1, hi = int64_t{1} << 40;
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      const double b = static_cast<double>(mid);
      (step_s(b, deltas_in(b)) <= t ? lo : hi) = mid;
    }
    by_tpot = lo;
  }
  p.batch = std::min({by_memory, by_tpot, options.max_running_sequences});
  p.batch_limit = p.batch == options.max_running_sequences ? "max_running_sequences"
                  : p.batch == by_memory                   ? "memory"
                                                           : "tpot";
  p.max_running_sequences = p.batch;
  p.step_ms = 1e3 * step_s(static_cast<double>(p.batch), deltas_in(static_cast<double>(p.batch)));
  p.decode_tokens_per_s = p.batch / (p.step_ms / 1e3);

  // Prefill, and what a request costs.
  p.prefill_tokens_per_s = r.flops / p.prefill_flops_per_token;
  p.ttft_ms = 1e3 * uncached / p.prefill_tokens_per_s;
  p.gpu_seconds_per_request =
      workload.output_tokens * (p.step_ms / 1e3) / p.batch + uncached / p.prefill_tokens_per_s;
  p.requests_per_s_per_worker = 1 / p.gpu_seconds_per_request;
  p.workers = std::max<int64_t>(
      1, static_cast<int64_t>(std::ceil(
             workload.rate_rps / (p.requests_per_s_per_worker * options.target_utilization))));
  p.utilization = workload.rate_rps / (p.workers * p.requests_per_s_per_worker);
  // The same load split between prefill and decode workers.
  const auto pool = [&](double seconds_per_request) {
    return std::max<int64_t>(
        1, static_cast<int64_t>(
               std::ceil(workload.rate_rps * seconds_per_request / options.target_utilization)));
  };
  p.split_prefill_workers = pool(uncached / p.prefill_tokens_per_s);
  p.split_decode_workers = pool(workload.output_tokens * (p.step_ms / 1e3) / p.batch);
  p.handoff_bytes = static_cast<double>(workload.prompt_tokens) * p.kv_bytes_per_token;
  p.handoff_ms = 1e3 * p.handoff_bytes / kKvCopyBytesPerS;

  // Tiers: each block in a host or disk slot (header, 4 KiB alignment, compression); one slot holds
  // every rank's share of a block.
  KvBlockLayout layout;
  layout.num_segments = 2 * model.num_layers;
  layout.block_tokens = bt;
  layout.num_heads = model.num_kv_heads;
  layout.head_dim = model.head_dim;
  layout.dtype = options.dtype;
  const KvCodec codec(layout, options.lower_tier_compression);
  p.tier_slot_bytes = static_cast<int64_t>(SlotBytesFor(codec.encoded_bytes(), 4096));
  const int64_t conversation_tokens = workload.conversation_tokens > 0
                                          ? workload.conversation_tokens
                                          : workload.prompt_tokens + workload.output_tokens;
  const int64_t conversations_per_worker = CeilDiv(workload.conversations, p.workers);
  p.warm_set_bytes = static_cast<double>(conversations_per_worker) *
                     CeilDiv(conversation_tokens, bt) * p.tier_slot_bytes;
  // The host tier holds the conversations, and at least the device cache: evicted blocks and a
  // shutdown's blocks (--persist_kv_s) pass through it on their way to disk, and a disk tier needs
  // one.
  const double device_in_slots = static_cast<double>(blocks) * p.tier_slot_bytes;
  double host = std::max(p.warm_set_bytes, device_in_slots);
  if (options.host_cache_budget_bytes > 0) host = std::min(host, options.host_cache_budget_bytes);
  p.host_cache_mb = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(host / kMiB)));
  // The disk holds the conversations the host tier cannot, and room for the device cache and the
  // host tier written down at shutdown, with a quarter more for LRU churn.
  const double disk = 1.25 * std::max(p.warm_set_bytes, p.host_cache_mb * kMiB + device_in_slots);
  p.disk_cache_mb = static_cast<int64_t>(std::ceil(disk / kMiB));
  // The delta cache keeps the active deltas in RAM as well as on the GPU.
  p.pod_memory_request_mb = p.host_cache_mb + p.delta_cache_mb + kPodOverheadMiB;
  p.pod_memory_limit_mb = p.pod_memory_request_mb;
  p.disk_volume_gib = static_cast<int64_t>(std::ceil(p.disk_cache_mb * 1.1 / 1024));

  if (tp > 1) {
    p.notes.push_back(
        "tensor parallelism across GPUs is not built yet (--tensor_parallel is CPU-only): the "
        "figures assume it scales bandwidth and FLOPs with the GPUs and ignore all-reduce time");
  }
  if (workload.fine_tunes > 0 && options.lora_rank > 0) {
    p.notes.push_back(absl::StrFormat(
        "each of the %d fine-tunes is a rank-%d LoRA adapter: %.3f GiB in the delta cache, "
        "%.3f GiB on the GPU; a decode step reads one per distinct fine-tune in its batch, %d at "
        "full batch: %.2f GiB on top of the base's %.2f GiB (GPU workers serve adapters with "
        "--gpu_lora, not yet run on a GPU)",
        workload.fine_tunes, options.lora_rank, p.delta_bytes / kGiB, p.delta_read_bytes / kGiB,
        static_cast<int64_t>(deltas_in(p.batch)), deltas_in(p.batch) * p.delta_read_bytes / kGiB,
        step_weight_bytes / kGiB));
  } else if (workload.fine_tunes > 0) {
    p.notes.push_back(absl::StrFormat(
        "each of the %d fine-tunes is a %.2f GiB delta (%d-bit%s); a decode step reads one per "
        "distinct fine-tune in its batch, %d at full batch: %.2f GiB on top of the base's %.2f GiB",
        workload.fine_tunes, p.delta_bytes / kGiB, options.delta_bits,
        options.delta_sparse_2_4 ? ", 2:4" : "", static_cast<int64_t>(deltas_in(p.batch)),
        deltas_in(p.batch) * p.delta_bytes / kGiB, step_weight_bytes / kGiB));
  }
  if (p.batch_limit == "max_running_sequences" && std::min(by_memory, by_tpot) > p.batch) {
    p.notes.push_back(absl::StrFormat(
        "--max-running-sequences %d caps the batch: the KV cache and the TPOT target allow %d",
        options.max_running_sequences, std::min(by_memory, by_tpot)));
  }
  if (p.batch_limit == "memory") {
    p.notes.push_back(absl::StrFormat(
        "the KV cache (%d tokens) limits the batch to %d sequences of %d tokens: a larger GPU, "
        "--tensor-parallel or shorter requests would allow more",
        p.kv_cache_tokens, p.batch, workload.prompt_tokens + workload.output_tokens));
  }
  if (p.context_tokens < model.max_position_embeddings) {
    p.notes.push_back(absl::StrFormat(
        "one worker's KV cache holds %d tokens, less than the model's context of %d: its workers "
        "serve sequences of at most %d (prompt plus output); a larger GPU or --tensor-parallel "
        "holds more, and workers that hold more take the longer prompts",
        p.kv_cache_tokens, model.max_position_embeddings, p.context_tokens));
  }
  if (options.host_cache_budget_bytes > 0 && p.warm_set_bytes > options.host_cache_budget_bytes) {
    p.notes.push_back(absl::StrFormat(
        "the conversations' KV (%.1f GiB per worker) exceeds the host budget: %.1f GiB of it "
        "lives on disk, one disk read per turn",
        p.warm_set_bytes / kGiB, (p.warm_set_bytes - options.host_cache_budget_bytes) / kGiB));
  }
  return p;
}

StepCost PlanStepCost(const ModelConfig& model, const GpuSpec& gpu, const PlanOptions& options) {
  const double dtype_bytes = DTypeBytes(options.dtype);
  const double embedding = static_cast<double>(model.vocab_size) * model.hidden_size;
  const double parameters = static_cast<double>(model.NumParameters());
  const double matrix_params = parameters - (model.tie_word_embeddings ? 0.0 : embedding);
  const double step_weight_bytes =
      (parameters - (model.tie_word_embeddings ? 0.0 : embedding)) * dtype_bytes;
  const double kv_bytes_per_token = 2.0 * model.num_layers * model.kv_dim() * dtype_bytes;
  const Rates r = RatesOf(gpu, options, options.tensor_parallel);
  StepCost c;
  c.weights_s = step_weight_bytes / r.bandwidth;
  c.kv_token_s = kv_bytes_per_token / r.kv_bandwidth;
  c.token_s = 2 * matrix_params / r.flops;
  c.attention_pair_s = 4.0 * model.num_layers * model.q_dim() / r.flops;
  c.host_block_s = kv_bytes_per_token * options.block_tokens / kHostToDeviceBytesPerS;
  c.delta_s =
      (options.lora_rank > 0 ? LoraBytes(model, options.lora_rank, DTypeBytes(options.dtype))
                             : DeltaBytes(model, options.delta_bits, options.delta_sparse_2_4)) /
      r.bandwidth;
  return c;
}

std::vector<std::string> WorkerFlags(const Plan& plan, const PlanOptions& options) {
  std::vector<std::string> f = {
      "--device=gpu",
      absl::StrCat("--gpu_dtype=", FlagName(options.dtype)),
      absl::StrCat("--kv_cache_mb=", plan.kv_cache_mb),
      absl::StrCat("--max_running_sequences=", plan.max_running_sequences),
      absl::StrCat("--max_batch_tokens=", options.max_batch_tokens),
  };
  if (options.block_tokens != 16)
    f.push_back(absl::StrCat("--block_tokens=", options.block_tokens));
  // strata-worker refuses a disk tier without a host tier.
  if (plan.host_cache_mb > 0) {
    f.push_back(absl::StrCat("--host_cache_mb=", plan.host_cache_mb));
    f.push_back(absl::StrCat("--disk_cache_mb=", plan.disk_cache_mb));
  }
  if (options.lower_tier_compression != KvCompression::kNone) {
    f.push_back(
        absl::StrCat("--kv_compression=", KvCompressionName(options.lower_tier_compression)));
  }
  if (plan.delta_cache_mb > 0) f.push_back(absl::StrCat("--delta_cache_mb=", plan.delta_cache_mb));
  // LoRA adapters on a GPU worker (not yet run on a GPU: the worker asks for the flag).
  if (plan.delta_cache_mb > 0 && options.lora_rank > 0) f.push_back("--gpu_lora");
  if (options.speculative_max_batch != kGpuSpeculativeMaxBatch) {
    f.push_back(absl::StrCat("--speculative_max_batch=", options.speculative_max_batch));
  }
  return f;
}

namespace {

// One worker StatefulSet of the plan, as a patch: `name`, `replicas`, and `role` (--role) unless
// empty.
std::string WorkerStatefulSetPatch(const Plan& plan, const PlanOptions& options,
                                   const std::string& name, int64_t replicas,
                                   const std::string& role) {
  // Persisting writes the device cache and the host tier at kPersistBytesPerS.
  const double persist_bytes =
      plan.kv_cache_mb * kMiB + static_cast<double>(plan.host_cache_mb) * kMiB;
  const int64_t persist_s = std::clamp<int64_t>(
      static_cast<int64_t>(std::ceil(persist_bytes / kPersistBytesPerS)) + 5, 10, 600);
  const int64_t drain_s = 90;
  std::string args;
  for (const std::string& a :
       {std::string("--listen=[::]:50061"), std::string("--metrics_listen=[::]:9090"),
        std::string("--kv_transfer_listen=[::]:50062"), std::string("--model=$(STRATA_MODEL_DIR)"),
        std::string("--model_name=$(STRATA_MODEL_NAME)"), std::string("--worker_id=$(POD_NAME)"),
        std::string("--fine_tune_dir=$(STRATA_FINE_TUNE_DIR)"),
        std::string("--draft_model=$(STRATA_DRAFT_MODEL_DIR)"), std::string("--threads=8"),
        std::string("--cluster_secret_file=$(STRATA_CLUSTER_SECRET_FILE)")}) {
    absl::StrAppend(&args, "            - ", a, "\n");
  }
  for (const std::string& a : WorkerFlags(plan, options)) {
    absl::StrAppend(&args, "            - ", a, "\n");
  }
  absl::StrAppend(&args, "            - --disk_cache_path=/var/lib/strata/kv/blocks\n",
                  "            - --drain_timeout_s=", drain_s, "\n",
                  "            - --persist_kv_s=", persist_s, "\n");
  if (!role.empty()) absl::StrAppend(&args, "            - --role=", role, "\n");
  return absl::StrCat(
      "apiVersion: apps/v1\n"
      "kind: StatefulSet\n"
      "metadata:\n"
      "  name: ",
      name, "\n",
      "spec:\n"
      "  replicas: ",
      replicas, "\n",
      "  template:\n"
      "    spec:\n"
      "      terminationGracePeriodSeconds: ",
      // The drain, the 5 s a drained worker stays for peers copying its KV blocks
      // (--drain_kv_serve_s), the write to disk, and 5 s to spare.
      drain_s + 5 + persist_s + 5, "\n",
      "      containers:\n"
      "        - name: worker\n"
      "          args:\n",
      args,
      "          resources:\n"
      "            requests:\n"
      "              cpu: \"8\"\n"
      "              memory: ",
      plan.pod_memory_request_mb, "Mi\n",
      "            limits:\n"
      "              nvidia.com/gpu: ",
      options.tensor_parallel, "\n", "              memory: ", plan.pod_memory_limit_mb, "Mi\n",
      "  volumeClaimTemplates:\n"
      "    - metadata:\n"
      "        name: kv-disk\n"
      "      spec:\n"
      "        accessModes: [\"ReadWriteOnce\"]\n"
      "        resources:\n"
      "          requests:\n"
      "            storage: ",
      plan.disk_volume_gib, "Gi\n");
}

}  // namespace

std::string EmitK8sPatch(const Plan& plan, const PlanOptions& options) {
  return absl::StrCat(
      "# Written by `stratactl plan --emit k8s`: a patch of k8s/gpu's worker StatefulSet. Use it\n"
      "# from an overlay: resources: [<path to k8s/gpu>], patches: [{path: this file}].\n",
      WorkerStatefulSetPatch(plan, options, "strata-worker", plan.workers, ""));
}

std::string EmitK8sDisaggregatedPatch(const Plan& plan, const PlanOptions& options) {
  return absl::StrCat(
      "# Written by `stratactl plan --emit k8s-disaggregated`: a patch of\n"
      "# k8s/gpu-disaggregated's decode (strata-worker) and prefill (strata-prefill)\n"
      "# StatefulSets, sized apart: prefill by the prompt tokens to compute, decode by the\n"
      "# sequences generating. Use it from an overlay:\n"
      "# resources: [<path to k8s/gpu-disaggregated>], patches: [{path: this file}].\n",
      WorkerStatefulSetPatch(plan, options, "strata-worker", plan.split_decode_workers, "decode"),
      "---\n",
      WorkerStatefulSetPatch(plan, options, "strata-prefill", plan.split_prefill_workers,
                             "prefill"));
}

namespace {

absl::StatusOr<double> PositiveDouble(const Args& args, const std::string& name, double fallback,
                                      bool allow_zero) {
  ASSIGN_OR_RETURN(const double v, args.GetDouble(name, fallback));
  if (!(v > 0 || (allow_zero && v == 0)) || !std::isfinite(v)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", name, " must be ", allow_zero ? "0 or more" : "more than 0", ", not ", v));
  }
  return v;
}

absl::StatusOr<double> Fraction(const Args& args, const std::string& name, double fallback) {
  ASSIGN_OR_RETURN(const double v, args.GetDouble(name, fallback));
  if (!(v > 0 && v <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " must be in (0, 1], not ", v));
  }
  return v;
}

absl::StatusOr<int64_t> IntAtLeast(const Args& args, const std::string& name, int64_t fallback,
                                   int64_t least) {
  ASSIGN_OR_RETURN(const int64_t v, args.GetInt(name, fallback));
  if (v < least) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be at least ", least, ", not ", v));
  }
  return v;
}

std::string Quoted(const std::string& s) {
  return absl::StrCat("\"", absl::StrReplaceAll(s, {{"\\", "\\\\"}, {"\"", "\\\""}}), "\"");
}

std::string SpeculationJson(const SpeculationPlan& s) {
  return absl::StrFormat(
      "{\"draft_parameters\":%d,\"draft_gpu_weight_bytes\":%.0f,\"draft_kv_cache_bytes\":%.0f,"
      "\"num_speculative_tokens\":%d,\"speculative_max_batch\":%d,"
      "\"acceptance\":%.3f,\"draft_step_ms\":%.3f,\"verify_step_ms\":%.3f,"
      "\"tokens_per_step\":%.3f,\"ms_per_token\":%.3f,\"speedup\":%.3f}",
      s.draft_parameters, s.draft_gpu_weight_bytes, s.draft_kv_cache_bytes,
      s.num_speculative_tokens, s.speculative_max_batch, s.acceptance, s.draft_step_ms,
      s.verify_step_ms, s.tokens_per_step, s.ms_per_token, s.speedup);
}

std::string Json(const Plan& p, const GpuSpec& gpu, const PlanOptions& o) {
  std::vector<std::string> notes;
  for (const std::string& n : p.notes) notes.push_back(Quoted(n));
  std::vector<std::string> flags;
  for (const std::string& f : WorkerFlags(p, o)) flags.push_back(Quoted(f));
  return absl::StrFormat(
      "{\"gpu\":%s,\"tensor_parallel\":%d,\"parameters\":%d,\"weight_bytes\":%.0f,"
      "\"kv_bytes_per_token\":%d,\"gpu_weight_bytes\":%.0f,\"gpu_scratch_bytes\":%.0f,"
      "\"kv_cache_mb\":%d,\"kv_cache_tokens\":%d,\"context_tokens\":%d,\"batch\":%d,"
      "\"batch_limit\":%s,"
      "\"step_ms\":%.3f,\"batch1_step_ms\":%.3f,\"decode_tokens_per_s\":%.1f,"
      "\"prefill_tokens_per_s\":%.1f,\"ttft_ms\":%.2f,\"requests_per_s_per_worker\":%.3f,"
      "\"workers\":%d,\"utilization\":%.3f,\"split_prefill_workers\":%d,"
      "\"split_decode_workers\":%d,\"handoff_bytes\":%.0f,\"handoff_ms\":%.2f,"
      "\"tier_slot_bytes\":%d,\"warm_set_bytes\":%.0f,"
      "\"host_cache_mb\":%d,\"disk_cache_mb\":%d,\"pod_memory_limit_mb\":%d,"
      "\"disk_volume_gib\":%d,\"delta_bytes\":%.0f,\"active_fine_tunes\":%d,"
      "\"delta_cache_mb\":%d,\"batch1_delta_step_ms\":%.3f,\"worker_flags\":[%s],"
      "\"notes\":[%s]}\n",
      Quoted(gpu.name), o.tensor_parallel, p.parameters, p.weight_bytes, p.kv_bytes_per_token,
      p.gpu_weight_bytes, p.gpu_scratch_bytes, p.kv_cache_mb, p.kv_cache_tokens, p.context_tokens,
      p.batch, Quoted(p.batch_limit), p.step_ms, p.batch1_step_ms, p.decode_tokens_per_s,
      p.prefill_tokens_per_s, p.ttft_ms, p.requests_per_s_per_worker, p.workers, p.utilization,
      p.split_prefill_workers, p.split_decode_workers, p.handoff_bytes, p.handoff_ms,
      p.tier_slot_bytes, p.warm_set_bytes, p.host_cache_mb, p.disk_cache_mb, p.pod_memory_limit_mb,
      p.disk_volume_gib, p.delta_bytes, p.active_fine_tunes, p.delta_cache_mb,
      p.batch1_delta_step_ms, absl::StrJoin(flags, ","), absl::StrJoin(notes, ","));
}

}  // namespace

absl::StatusOr<DraftReservation> ReserveForDraft(const ModelConfig& model, const ModelConfig& draft,
                                                 const GpuSpec& gpu, const Workload& workload,
                                                 const PlanOptions& options) {
  DraftReservation r;
  r.weight_bytes = static_cast<double>(draft.NumParameters()) * DTypeBytes(options.dtype);
  const double tokens =
      static_cast<double>(options.speculative_max_batch) * kDraftKvTokensPerSequence;
  const double draft_per_token =
      2.0 * static_cast<double>(draft.num_layers * draft.kv_dim()) * DTypeBytes(options.dtype);
  r.kv_cache_bytes = tokens * draft_per_token;
  PlanOptions o = options;
  o.reserved_gpu_bytes = options.reserved_gpu_bytes + r.weight_bytes + r.kv_cache_bytes;
  absl::StatusOr<Plan> full = MakePlan(model, gpu, workload, o);
  if (full.ok() && static_cast<double>(full->kv_cache_tokens) >= tokens) return r;
  // The model's cache holds fewer tokens: the draft's holds as many, out of the room both share.
  o.reserved_gpu_bytes = options.reserved_gpu_bytes + r.weight_bytes;
  ASSIGN_OR_RETURN(const Plan room, MakePlan(model, gpu, workload, o));
  const double target_per_token =
      static_cast<double>(room.kv_bytes_per_token) / options.tensor_parallel;
  const double shared_tokens = static_cast<double>(room.kv_cache_tokens) * target_per_token /
                               (target_per_token + draft_per_token);
  r.kv_cache_bytes = std::min(r.kv_cache_bytes, shared_tokens * draft_per_token);
  return r;
}

absl::StatusOr<SpeculationPlan> PlanSpeculation(const ModelConfig& model, const ModelConfig& draft,
                                                const GpuSpec& gpu, const Workload& workload,
                                                const PlanOptions& options, const Plan& plan,
                                                double acceptance, int num_speculative_tokens) {
  if (draft.vocab_size != model.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--draft-model: its vocabulary has ", draft.vocab_size, " tokens and --model's ",
        model.vocab_size, "; a draft must share the served model's tokenizer"));
  }
  if (!(acceptance > 0 && acceptance <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--draft-acceptance must be in (0, 1], not ", acceptance));
  }
  if (num_speculative_tokens < 1 || num_speculative_tokens > 32) {
    return absl::InvalidArgumentError(
        absl::StrCat("--num-speculative-tokens must be 1 to 32, not ", num_speculative_tokens));
  }
  const double dtype_bytes = DTypeBytes(options.dtype);
  const double mean_context = workload.prompt_tokens + workload.output_tokens / 2.0;
  // One pass of a model at batch 1 over `rows` rows of one sequence, on `tp` ranks: every weight
  // read once (less the embedding table), the sequence's KV once, and the rows' FLOPs.
  const auto pass_s = [&](const ModelConfig& m, int64_t tp, double rows) {
    const Rates r = RatesOf(gpu, options, tp);
    const double embedding = static_cast<double>(m.vocab_size) * m.hidden_size;
    const double params = static_cast<double>(m.NumParameters());
    const double read = (params - (m.tie_word_embeddings ? 0.0 : embedding)) * dtype_bytes;
    const double kv = 2.0 * m.num_layers * m.kv_dim() * dtype_bytes * mean_context;
    const double matrix = params - (m.tie_word_embeddings ? 0.0 : embedding);
    return std::max(read / r.bandwidth + kv / r.kv_bandwidth, 2 * matrix * rows / r.flops);
  };
  SpeculationPlan s;
  s.draft_parameters = draft.NumParameters();
  s.draft_gpu_weight_bytes = static_cast<double>(s.draft_parameters) * dtype_bytes;
  s.num_speculative_tokens = num_speculative_tokens;
  s.speculative_max_batch = options.speculative_max_batch;
  s.acceptance = acceptance;
  const int k = num_speculative_tokens;
  s.draft_step_ms = 1e3 * pass_s(draft, 1, 1);
  s.verify_step_ms = 1e3 * pass_s(model, options.tensor_parallel, 1 + k);
  s.tokens_per_step =
      acceptance >= 1 ? k + 1.0 : (1 - std::pow(acceptance, k + 1)) / (1 - acceptance);
  s.ms_per_token = (s.verify_step_ms + k * s.draft_step_ms) / s.tokens_per_step;
  s.speedup = plan.batch1_step_ms / s.ms_per_token;
  return s;
}

absl::flat_hash_set<std::string> PlanMachineFlags() {
  return {"model",
          "gpu",
          "gpu-memory-gib",
          "gpu-bandwidth-gbps",
          "gpu-tflops",
          "dtype",
          "tensor-parallel",
          "max-running-sequences",
          "max-batch-tokens",
          "kv-compression",
          "host-cache-gib",
          "gpu-memory-utilization",
          "decode-efficiency",
          "kv-efficiency",
          "prefill-efficiency",
          "target-utilization",
          "delta-bits",
          "delta-sparsity",
          "lora-rank"};
}

absl::StatusOr<Args> ParsePlanArgs(const std::vector<std::string>& argv) {
  absl::flat_hash_set<std::string> flags = PlanMachineFlags();
  flags.insert({"rate", "prompt-tokens", "output-tokens", "shared-prefix-tokens", "tpot-ms",
                "conversations", "conversation-tokens", "fine-tunes", "active-fine-tunes", "emit",
                "draft-model", "draft-acceptance", "num-speculative-tokens",
                "speculative-max-batch"});
  return Args::Parse(argv, {"json"}, flags);
}

namespace {

// A model directory, or a config.json-style file on its own (a model whose weights are not here).
absl::StatusOr<ModelConfig> ModelConfigAt(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
    ASSIGN_OR_RETURN(const std::string text, ReadFileToString(path));
    ASSIGN_OR_RETURN(const JsonDocument doc, JsonDocument::Parse(text, path));
    return ParseModelConfig(doc.root());
  }
  return LoadModelConfig(path);
}

}  // namespace

absl::StatusOr<ModelConfig> PlanModelFromArgs(const Args& args) {
  const std::optional<std::string> model_arg = args.Get("model");
  if (!model_arg)
    return absl::InvalidArgumentError("--model is required (a directory with config.json)");
  return ModelConfigAt(*model_arg);
}

absl::StatusOr<GpuSpec> PlanGpuFromArgs(const Args& args) {
  GpuSpec gpu;
  if (args.Has("gpu-memory-gib") || args.Has("gpu-bandwidth-gbps") || args.Has("gpu-tflops")) {
    if (args.Has("gpu")) {
      return absl::InvalidArgumentError("give --gpu or the --gpu-* figures, not both");
    }
    gpu.name = "custom";
    ASSIGN_OR_RETURN(const double gib, PositiveDouble(args, "gpu-memory-gib", 0, false));
    ASSIGN_OR_RETURN(const double gbps, PositiveDouble(args, "gpu-bandwidth-gbps", 0, false));
    ASSIGN_OR_RETURN(const double tflops, PositiveDouble(args, "gpu-tflops", 0, false));
    gpu.memory_bytes = gib * kGiB;
    gpu.copy_bytes_per_s = gbps * 1e9;
    gpu.flops = tflops * 1e12;
    gpu.source = "given on the command line";
  } else {
    ASSIGN_OR_RETURN(gpu, FindGpu(args.Get("gpu").value_or("h100")));
  }

  return gpu;
}

absl::StatusOr<PlanOptions> PlanOptionsFromArgs(const Args& args, const GpuSpec& gpu) {
  PlanOptions o;
  const std::string dtype = args.Get("dtype").value_or("bf16");
  // As strata-worker parses --gpu_dtype.
  if (!ParseDType(absl::AsciiStrToUpper(dtype), &o.dtype) ||
      (o.dtype != DType::kBF16 && o.dtype != DType::kF16 && o.dtype != DType::kF32)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype must be bf16, f16 or f32, not \"", dtype, "\""));
  }
  ASSIGN_OR_RETURN(const int64_t tp, IntAtLeast(args, "tensor-parallel", 1, 1));
  if (tp > 64) return absl::InvalidArgumentError("--tensor-parallel must be at most 64");
  o.tensor_parallel = static_cast<int>(tp);
  ASSIGN_OR_RETURN(o.max_running_sequences,
                   IntAtLeast(args, "max-running-sequences", o.max_running_sequences, 1));
  ASSIGN_OR_RETURN(o.max_batch_tokens, IntAtLeast(args, "max-batch-tokens", o.max_batch_tokens, 1));
  if (o.max_running_sequences > 1e6 || o.max_batch_tokens > 1e9) {
    return absl::InvalidArgumentError(
        "--max-running-sequences must be at most 1e6 and --max-batch-tokens at most 1e9");
  }
  const std::string compression = args.Get("kv-compression").value_or("none");
  if (!ParseKvCompression(compression, &o.lower_tier_compression)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-compression must be none, int8 or fp8, not \"", compression, "\""));
  }
  ASSIGN_OR_RETURN(const double host_gib, PositiveDouble(args, "host-cache-gib", 0, true));
  o.host_cache_budget_bytes = host_gib * kGiB;
  ASSIGN_OR_RETURN(o.gpu_memory_utilization,
                   Fraction(args, "gpu-memory-utilization", o.gpu_memory_utilization));
  ASSIGN_OR_RETURN(o.decode_efficiency, Fraction(args, "decode-efficiency", gpu.decode_efficiency));
  if (args.Has("kv-efficiency")) {
    ASSIGN_OR_RETURN(o.kv_efficiency, Fraction(args, "kv-efficiency", 1.0));
  }
  ASSIGN_OR_RETURN(o.prefill_efficiency,
                   Fraction(args, "prefill-efficiency", gpu.prefill_efficiency));
  ASSIGN_OR_RETURN(o.target_utilization,
                   Fraction(args, "target-utilization", o.target_utilization));
  ASSIGN_OR_RETURN(const int64_t bits, args.GetInt("delta-bits", o.delta_bits));
  if (bits != 2 && bits != 4 && bits != 8) {
    return absl::InvalidArgumentError(absl::StrCat("--delta-bits must be 2, 4 or 8, not ", bits));
  }
  o.delta_bits = static_cast<int>(bits);
  const std::string sparsity = args.Get("delta-sparsity").value_or("2:4");
  if (sparsity != "2:4" && sparsity != "none") {
    return absl::InvalidArgumentError(
        absl::StrCat("--delta-sparsity must be 2:4 or none, not \"", sparsity, "\""));
  }
  o.delta_sparse_2_4 = sparsity == "2:4";
  ASSIGN_OR_RETURN(o.lora_rank, args.GetInt("lora-rank", 0));
  if (o.lora_rank < 0 || o.lora_rank > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("--lora-rank must be in [1, 4096] (0: deltas), not ", o.lora_rank));
  }
  if (o.lora_rank > 0 && (args.Has("delta-bits") || args.Has("delta-sparsity"))) {
    return absl::InvalidArgumentError(
        "--lora-rank plans LoRA adapters; --delta-bits and --delta-sparsity are for deltas");
  }

  return o;
}

absl::Status PlanCommand(const Args& args, std::FILE* out) {
  if (args.Get("gpu") == "list") {
    for (const GpuSpec& g : KnownGpus()) {
      absl::FPrintF(out, "%-6s %5.0f GB  copy %6.0f GB/s  bf16 %5.0f TFLOP/s  %s\n", g.name,
                    g.memory_bytes / 1e9, g.copy_bytes_per_s / 1e9, g.flops / 1e12, g.source);
    }
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(const ModelConfig model, PlanModelFromArgs(args));
  ASSIGN_OR_RETURN(const GpuSpec gpu, PlanGpuFromArgs(args));
  Workload w;
  ASSIGN_OR_RETURN(w.rate_rps, PositiveDouble(args, "rate", 0, true));
  ASSIGN_OR_RETURN(w.prompt_tokens, IntAtLeast(args, "prompt-tokens", w.prompt_tokens, 1));
  ASSIGN_OR_RETURN(w.output_tokens, IntAtLeast(args, "output-tokens", w.output_tokens, 1));
  ASSIGN_OR_RETURN(w.shared_prefix_tokens, IntAtLeast(args, "shared-prefix-tokens", 0, 0));
  ASSIGN_OR_RETURN(w.tpot_ms, PositiveDouble(args, "tpot-ms", 0, true));
  ASSIGN_OR_RETURN(w.conversations, IntAtLeast(args, "conversations", 0, 0));
  ASSIGN_OR_RETURN(w.conversation_tokens, IntAtLeast(args, "conversation-tokens", 0, 0));
  ASSIGN_OR_RETURN(w.fine_tunes, IntAtLeast(args, "fine-tunes", 0, 0));
  ASSIGN_OR_RETURN(w.active_fine_tunes, IntAtLeast(args, "active-fine-tunes", 0, 0));
  if (w.active_fine_tunes > w.fine_tunes) {
    return absl::InvalidArgumentError(absl::StrCat("--active-fine-tunes (", w.active_fine_tunes,
                                                   ") must be at most --fine-tunes (", w.fine_tunes,
                                                   ")"));
  }
  // Far past any real deployment, and small enough that no count overflows.
  for (const auto& [name, v] : {std::pair<const char*, double>{"rate", w.rate_rps},
                                {"prompt-tokens", static_cast<double>(w.prompt_tokens)},
                                {"output-tokens", static_cast<double>(w.output_tokens)},
                                {"conversations", static_cast<double>(w.conversations)},
                                {"conversation-tokens", static_cast<double>(w.conversation_tokens)},
                                {"fine-tunes", static_cast<double>(w.fine_tunes)}}) {
    if (v > 1e9)
      return absl::InvalidArgumentError(absl::StrCat("--", name, " must be at most 1e9"));
  }

  ASSIGN_OR_RETURN(PlanOptions o, PlanOptionsFromArgs(args, gpu));
  std::optional<ModelConfig> draft;
  if (args.Has("draft-model")) {
    absl::StatusOr<ModelConfig> d = ModelConfigAt(args.Get("draft-model").value_or(""));
    if (!d.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--draft-model: ", d.status().message()));
    }
    draft = *std::move(d);
  } else if (args.Has("draft-acceptance") || args.Has("num-speculative-tokens") ||
             args.Has("speculative-max-batch")) {
    return absl::InvalidArgumentError(
        "--draft-acceptance, --num-speculative-tokens and --speculative-max-batch plan a "
        "--draft-model: give one");
  }
  if (draft.has_value()) {
    ASSIGN_OR_RETURN(const int64_t batch,
                     IntAtLeast(args, "speculative-max-batch", kGpuSpeculativeMaxBatch, 1));
    if (batch > 4096) {
      return absl::InvalidArgumentError(
          absl::StrCat("--speculative-max-batch must be at most 4096, not ", batch));
    }
    o.speculative_max_batch = static_cast<int>(batch);
  }
  // A draft's weights and cache beside the model's, on the GPU that runs it.
  std::optional<DraftReservation> reserved;
  if (draft.has_value()) {
    ASSIGN_OR_RETURN(reserved, ReserveForDraft(model, *draft, gpu, w, o));
    o.reserved_gpu_bytes += reserved->weight_bytes + reserved->kv_cache_bytes;
  }
  ASSIGN_OR_RETURN(const Plan p, MakePlan(model, gpu, w, o));
  std::optional<SpeculationPlan> spec;
  if (draft.has_value()) {
    ASSIGN_OR_RETURN(const double acceptance, Fraction(args, "draft-acceptance", 0.7));
    ASSIGN_OR_RETURN(const int64_t k, IntAtLeast(args, "num-speculative-tokens", 4, 1));
    ASSIGN_OR_RETURN(spec, PlanSpeculation(model, *draft, gpu, w, o, p, acceptance,
                                           static_cast<int>(std::min<int64_t>(k, 1 << 20))));
    spec->draft_kv_cache_bytes = reserved->kv_cache_bytes;
  }
  if (args.Has("json") && args.Has("emit") && args.Get("emit") != "json") {
    return absl::InvalidArgumentError("give --json or --emit, not both");
  }
  const std::string emit = args.Has("json") ? "json" : args.Get("emit").value_or("table");
  if (emit == "json") {
    std::string json = Json(p, gpu, o);
    if (spec.has_value()) {
      // (Json ends with "}\n".)
      json.insert(json.size() - 2, absl::StrCat(",\"speculation\":", SpeculationJson(*spec)));
    }
    absl::FPrintF(out, "%s", json);
    return absl::OkStatus();
  }
  if (emit == "k8s" || emit == "k8s-disaggregated") {
    if (o.tensor_parallel > 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--emit ", emit,
          " with --tensor-parallel above 1: strata-worker splits a model across GPUs only once "
          "NCCL tensor parallelism lands (it runs on the CPU today), so such a patch would not "
          "start; the table and --json still plan it"));
    }
    absl::FPrintF(out, "%s", emit == "k8s" ? EmitK8sPatch(p, o) : EmitK8sDisaggregatedPatch(p, o));
    return absl::OkStatus();
  }
  if (emit != "table") {
    return absl::InvalidArgumentError(
        absl::StrCat("--emit must be table, json, k8s or k8s-disaggregated, not \"", emit, "\""));
  }
  absl::FPrintF(out, "model      %s: %.2f B parameters, %.1f GiB in %s, KV %d KiB per token\n",
                model.architecture_name, p.parameters / 1e9, p.weight_bytes / kGiB,
                FlagName(o.dtype), p.kv_bytes_per_token / 1024);
  absl::FPrintF(out, "gpu        %s x %d: %s\n", gpu.name, o.tensor_parallel, gpu.source);
  absl::FPrintF(out,
                "memory     per GPU: weights %.1f GiB, scratch %.1f GiB, KV cache %d MiB (%d "
                "tokens per worker; context %d)\n",
                p.gpu_weight_bytes / kGiB, p.gpu_scratch_bytes / kGiB, p.kv_cache_mb,
                p.kv_cache_tokens, p.context_tokens);
  absl::FPrintF(out,
                "decode     batch %d (limited by %s): step %.2f ms, %.0f tok/s per worker; batch "
                "1: %.2f ms (%.0f tok/s)\n",
                p.batch, p.batch_limit, p.step_ms, p.decode_tokens_per_s, p.batch1_step_ms,
                1e3 / p.batch1_step_ms);
  absl::FPrintF(
      out,
      "prefill    %.0f tok/s per worker; TTFT of a %d-token uncached prompt %.0f ms (idle GPU)\n",
      p.prefill_tokens_per_s,
      w.prompt_tokens - w.shared_prefix_tokens / o.block_tokens * o.block_tokens, p.ttft_ms);
  if (spec.has_value()) {
    absl::FPrintF(
        out,
        "speculate  batch 1 with a %.2f B-parameter draft (k=%d, each draft token kept with "
        "p=%.2f): "
        "%.2f tokens a step of %.2f ms (target, %d rows) + %d x %.2f ms (draft) = %.2f ms a token "
        "against %.2f ms (%.2fx); the KV cache above leaves room for its %.1f GiB of weights and "
        "its %.0f MiB cache (strata-worker's default: %d tokens of each of the sequences that "
        "may draft at once, or as many tokens as the KV cache above holds); drafts only while at "
        "most --speculative_max_batch sequences decode (%d)\n",
        spec->draft_parameters / 1e9, spec->num_speculative_tokens, spec->acceptance,
        spec->tokens_per_step, spec->verify_step_ms, spec->num_speculative_tokens + 1,
        spec->num_speculative_tokens, spec->draft_step_ms, spec->ms_per_token, p.batch1_step_ms,
        spec->speedup, spec->draft_gpu_weight_bytes / kGiB, spec->draft_kv_cache_bytes / kMiB,
        kDraftKvTokensPerSequence, o.speculative_max_batch);
  }
  if (w.fine_tunes > 0) {
    absl::FPrintF(out,
                  "fine-tunes %d, %d active per worker: %.2f GiB each, --delta_cache_mb %d on the "
                  "GPU and in RAM; batch-1 step of a fine-tune %.2f ms\n",
                  w.fine_tunes, p.active_fine_tunes, p.delta_bytes / kGiB, p.delta_cache_mb,
                  p.batch1_delta_step_ms);
  }
  absl::FPrintF(out, "capacity   %.2f requests/s per worker at 100%% busy\n",
                p.requests_per_s_per_worker);
  if (w.rate_rps > 0) {
    absl::FPrintF(out, "workers    %d for %.2f requests/s (each %.0f%% busy; target %.0f%%)\n",
                  p.workers, w.rate_rps, 100 * p.utilization, 100 * o.target_utilization);
    absl::FPrintF(
        out,
        "split      or %d prefill + %d decode workers (--role; --emit k8s-disaggregated); "
        "each handoff copies %.0f MiB of KV, about %.0f ms at %.0f GB/s, between the first and "
        "second token%s\n",
        p.split_prefill_workers, p.split_decode_workers, p.handoff_bytes / (1 << 20), p.handoff_ms,
        kKvCopyBytesPerS / 1e9,
        w.tpot_ms > 0 && p.handoff_ms > w.tpot_ms
            ? absl::StrFormat(" (%.0fx the TPOT target: over TCP the split costs every "
                              "request one long gap)",
                              p.handoff_ms / w.tpot_ms)
            : "");
    if (gpu.name != "custom") {
      // Averages say nothing of tails: the simulator replays Poisson arrivals.
      absl::FPrintF(out,
                    "tails      for p99 targets: stratactl simulate --model %s --gpu %s "
                    "--tensor-parallel %d --rate %g%s --prompt-tokens %d --output-tokens %d%s "
                    "--find-workers --ttft-p99-ms T --tpot-p99-ms T\n",
                    args.Get("model").value_or(""), gpu.name, o.tensor_parallel, w.rate_rps,
                    // The simulator's prompt tokens are a request's own, after the prefix.
                    w.shared_prefix_tokens > 0
                        ? absl::StrCat(" --workload shared-prefix --shared-fraction 1 "
                                       "--shared-prefix-tokens ",
                                       w.shared_prefix_tokens)
                        : "",
                    std::max<int64_t>(1, w.prompt_tokens - w.shared_prefix_tokens), w.output_tokens,
                    w.fine_tunes > 0 ? absl::StrCat(" --fine-tunes ", w.fine_tunes) : "");
    }
  }
  absl::FPrintF(out,
                "tiers      per worker: host %d MiB, disk %d MiB (block slots of %d bytes%s); "
                "conversations' KV %.1f GiB\n",
                p.host_cache_mb, p.disk_cache_mb, p.tier_slot_bytes,
                o.lower_tier_compression == KvCompression::kNone
                    ? ""
                    : absl::StrCat(", ", KvCompressionName(o.lower_tier_compression)),
                p.warm_set_bytes / kGiB);
  absl::FPrintF(out, "pod        memory %d MiB, disk volume %d GiB, nvidia.com/gpu %d\n",
                p.pod_memory_limit_mb, p.disk_volume_gib, o.tensor_parallel);
  absl::FPrintF(out, "flags      %s\n", absl::StrJoin(WorkerFlags(p, o), " "));
  for (const std::string& n : p.notes) absl::FPrintF(out, "note       %s\n", n);
  return absl::OkStatus();
}

}  // namespace strata
