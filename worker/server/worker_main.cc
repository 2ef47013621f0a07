// strata-worker: serves one model over the strata.v1.Worker API (CPU or GPU engine).
//
// With --tensor_parallel N it is rank 0 of a group: it starts ranks 1 .. N-1 as processes of its
// own binary (FollowerRanks), which share the model's heads and the KV cache's memory with it. A
// rank that dies takes the group down: rank 0 fails the step in flight and exits non-zero.
//
// On SIGINT or SIGTERM it drains: it stops admitting sequences (health turns NOT_SERVING and
// Submit answers FAILED_PRECONDITION, so coordinators route elsewhere), lets admitted sequences
// finish for up to --drain_timeout_s, stays while other workers copy its KV blocks (the prompts it
// no longer takes go to them, naming it as the source; up to --drain_kv_serve_s), then writes its
// cached KV blocks down to the disk tier for up to --persist_kv_s (a worker restarted on the same
// file starts warm) and shuts down; a second signal cuts the drain and the write short.
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/grpc_server.h"
#include "common/init.h"
#include "common/log.h"
#include "common/mapped_file.h"
#include "common/metrics.h"
#include "common/metrics_http.h"
#include "common/process.h"
#include "common/secrets.h"
#include "common/status_macros.h"
#include "common/tls.h"
#include "common/tls_flags.h"
#include "common/tls_monitor.h"
#include "common/tls_stream.h"
#include "common/version.h"
#include "grammar/vocabulary.h"
#include "kernels/dtype.h"
#include "tokenizer/tokenizer.h"
#include "worker/comm/collectives.h"
#include "worker/comm/shm_collectives.h"
#include "worker/engine/engine.h"
#include "worker/model/config.h"
#include "worker/model/gpu_model_runner.h"
#include "worker/model/lora.h"
#include "worker/model/model_runner.h"
#include "worker/model/weights.h"
#include "worker/server/fine_tune_dir.h"
#include "worker/server/follower_ranks.h"
#include "worker/server/worker_service.h"

ABSL_FLAG(std::string, model, "", "Model directory (config.json, *.safetensors). Required.");
ABSL_FLAG(std::string, random_weights, "",
          "Serve random weights of this dtype (f32, bf16, f16) built from --model's config.json "
          "alone, for benchmarking model shapes whose weight files are not here.");
ABSL_FLAG(uint64_t, random_seed, 1, "Seed of --random_weights.");
ABSL_FLAG(std::string, model_name, "",
          "Name clients use for the model (and its KV cache namespace); default: the directory's "
          "base name.");
ABSL_FLAG(std::string, listen, "127.0.0.1:50061", "host:port to serve on; port 0 picks one.");
ABSL_FLAG(bool, metrics_tls, false,
          "Serve --metrics_listen over TLS (HTTPS) with --tls_cert; no client certificate is "
          "asked for. Off by default: Prometheus' annotation-based scrape configs speak HTTP.");
ABSL_FLAG(std::string, health_listen, "",
          "host:port of a second, plaintext gRPC port that serves the health service alone (for "
          "probes that cannot speak TLS, such as a kubelet's); empty: none.");
ABSL_FLAG(std::string, port_file, "",
          "Once serving, write the bound port to this file (for scripts that start on port 0).");
ABSL_FLAG(std::string, worker_id, "",
          "Stable worker name reported to coordinators; default: hostname:port.");
ABSL_FLAG(int64_t, kv_cache_mb, 256,
          "KV cache size in MiB (per tensor-parallel rank: each holds its share of the heads).");
ABSL_FLAG(int64_t, block_tokens, 16, "Tokens per KV block.");
ABSL_FLAG(int64_t, host_cache_mb, 0,
          "Host-RAM KV tier in MiB (pinned): blocks evicted from the KV cache go here; 0: none.");
ABSL_FLAG(
    int64_t, disk_cache_mb, 0,
    "Disk KV tier in MiB, preallocated in --disk_cache_path (needs --host_cache_mb); 0: none.");
ABSL_FLAG(std::string, disk_cache_path, "",
          "File (or block device) of the disk KV tier, opened O_DIRECT. Blocks in it survive a "
          "restart.");
ABSL_FLAG(int, disk_queue_depth, 32, "Disk tier reads and writes in flight (io_uring).");
ABSL_FLAG(bool, disk_cache_recover, true,
          "At start, index the blocks a previous worker left in --disk_cache_path.");
ABSL_FLAG(std::string, kv_compression, "none",
          "How host and disk tiers store KV blocks: none, int8 or fp8 (per-head scales).");
ABSL_FLAG(bool, write_through, false,
          "Copy KV blocks reused twice or more down to host and disk before they are evicted, "
          "and write finished requests' blocks through to disk.");
ABSL_FLAG(bool, keep_finished_warm, true,
          "Copy a finished request's KV blocks to the host tier for the conversation's next turn.");
ABSL_FLAG(int64_t, inflight_prefill_min_tokens, 32,
          "A request whose prompt goes on in at least this many tokens of KV blocks that another "
          "request is computing now waits a step for them and takes them from the prefix cache "
          "instead of computing them again; 0: never waits.");
ABSL_FLAG(int64_t, max_io_wait_ms, 500,
          "Longest a request waits for its KV blocks to load from disk before recomputing them.");
ABSL_FLAG(int64_t, max_batch_tokens, 512, "Most tokens computed in one engine step.");
ABSL_FLAG(int64_t, max_context_tokens, 0,
          "Longest sequence served, prompt plus output, when less than the model's context and "
          "what the KV cache holds; 0: the lesser of those two. Coordinators send longer prompts "
          "to workers that serve them.");
ABSL_FLAG(int64_t, max_running_sequences, 64, "Most sequences in one engine step.");
ABSL_FLAG(
    std::string, cluster_secret_file, "",
    "A file holding the cluster secret: the Worker service then answers only calls that carry "
    "it (the coordinators given the same file); its health service stays open. Empty: no "
    "secret (keep the port private). One secret a line: any is accepted (see "
    "--cluster_secret_reload_s).");
ABSL_FLAG(double, cluster_secret_reload_s, 5,
          "Read --cluster_secret_file again this often, so that the secret rotates without a "
          "restart (common/secrets.h); 0: at start only.");
ABSL_FLAG(bool, fair_cache_eviction, true,
          "When the KV cache is full, evict the least recently used cached block of the tenant "
          "holding the most cached prefixes, not the least recently used of all; the host and "
          "disk tiers evict by the same rule among the blocks each holds.");
ABSL_FLAG(bool, fair_share, true,
          "Within a priority, admit the waiting request of the tenant served least so far (tokens "
          "computed and generated for it over its weight; tenants come from the coordinator's API "
          "keys); false: by arrival.");
ABSL_FLAG(int64_t, max_live_sequences, 256,
          "Running plus queued sequences accepted; beyond it Submit fails RESOURCE_EXHAUSTED, "
          "except for a tenant holding less than an equal part of them (up to twice this).");
ABSL_FLAG(int, num_speculative_tokens, -1,
          "Speculative decoding: draft tokens a decoding sequence proposes per step, by n-gram "
          "lookup in its own context or from --draft_model (0: off; at most 32; unset: off, or 4 "
          "with --draft_model). The output does not change; steps do.");
ABSL_FLAG(int, prompt_lookup_min, 2,
          "Speculative decoding: the shortest suffix of a sequence looked up in its context.");
ABSL_FLAG(int, prompt_lookup_max, 4,
          "Speculative decoding: the longest suffix of a sequence looked up in its context.");
ABSL_FLAG(int, speculative_max_batch, -1,
          "Speculative decoding: draft only while at most this many sequences decode (-1: 2 on "
          "the cpu device, 16 on the gpu).");
ABSL_FLAG(std::string, draft_model, "",
          "Speculative decoding with a draft model: a smaller model with --model's tokenizer (a "
          "Hugging Face directory) proposes the drafts instead of n-gram lookup, on --device. "
          "--num_speculative_tokens defaults to 4 with it.");
ABSL_FLAG(int64_t, draft_kv_cache_mb, 0,
          "KV cache of the draft model, in MiB (the sequences that drafted least recently give "
          "theirs up when it is full); 0: room for 4096 tokens of each of --speculative_max_batch "
          "sequences (at most what --kv_cache_mb holds in tokens).");
ABSL_FLAG(int, threads, 0, "CPU compute threads; 0 uses every core.");
ABSL_FLAG(std::string, device, "cpu",
          "Where the model runs: cpu, or gpu (the current CUDA device; one rank).");
ABSL_FLAG(std::string, gpu_dtype, "bf16",
          "Weights, activations and KV cache on the GPU: bf16, f16 "
          "or f32.");
ABSL_FLAG(bool, gpu_decode_attention_kernel, strata::GpuRunnerOptions{}.decode_attention_kernel,
          "GPU decode steps' attention through the decode kernel (lanes share each key; split-K "
          "merged in the same kernel); false: the tiled kernel.");
ABSL_FLAG(int64_t, gpu_decode_attention_max_rows,
          strata::GpuRunnerOptions{}.decode_attention_max_rows,
          "Largest GPU decode batch whose attention takes the decode kernel (larger ones take "
          "the tiled kernel); the crossover measured on an H200.");
ABSL_FLAG(int64_t, gpu_gemv_max_rows, strata::GpuRunnerOptions{}.gemv_max_rows,
          "Largest GPU decode batch whose projections take Strata's GEMV kernel (at most 8; "
          "larger ones take cuBLASLt); the crossover measured on an H200.");
ABSL_FLAG(int32_t, gpu_gemv_variant, strata::GpuRunnerOptions{}.gemv_variant,
          "Block shape of the GPU's GEMV kernel (kernels/cuda/gemv.cu's variants, 0 to "
          "gpu::kGemvVariants - 1); the "
          "default was the fastest at batch 1 on an H200 (gpu_bench's gemv_variants measures "
          "them all on a card).");
ABSL_FLAG(bool, gpu_fused_residual_norm, strata::GpuRunnerOptions{}.fused_residual_norm,
          "GPU decode steps of up to 4 rows (and --gpu_gemv_max_rows) fold each residual-add "
          "RMSNorm, SiLU-mul and (without "
          "per-head q/k norms) RoPE with the KV cache write into the projections around them. "
          "Experimental: slower than the separate kernels on an H200 (7% at batch 1, "
          "2026-11-27).");
ABSL_FLAG(bool, gpu_prefill_mma_attention, strata::GpuRunnerOptions{}.prefill_mma_attention,
          "GPU prefill attention (prompts and prompt chunks, bf16 or f16) on tensor cores; "
          "false: the tiled CUDA-core kernel.");
ABSL_FLAG(bool, gpu_prefill_mma_sync, strata::GpuRunnerOptions{}.prefill_mma_sync,
          "With --gpu_prefill_mma_attention: the mma.sync kernel (scores and probabilities in "
          "registers) instead of the wmma one. Experimental.");
ABSL_FLAG(int64_t, drain_timeout_s, 30, "On SIGTERM, how long to let admitted sequences finish.");
ABSL_FLAG(double, drain_kv_serve_s, 5,
          "On SIGTERM, once admitted sequences are done, how long at most the worker stays to let "
          "other workers copy its KV blocks (the coordinators send them this worker's prompts, "
          "naming it as their source); it leaves once no copy was asked for in "
          "--drain_kv_idle_s. 0: leave at once.");
ABSL_FLAG(double, drain_kv_idle_s, 1,
          "See --drain_kv_serve_s: how long a draining worker waits for the next copy (counted "
          "from the drain's start too, so that a worker nobody copies from leaves at once after "
          "a drain that took longer).");
ABSL_FLAG(std::string, metrics_listen, "",
          "host:port to serve Prometheus metrics on (GET /metrics), e.g. [::]:9090; empty: none.");
ABSL_FLAG(int64_t, persist_kv_s, 10,
          "On shutdown, up to this long writing cached KV blocks down to the disk tier, so that "
          "the next worker on the same --disk_cache_path starts with them; 0: none.");
ABSL_FLAG(std::vector<std::string>, fine_tunes, {},
          "Fine-tunes to serve over the base: comma-separated ID=PATH pairs, PATH a delta file "
          "from stratactl delta compress (either device) or a PEFT LoRA adapter's directory "
          "(on a GPU worker with --gpu_lora). Not with --tensor_parallel above 1.");
ABSL_FLAG(bool, gpu_lora, false,
          "Serve LoRA adapters on a GPU worker (their products through cuBLASLt). Experimental: "
          "built and tested against the CPU by gpu-tagged tests, not yet run on a GPU.");
ABSL_FLAG(std::string, fine_tune_dir, "",
          "A directory whose *.delta.safetensors files are served as fine-tunes, each under its "
          "file name without the suffix, and whose subdirectories holding a PEFT LoRA adapter "
          "(adapter_config.json, adapter_model.safetensors) under their own names. Read again "
          "every --fine_tune_rescan_s: fine-tunes are added, replaced and removed by putting "
          "files in it (move finished files in) without a restart.");
ABSL_FLAG(double, fine_tune_rescan_s, 10,
          "How often to read --fine_tune_dir again (0: only at start). A new or changed entry is "
          "taken at the first rescan that finds it unchanged; one gone is removed (requests "
          "running on it finish).");
ABSL_FLAG(int64_t, delta_cache_mb, 1024,
          "Memory for loaded fine-tune deltas; the least recently used unpinned ones are evicted.");
ABSL_FLAG(std::string, role, "mixed",
          "This worker's part in disaggregated serving: mixed (whole requests), prefill (where "
          "the model has decode or mixed workers too, the coordinators send it only prompts to "
          "compute, with their first token) or decode (the rest of generations whose prompt a "
          "prefill worker computed, copying its KV blocks (--kv_fetch, on by default), and "
          "requests with short or cached prompts).");
ABSL_FLAG(bool, kv_fetch, true,
          "When a coordinator names another worker that holds more of a prompt's KV blocks "
          "(SubmitRequest.kv_source_address), copy the blocks this worker lacks from there "
          "before queueing the request, instead of computing them. Workers reach each other at "
          "the addresses the coordinator knows them by, with the cluster secret.");
ABSL_FLAG(std::string, kv_transfer_listen, "auto",
          "HOST:PORT on which this worker also answers other workers' KV block copies over plain "
          "TCP (the bulk path: several times gRPC's speed; other workers learn the port from "
          "WorkerInfo and copy over gRPC when there is none); over TLS, as gRPC, with "
          "--tls_cert. auto: --listen's host, any free port; off: gRPC only. Behind a "
          "NetworkPolicy, give a fixed port and open it between workers (k8s/base does, port "
          "50062).");
ABSL_FLAG(int64_t, kv_fetch_timeout_ms, 2000,
          "Longest a request waits for KV blocks copied from another worker; what has not "
          "arrived by then is computed.");
ABSL_FLAG(int64_t, kv_fetch_min_blocks, 1,
          "Fewest missing KV blocks worth copying from another worker.");
ABSL_FLAG(int64_t, kv_fetch_max_mb, 2048,
          "Most KV block bytes one request copies from another worker (held in host memory until "
          "stored); a copy also takes at most half the KV cache's blocks. The rest is computed.");
ABSL_FLAG(int64_t, kv_copy_slice_mb, 8,
          "KV block bytes this worker copies between its cache and other workers between two "
          "engine steps, each way (copies out to other workers, and copies in stored as they "
          "arrive), "
          "and as much again for every 10 ms of the last step: a long copy then holds a step up "
          "by about that much memory copying.");
ABSL_FLAG(int, tensor_parallel, 1,
          "Ranks the model is split across (attention heads, MLP columns and vocabulary): this "
          "process is rank 0 and starts the others itself, one process each. CPU only for now; "
          "--threads is per rank (0: the cores shared out evenly).");
// Set by rank 0 on the ranks it starts; not for operators.
ABSL_FLAG(int, tp_rank, 0, "Internal: this process's tensor-parallel rank.");
ABSL_FLAG(int, tp_control_fd, -1, "Internal: the tensor-parallel group's control descriptor.");
ABSL_FLAG(int, tp_memory_fd, -1, "Internal: the tensor-parallel group's memory descriptor.");

namespace strata {
namespace {

std::string BaseName(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// Compute threads of each rank: --threads, or the cores shared out among the ranks.
int ThreadsPerRank(int world_size) {
  const int threads = absl::GetFlag(FLAGS_threads);
  if (threads > 0) return threads;
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / world_size);
}

// The fine-tunes of --fine_tunes and (`with_dir`) of --fine_tune_dir, as (id, path) pairs; the
// directory must be readable either way.
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> FineTuneFlags(bool with_dir) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const std::string& entry : absl::GetFlag(FLAGS_fine_tunes)) {
    const size_t eq = entry.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == entry.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--fine_tunes entries must be ID=PATH, not \"", entry, "\""));
    }
    out.emplace_back(entry.substr(0, eq), entry.substr(eq + 1));
  }
  const std::string dir = absl::GetFlag(FLAGS_fine_tune_dir);
  if (!dir.empty()) {
    ASSIGN_OR_RETURN(const std::vector<FineTuneFile> in_dir, ScanFineTuneDir(dir));
    if (with_dir) {
      for (const FineTuneFile& f : in_dir) out.emplace_back(f.id, f.path);
    }
  }
  return out;
}

// --random_weights as a dtype: f32, bf16 or f16.
absl::StatusOr<DType> RandomWeightsDType() {
  const std::string name = absl::GetFlag(FLAGS_random_weights);
  DType dtype;
  if (!ParseDType(absl::AsciiStrToUpper(name), &dtype) ||
      (dtype != DType::kF32 && dtype != DType::kBF16 && dtype != DType::kF16)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--random_weights must be f32, bf16 or f16, not \"", name, "\""));
  }
  return dtype;
}

// Rank `rank` of `world`'s share of the weights: from the model's files, or random weights shaped
// by its config.json (--random_weights; every rank draws its share of the same model).
absl::StatusOr<std::unique_ptr<ModelWeights>> RankWeights(const std::string& dir,
                                                          const ModelConfig& config, int rank,
                                                          int world) {
  if (absl::GetFlag(FLAGS_random_weights).empty()) {
    return LoadModelWeights(dir, config, rank, world);
  }
  ASSIGN_OR_RETURN(const DType dtype, RandomWeightsDType());
  RETURN_IF_ERROR(CheckTensorParallelSplit(config, world));
  return RandomModelWeights(config, dtype, absl::GetFlag(FLAGS_random_seed), rank, world);
}

// A rank other than 0: loads its shard and runs the steps rank 0 sends until rank 0 stops it.
int FollowerMain(const std::string& dir, const ModelConfig& config) {
  // Rank 0 drains on SIGTERM and then stops this rank; a signal sent to this process itself (in its
  // own process group, out of a terminal's reach) ends it, which rank 0 sees as a lost rank.
  UnblockTerminationSignals();
  const int rank = absl::GetFlag(FLAGS_tp_rank);
  const int world = absl::GetFlag(FLAGS_tensor_parallel);
  absl::StatusOr<std::unique_ptr<ShmCollectives>> comm = ShmCollectives::Join(
      absl::GetFlag(FLAGS_tp_control_fd), absl::GetFlag(FLAGS_tp_memory_fd), rank, world);
  if (!comm.ok()) {
    LOG(ERROR) << "tensor-parallel rank " << rank << ": " << comm.status();
    return 1;
  }
  close(absl::GetFlag(FLAGS_tp_control_fd));  // Join keeps its own copy of what it needs
  close(absl::GetFlag(FLAGS_tp_memory_fd));
  absl::StatusOr<std::unique_ptr<ModelWeights>> weights = RankWeights(dir, config, rank, world);
  if (!weights.ok()) {
    // Rank 0 may be waiting for this rank's first step: tell it why this rank is gone.
    (*comm)->Abort(absl::StrCat("cannot load its shard: ", weights.status().message()));
    LOG(ERROR) << "tensor-parallel rank " << rank << ": " << weights.status();
    return 1;
  }
  ModelRunner runner(weights->get(), comm->get(), ThreadsPerRank(world));
  LOG(INFO) << "tensor-parallel rank " << rank << " of " << world << " (pid " << getpid()
            << ") serving its shard of " << dir;
  if (absl::Status s = runner.ServeFollower(); !s.ok()) {
    LOG(ERROR) << "tensor-parallel rank " << rank << ": " << s;
    return 1;
  }
  return 0;
}

// The numeric flags' ranges, checked before anything is loaded. Sizes in MiB are shifted into
// bytes: an unchecked one could wrap into a number some later error would not trace back to it.
absl::Status CheckFlagRanges() {
  struct Range {
    const char* name;
    int64_t value;
    int64_t least;
    int64_t most;
  };
  constexpr int64_t kMostMiB = int64_t{1} << 30;  // 1 PiB
  const Range ranges[] = {
      {"kv_cache_mb", absl::GetFlag(FLAGS_kv_cache_mb), 1, kMostMiB},
      {"host_cache_mb", absl::GetFlag(FLAGS_host_cache_mb), 0, kMostMiB},
      {"disk_cache_mb", absl::GetFlag(FLAGS_disk_cache_mb), 0, kMostMiB},
      {"delta_cache_mb", absl::GetFlag(FLAGS_delta_cache_mb), 1, kMostMiB},
      {"draft_kv_cache_mb", absl::GetFlag(FLAGS_draft_kv_cache_mb), 0, kMostMiB},
      {"kv_fetch_max_mb", absl::GetFlag(FLAGS_kv_fetch_max_mb), 1, int64_t{1} << 24},
      {"kv_copy_slice_mb", absl::GetFlag(FLAGS_kv_copy_slice_mb), 1, int64_t{1} << 20},
      {"block_tokens", absl::GetFlag(FLAGS_block_tokens), 1, 4096},
      {"max_batch_tokens", absl::GetFlag(FLAGS_max_batch_tokens), 1, int64_t{1} << 20},
      {"max_context_tokens", absl::GetFlag(FLAGS_max_context_tokens), 0, int64_t{1} << 30},
      {"max_running_sequences", absl::GetFlag(FLAGS_max_running_sequences), 1, 65536},
      {"max_live_sequences", absl::GetFlag(FLAGS_max_live_sequences), 1, int64_t{1} << 24},
      {"threads", absl::GetFlag(FLAGS_threads), 0, 4096},
      {"disk_queue_depth", absl::GetFlag(FLAGS_disk_queue_depth), 1, 4095},
      {"inflight_prefill_min_tokens", absl::GetFlag(FLAGS_inflight_prefill_min_tokens), 0,
       int64_t{1} << 30},
  };
  for (const Range& r : ranges) {
    if (r.value < r.least || r.value > r.most) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", r.name, " must be ", r.least, " to ", r.most, ", not ", r.value));
    }
  }
  return absl::OkStatus();
}

int Main(const std::vector<std::string>& args) {
  const std::string dir = absl::GetFlag(FLAGS_model);
  if (dir.empty()) {
    std::fprintf(stderr, "--model is required (a model directory)\n");
    return 2;
  }
  if (absl::Status s = CheckFlagRanges(); !s.ok()) {
    LOG(ERROR) << s.message();
    return 1;
  }
  const int world = absl::GetFlag(FLAGS_tensor_parallel);
  if (world < 1 || world > 64) {
    LOG(ERROR) << "--tensor_parallel must be 1 to 64, not " << world;
    return 1;
  }
  absl::StatusOr<ModelConfig> config = LoadModelConfig(dir);
  if (!config.ok()) {
    LOG(ERROR) << config.status();
    return 1;
  }
  if (!absl::GetFlag(FLAGS_random_weights).empty()) {
    if (absl::Status s = RandomWeightsDType().status(); !s.ok()) {
      LOG(ERROR) << s.message();
      return 1;
    }
    // Its KV blocks share the real model's cache namespace: never let them into a disk file a
    // real worker could recover.
    if (absl::GetFlag(FLAGS_disk_cache_mb) > 0) {
      LOG(ERROR) << "--random_weights cannot be combined with a disk KV tier (--disk_cache_mb)";
      return 1;
    }
  }
  if (absl::GetFlag(FLAGS_tp_control_fd) >= 0) return FollowerMain(dir, *config);
  // TLS checked before anything slow (its file watcher starts with the server, below).
  absl::StatusOr<TlsOptions> tls = TlsOptionsFromFlags(TlsClientAuth::kRequire);
  if (absl::Status s = tls.ok() ? CheckTlsFiles(*tls).status() : tls.status(); !s.ok()) {
    LOG(ERROR) << s.message();
    return 1;
  }
  if (tls->enabled() && tls->cert_file.empty()) {
    LOG(ERROR) << "--tls_ca without --tls_cert: a worker serves TLS with a certificate of its own "
                  "(--tls_cert, --tls_key), or plaintext";
    return 1;
  }
  if (!tls->cert_file.empty() && tls->client_auth == TlsClientAuth::kNone) {
    LOG(WARNING) << "TLS without client certificates (no --tls_ca, or --tls_client_auth=none): "
                    "any TLS client may call this worker; give --tls_ca so that only the "
                    "cluster's own coordinators and workers can (and the cluster secret)";
  }
  const std::string kv_transfer_flag = absl::GetFlag(FLAGS_kv_transfer_listen);

  // Rank 0 of a group starts the other ranks before anything else starts threads.
  // (group_failed outlives the followers' watcher thread, which may set it.)
  std::atomic<bool> group_failed{false};
  std::unique_ptr<ShmGroup> group;
  std::unique_ptr<ShmCollectives> group_comm;
  std::unique_ptr<FollowerRanks> followers;
  if (world > 1) {
    if (absl::GetFlag(FLAGS_device) != "cpu") {
      LOG(ERROR) << "--tensor_parallel " << world
                 << " needs --device=cpu: tensor parallelism across GPUs (NCCL) is not built yet";
      return 1;
    }
    if (absl::Status s = CheckTensorParallelSplit(*config, world); !s.ok()) {
      LOG(ERROR) << "--tensor_parallel " << world << ": " << s.message();
      return 1;
    }
    absl::StatusOr<ShmGroup> created = ShmGroup::Create(world);
    if (!created.ok()) {
      LOG(ERROR) << created.status();
      return 1;
    }
    group = std::make_unique<ShmGroup>(*std::move(created));
    absl::StatusOr<std::unique_ptr<ShmCollectives>> comm =
        ShmCollectives::Join(group->control_fd(), group->memory_fd(), 0, world);
    if (absl::Status s = group->SetInheritable(true); !s.ok() || !comm.ok()) {
      LOG(ERROR) << (s.ok() ? comm.status() : s);
      return 1;
    }
    group_comm = *std::move(comm);
    ShmCollectives* raw_comm = group_comm.get();
    absl::StatusOr<std::unique_ptr<FollowerRanks>> started =
        FollowerRanks::Start("/proc/self/exe", args, world, group->control_fd(), group->memory_fd(),
                             [raw_comm, &group_failed](const std::string& what) {
                               // The step in flight fails (its sequences go elsewhere), then the
                               // worker shuts down.
                               raw_comm->Abort(what);
                               group_failed = true;
                               kill(getpid(), SIGTERM);
                             });
    if (!started.ok()) {
      LOG(ERROR) << started.status();
      return 1;
    }
    followers = *std::move(started);
    // Nothing else this process starts may inherit the group.
    if (absl::Status s = group->SetInheritable(false); !s.ok()) {
      LOG(ERROR) << s;
      return 1;
    }
  }
  absl::StatusOr<std::unique_ptr<ModelWeights>> weights = RankWeights(dir, *config, 0, world);
  if (weights.ok() && !absl::GetFlag(FLAGS_random_weights).empty()) {
    LOG(WARNING) << "serving RANDOM " << absl::GetFlag(FLAGS_random_weights)
                 << " weights shaped by " << dir << "/config.json: output is noise, timing is real";
  }
  if (!weights.ok()) {
    LOG(ERROR) << weights.status();
    return 1;
  }
  std::string model_name = absl::GetFlag(FLAGS_model_name);
  if (model_name.empty()) model_name = BaseName(dir);

  SingleRankCollectives single_rank;
  Collectives* comm = world > 1 ? static_cast<Collectives*>(group_comm.get()) : &single_rank;
  EngineConfig ec;
  ec.model_name = model_name;
  ec.kv_cache_bytes = absl::GetFlag(FLAGS_kv_cache_mb) << 20;
  ec.block_tokens = absl::GetFlag(FLAGS_block_tokens);
  ec.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  ec.max_context_tokens = absl::GetFlag(FLAGS_max_context_tokens);
  // (-1, unset: off here, 4 with a draft model below; other negatives are the engine's error.)
  ec.num_speculative_tokens = absl::GetFlag(FLAGS_num_speculative_tokens) == -1
                                  ? 0
                                  : absl::GetFlag(FLAGS_num_speculative_tokens);
  ec.prompt_lookup_min = absl::GetFlag(FLAGS_prompt_lookup_min);
  ec.prompt_lookup_max = absl::GetFlag(FLAGS_prompt_lookup_max);
  ec.speculative_max_batch = absl::GetFlag(FLAGS_speculative_max_batch);
  ec.max_running_sequences = absl::GetFlag(FLAGS_max_running_sequences);
  ec.compute_threads = ThreadsPerRank(world);
  ec.tiers.host_bytes = absl::GetFlag(FLAGS_host_cache_mb) << 20;
  ec.tiers.disk_bytes = absl::GetFlag(FLAGS_disk_cache_mb) << 20;
  ec.tiers.disk_path = absl::GetFlag(FLAGS_disk_cache_path);
  ec.tiers.disk_queue_depth = absl::GetFlag(FLAGS_disk_queue_depth);
  ec.tiers.disk_recover = absl::GetFlag(FLAGS_disk_cache_recover);
  if (!ParseKvCompression(absl::GetFlag(FLAGS_kv_compression), &ec.tiers.compression)) {
    LOG(ERROR) << "--kv_compression must be none, int8 or fp8, not \""
               << absl::GetFlag(FLAGS_kv_compression) << "\"";
    return 1;
  }
  ec.write_through_hot_blocks = absl::GetFlag(FLAGS_write_through);
  ec.keep_finished_warm = absl::GetFlag(FLAGS_keep_finished_warm);
  ec.fair_share = absl::GetFlag(FLAGS_fair_share);
  ec.fair_cache_eviction = absl::GetFlag(FLAGS_fair_cache_eviction);
  ec.inflight_prefill_min_tokens = absl::GetFlag(FLAGS_inflight_prefill_min_tokens);
  ec.max_io_wait = absl::Milliseconds(absl::GetFlag(FLAGS_max_io_wait_ms));
  ec.device = absl::GetFlag(FLAGS_device);
  ec.gpu.decode_attention_kernel = absl::GetFlag(FLAGS_gpu_decode_attention_kernel);
  ec.gpu.fused_residual_norm = absl::GetFlag(FLAGS_gpu_fused_residual_norm);
  ec.gpu.prefill_mma_attention = absl::GetFlag(FLAGS_gpu_prefill_mma_attention);
  ec.gpu.prefill_mma_sync = absl::GetFlag(FLAGS_gpu_prefill_mma_sync);
  ec.gpu.decode_attention_max_rows = absl::GetFlag(FLAGS_gpu_decode_attention_max_rows);
  ec.gpu.gemv_max_rows = absl::GetFlag(FLAGS_gpu_gemv_max_rows);
  ec.gpu.gemv_variant = absl::GetFlag(FLAGS_gpu_gemv_variant);
  if (const std::string g = absl::GetFlag(FLAGS_gpu_dtype);
      !ParseDType(absl::AsciiStrToUpper(g), &ec.gpu.act) ||
      (ec.gpu.act != DType::kBF16 && ec.gpu.act != DType::kF16 && ec.gpu.act != DType::kF32)) {
    LOG(ERROR) << "--gpu_dtype must be bf16, f16 or f32, not \"" << g << "\"";
    return 1;
  }
  const double rescan_s = absl::GetFlag(FLAGS_fine_tune_rescan_s);
  if (!(rescan_s >= 0)) {
    LOG(ERROR) << "--fine_tune_rescan_s must be 0 or more, not " << rescan_s;
    return 1;
  }
  // A directory read again serves fine-tunes even while it holds none (one rank only: tensor-
  // parallel workers refuse fine-tunes). Its entries are then the watcher's, registered once the
  // engine is up (below): one that cannot be served is refused and logged, as later, and the
  // worker starts all the same (a pod must not crash-loop over one file). --fine_tunes entries,
  // and the directory's without rescans, stop the worker when they cannot be served.
  const bool rescan_fine_tunes =
      !absl::GetFlag(FLAGS_fine_tune_dir).empty() && rescan_s > 0 && world == 1;
  ec.fine_tunes_may_change = rescan_fine_tunes;
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> fine_tunes =
      FineTuneFlags(/*with_dir=*/!rescan_fine_tunes);
  if (!fine_tunes.ok()) {
    LOG(ERROR) << fine_tunes.status().message();
    return 1;
  }
  ec.fine_tunes = *std::move(fine_tunes);
  if (ec.device != "cpu" && !absl::GetFlag(FLAGS_gpu_lora)) {
    for (const auto& [id, path] : ec.fine_tunes) {
      if (IsLoraAdapter(path)) {
        LOG(ERROR) << "fine-tune " << id << ": " << path
                   << " is a LoRA adapter; on a GPU worker they need --gpu_lora (experimental: "
                      "not yet run on a GPU), or serve the merged fine-tune as a delta (stratactl "
                      "delta compress)";
        return 1;
      }
    }
  }
  ec.delta_cache_bytes = absl::GetFlag(FLAGS_delta_cache_mb) << 20;
  if (ec.tiers.disk_bytes > 0 && ec.tiers.disk_path.empty()) {
    LOG(ERROR) << "--disk_cache_mb needs --disk_cache_path";
    return 1;
  }
  // Structured output masks tokens by their bytes: it needs the model's tokenizer.
  if (std::filesystem::exists(std::filesystem::path(dir) / "tokenizer.json")) {
    absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::FromModelDir(dir);
    if (tokenizer.ok()) {
      ec.vocabulary = TokenTrieOf(**tokenizer);
      // Speculative decoding drafts the text a grammar forces as the tokenizer's tokens (a text it
      // cannot encode gets no draft: drafts are guesses, the output does not depend on them).
      std::shared_ptr<const Tokenizer> shared = std::move(*tokenizer);
      ec.tokenize = [shared](absl::string_view text) {
        absl::StatusOr<std::vector<int32_t>> ids = shared->Encode(text, false);
        return ids.ok() ? *std::move(ids) : std::vector<int32_t>{};
      };
    } else {
      LOG(WARNING) << "structured output is off: " << tokenizer.status();
    }
  } else {
    LOG(INFO) << dir << " has no tokenizer.json: structured output is off";
  }
  // The draft model, if any (it outlives the engine: declared before it).
  std::unique_ptr<ModelWeights> draft_weights;
  if (const std::string draft_dir = absl::GetFlag(FLAGS_draft_model); !draft_dir.empty()) {
    absl::StatusOr<ModelConfig> draft_config = LoadModelConfig(draft_dir);
    absl::StatusOr<std::unique_ptr<ModelWeights>> loaded =
        draft_config.ok() ? LoadModelWeights(draft_dir, *draft_config, 0, 1)
                          : absl::StatusOr<std::unique_ptr<ModelWeights>>(draft_config.status());
    if (!loaded.ok()) {
      LOG(ERROR) << "--draft_model " << draft_dir << ": " << loaded.status();
      return 1;
    }
    draft_weights = *std::move(loaded);
    const auto tokenizer_text = [](const std::string& d) {
      absl::StatusOr<std::string> t = ReadFileToString(d + "/tokenizer.json");
      return t.ok() ? *t : std::string();
    };
    if (tokenizer_text(draft_dir) != tokenizer_text(dir)) {
      LOG(WARNING) << "--draft_model " << draft_dir << " has another tokenizer.json than " << dir
                   << ": its drafts are token ids of --model's vocabulary only if the two "
                      "tokenizers agree";
    }
    if (absl::GetFlag(FLAGS_num_speculative_tokens) == 0) {
      LOG(ERROR) << "--num_speculative_tokens=0 turns speculative decoding off, but --draft_model "
                    "is given: drop one of them";
      return 1;
    }
    if (absl::GetFlag(FLAGS_num_speculative_tokens) == -1) ec.num_speculative_tokens = 4;
    ec.draft_weights = draft_weights.get();
    ec.draft_kv_cache_bytes = absl::GetFlag(FLAGS_draft_kv_cache_mb) << 20;
    LOG(INFO) << "speculative decoding with draft model " << draft_dir << " ("
              << draft_weights->config.num_layers << " layers, hidden "
              << draft_weights->config.hidden_size << "), " << ec.num_speculative_tokens
              << " tokens a draft";
  }
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(weights->get(), comm, ec);
  if (!engine.ok()) {
    LOG(ERROR) << engine.status();
    return 1;
  }
  if (ec.draft_weights != nullptr) {
    const DraftModelStats draft = (*engine)->Stats(/*with_tenants=*/false).draft_model;
    LOG(INFO) << "draft model KV cache: " << ((*engine)->config().draft_kv_cache_bytes >> 20)
              << " MiB, " << draft.num_blocks << " blocks of " << ec.block_tokens << " tokens";
  }
  const int64_t num_blocks = (*engine)->num_kv_blocks();
  const bool has_tiers = (*engine)->kv_store() != nullptr;
  const KvStoreStats tiers = (*engine)->Stats().tiers;

  WorkerServiceOptions wo;
  wo.model_name = model_name;
  if (const std::string role = absl::GetFlag(FLAGS_role); role == "prefill") {
    wo.role = v1::WORKER_ROLE_PREFILL;
  } else if (role == "decode") {
    wo.role = v1::WORKER_ROLE_DECODE;
  } else if (role != "mixed") {
    LOG(ERROR) << "--role must be mixed, prefill or decode, not \"" << role << "\"";
    return 1;
  }
  wo.max_live_sequences = absl::GetFlag(FLAGS_max_live_sequences);
  wo.tensor_parallel_size = world;
  if (const std::string d = absl::GetFlag(FLAGS_draft_model); !d.empty()) {
    wo.draft_model = BaseName(d);
  }
  // Declared before the servers that read it, so that it outlives them.
  absl::StatusOr<std::unique_ptr<ClusterSecret>> cluster_secret = OpenClusterSecretFlag(
      absl::GetFlag(FLAGS_cluster_secret_file), absl::GetFlag(FLAGS_cluster_secret_reload_s));
  if (!cluster_secret.ok()) {
    LOG(ERROR) << cluster_secret.status();
    return 1;
  }
  wo.cluster_secret = cluster_secret->get();
  if (absl::GetFlag(FLAGS_persist_kv_s) < 0) {
    LOG(ERROR) << "--persist_kv_s must be 0 or more, not " << absl::GetFlag(FLAGS_persist_kv_s);
    return 1;
  }
  wo.persist_kv_timeout = absl::Seconds(absl::GetFlag(FLAGS_persist_kv_s));
  for (const auto& [name, value] :
       {std::pair<const char*, double>{"drain_kv_serve_s", absl::GetFlag(FLAGS_drain_kv_serve_s)},
        std::pair<const char*, double>{"drain_kv_idle_s", absl::GetFlag(FLAGS_drain_kv_idle_s)}}) {
    if (!(value >= 0 && value <= 3600)) {
      LOG(ERROR) << "--" << name << " must be between 0 and 3600 seconds, not " << value;
      return 1;
    }
  }
  wo.kv_fetch = absl::GetFlag(FLAGS_kv_fetch);
  wo.kv_fetch_min_blocks = absl::GetFlag(FLAGS_kv_fetch_min_blocks);
  // (Sizes in MiB: CheckFlagRanges keeps them in range.)
  wo.kv_fetch_max_bytes = absl::GetFlag(FLAGS_kv_fetch_max_mb) << 20;
  wo.kv_copy_slice_bytes = absl::GetFlag(FLAGS_kv_copy_slice_mb) << 20;
  if (!absl::GetFlag(FLAGS_random_weights).empty()) {
    // Copies only between workers drawing the same weights.
    wo.model_fingerprint = absl::StrCat("random:", absl::GetFlag(FLAGS_random_weights), ":",
                                        absl::GetFlag(FLAGS_random_seed));
  }
  if (absl::GetFlag(FLAGS_kv_fetch_timeout_ms) < 1 || wo.kv_fetch_min_blocks < 1) {
    LOG(ERROR) << "--kv_fetch_timeout_ms and --kv_fetch_min_blocks must be positive";
    return 1;
  }
  wo.kv_fetcher.timeout = absl::Milliseconds(absl::GetFlag(FLAGS_kv_fetch_timeout_ms));
  wo.kv_fetcher.cluster_secret = wo.cluster_secret;
  // Copies arriving are stored a slice at a time: handed to the loop in slices too.
  wo.kv_fetcher.part_bytes = wo.kv_copy_slice_bytes;
  absl::StatusOr<GrpcCredentials> credentials = GrpcCredentials::Load(*tls);
  if (!credentials.ok()) {
    LOG(ERROR) << credentials.status().message();
    return 1;
  }
  wo.kv_fetcher.credentials = *credentials;
  // With TLS the KV transfer port speaks TLS too (mutual as --tls_client_auth says), and copies
  // to other workers' ports go over TLS, checked as gRPC checks them. Both outlive the service.
  std::unique_ptr<TlsContextSource> transfer_server_tls, transfer_client_tls;
  if (tls->enabled()) {
    absl::StatusOr<std::unique_ptr<TlsContextSource>> server_tls =
        TlsContextSource::Create(*tls, TlsRole::kServer);
    absl::StatusOr<std::unique_ptr<TlsContextSource>> client_tls =
        TlsContextSource::Create(*tls, TlsRole::kClient);
    if (!server_tls.ok() || !client_tls.ok()) {
      LOG(ERROR) << (server_tls.ok() ? client_tls.status() : server_tls.status()).message();
      return 1;
    }
    transfer_server_tls = *std::move(server_tls);
    transfer_client_tls = *std::move(client_tls);
    wo.kv_transfer_tls = transfer_server_tls.get();
    wo.kv_fetcher.transfer_tls = transfer_client_tls.get();
    wo.kv_fetcher.transfer_server_name = tls->server_name;
  }
  if (kv_transfer_flag == "auto") {
    const std::string listen = absl::GetFlag(FLAGS_listen);
    wo.kv_transfer_listen = absl::StrCat(listen.substr(0, listen.rfind(':')), ":0");
  } else if (kv_transfer_flag != "off") {
    wo.kv_transfer_listen = kv_transfer_flag;
  }
  // Outlives the service and the metrics endpoint, both declared after it.
  MetricsRegistry metrics;
  const std::string metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  if (!metrics_listen.empty()) wo.metrics = &metrics;
  // What gRPC serves from the TLS files, watched (their expiry, and whether they still pass).
  TlsFileMonitor tls_monitor(*tls, wo.metrics);
  Engine* const engine_ptr = engine->get();  // the service owns it, and outlives the watcher
  absl::StatusOr<std::unique_ptr<WorkerService>> service =
      WorkerService::Create(*std::move(engine), wo);
  if (!service.ok()) {
    LOG(ERROR) << service.status();
    return 1;
  }
  // --fine_tune_dir read again while serving; declared after the service, so stopped before it.
  std::unique_ptr<FineTuneDirWatcher> fine_tune_watcher;
  if (rescan_fine_tunes) {
    const bool refuse_lora = ec.device != "cpu" && !absl::GetFlag(FLAGS_gpu_lora);
    FineTuneDirWatcher::Registrar registrar;
    registrar.add = [engine_ptr, refuse_lora](const std::string& id, const std::string& path,
                                              bool replace) {
      if (refuse_lora && IsLoraAdapter(path)) {
        return absl::FailedPreconditionError(
            "a LoRA adapter; on a GPU worker they need --gpu_lora (or serve the merged fine-tune "
            "as a delta)");
      }
      return engine_ptr->RegisterFineTune(id, path, replace);
    };
    registrar.remove = [engine_ptr](const std::string& id) {
      return engine_ptr->UnregisterFineTune(id);
    };
    fine_tune_watcher = std::make_unique<FineTuneDirWatcher>(absl::GetFlag(FLAGS_fine_tune_dir),
                                                             std::vector<FineTuneFile>(),
                                                             std::move(registrar), wo.metrics);
    fine_tune_watcher->Rescan(/*at_once=*/true);
    fine_tune_watcher->Watch(absl::Seconds(rescan_s));
  }
  GrpcServerOptions so;
  so.listen_address = absl::GetFlag(FLAGS_listen);
  so.health_listen_address = absl::GetFlag(FLAGS_health_listen);
  if (credentials->tls()) so.credentials = *credentials->ServerCredentials();
  absl::StatusOr<std::unique_ptr<GrpcServer>> server =
      GrpcServer::Start(so, {{service->get(), std::string(v1::Worker::service_full_name())}});
  if (!server.ok()) {
    LOG(ERROR) << server.status();
    return 1;
  }
  // The worker id names the worker in coordinators' status; it is fixed once the port is known.
  std::string worker_id = absl::GetFlag(FLAGS_worker_id);
  if (worker_id.empty()) {
    char host[256] = {};
    gethostname(host, sizeof(host) - 1);
    worker_id = absl::StrCat(host, ":", (*server)->port());
  }
  (*service)->set_worker_id(worker_id);
  GrpcServer* srv = server->get();
  (*service)->SetDrainListener([srv](bool draining) { srv->SetServing(!draining); });
  absl::StatusOr<std::unique_ptr<TlsAcceptor>> metrics_tls =
      MetricsTls(absl::GetFlag(FLAGS_metrics_tls), *tls);
  if (!metrics_tls.ok()) {
    LOG(ERROR) << metrics_tls.status().message();
    return 1;
  }
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> metrics_server =
      StartMetricsEndpoint(metrics_listen, &metrics, metrics_tls->get());
  if (!metrics_server.ok()) {
    LOG(ERROR) << metrics_server.status();
    return 1;
  }
  if (const std::string pf = absl::GetFlag(FLAGS_port_file); !pf.empty()) {
    if (absl::Status s = WriteFileAtomically(pf, absl::StrCat((*server)->port(), "\n")); !s.ok()) {
      LOG(ERROR) << s;
      return 1;
    }
  }
  LOG(INFO) << "strata-worker " << kStrataVersion << " serving model " << model_name << " ("
            << config->architecture_name << ", " << config->num_layers << " layers) as "
            << worker_id << " on " << (*server)->address() << "; KV cache " << num_blocks
            << " blocks of " << ec.block_tokens << " tokens";
  if (has_tiers) {
    LOG(INFO) << "KV tiers: host " << tiers.host.num_slots << " blocks of " << tiers.host.slot_bytes
              << " bytes; disk " << tiers.disk.num_slots << " blocks in " << ec.tiers.disk_path
              << " (" << tiers.disk_recovered << " recovered); compression "
              << KvCompressionName(ec.tiers.compression);
  }
  if (!ec.fine_tunes.empty() || rescan_fine_tunes) {
    std::vector<std::string> ids;
    for (const auto& [id, path] : ec.fine_tunes) ids.push_back(id);
    LOG(INFO) << "fine-tunes (deltas, up to " << (ec.delta_cache_bytes >> 20)
              << " MiB loaded): " << (ids.empty() ? "none yet" : absl::StrJoin(ids, ", "))
              << (rescan_fine_tunes ? absl::StrCat("; ", absl::GetFlag(FLAGS_fine_tune_dir),
                                                   " read again every ", rescan_s, " s")
                                    : "");
  }

  if (world > 1) {
    LOG(INFO) << "tensor parallelism: " << world << " ranks (this process and pids "
              << absl::StrJoin(followers->pids(), ", ") << "), " << ec.compute_threads
              << " compute threads each";
  }

  const int sig = WaitForTerminationSignal();
  if (group_failed) {
    LOG(ERROR) << "the tensor-parallel group lost a rank (" << group_comm->AbortReason()
               << "): shutting down";
  } else {
    LOG(INFO) << "signal " << sig << ": draining (" << (*service)->num_live_sequences()
              << " sequences in flight); a second signal stops at once";
  }
  (*service)->SetDraining(true);
  const absl::Time drain_start = absl::Now();
  const int64_t copies_before = (*service)->num_kv_export_calls();
  const absl::Time give_up = drain_start + absl::Seconds(absl::GetFlag(FLAGS_drain_timeout_s));
  bool stop_now = false;
  while (!group_failed && (*service)->num_live_sequences() > 0 && absl::Now() < give_up) {
    if (WaitForTerminationSignal(absl::Milliseconds(50)) != 0) {
      LOG(WARNING) << "second signal: stopping now";
      (*service)->CancelPersist();
      stop_now = true;
      break;
    }
  }
  // Other workers may be copying this one's KV blocks for the prompts it can no longer take: stay
  // while they do (each copy saves them computing the prompt), up to --drain_kv_serve_s.
  const absl::Duration serve_copies = absl::Seconds(absl::GetFlag(FLAGS_drain_kv_serve_s));
  const absl::Duration copy_idle = absl::Seconds(absl::GetFlag(FLAGS_drain_kv_idle_s));
  if (!group_failed && !stop_now && serve_copies > absl::ZeroDuration()) {
    const absl::Time serve_until = absl::Now() + serve_copies;
    while (absl::Now() < serve_until &&
           absl::Now() - std::max(drain_start, (*service)->last_kv_export_call()) < copy_idle) {
      if (WaitForTerminationSignal(absl::Milliseconds(20)) != 0) {
        LOG(WARNING) << "second signal: stopping now";
        (*service)->CancelPersist();
        break;
      }
    }
    const int64_t copies = (*service)->num_kv_export_calls() - copies_before;
    if (copies > 0) {
      LOG(INFO) << "drain: other workers copied KV blocks from this one " << copies << " times in "
                << absl::FormatDuration(absl::Now() - drain_start);
    }
  }
  // A lost rank's share of the KV cache may be half written: none of it goes to disk.
  if (group_failed) (*service)->CancelPersist();
  // A rank that hangs (or is still loading its shard) must not hold the shutdown up for ever: after
  // a grace period the group is aborted, which ends every wait on it.
  absl::Notification stopped;
  // A signal while the worker writes its KV cache to disk cuts that short.
  absl::Notification loop_stopped;
  std::thread second_signal([&loop_stopped, svc = service->get()] {
    while (!loop_stopped.HasBeenNotified()) {
      if (WaitForTerminationSignal(absl::Milliseconds(100)) != 0) {
        LOG(WARNING) << "signal: skipping the rest of the KV cache's write to disk";
        svc->CancelPersist();
      }
    }
  });
  std::thread watchdog;
  if (group_comm != nullptr) {
    // The loop's last act, writing the KV cache to disk, gets its own time on top.
    const absl::Duration limit = absl::Seconds(15 + absl::GetFlag(FLAGS_persist_kv_s));
    watchdog = std::thread([&stopped, limit, comm = group_comm.get()] {
      if (!stopped.WaitForNotificationWithTimeout(limit)) {
        comm->Abort(
            absl::StrCat("shutdown: a rank did not stop within ", absl::FormatDuration(limit)));
      }
    });
  }
  (*service)->Stop();
  loop_stopped.Notify();
  second_signal.join();  // before the service goes
  (*server)->Shutdown(absl::Seconds(1));
  // The engine goes with the service; rank 0's runner tells the other ranks to stop.
  service->reset();
  if (followers != nullptr && !followers->Stop(absl::Seconds(10))) group_failed = true;
  stopped.Notify();
  if (watchdog.joinable()) watchdog.join();
  LOG(INFO) << "strata-worker stopped";
  return group_failed ? 1 : 0;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  // KV block copies to and from other workers allocate and free buffers of 64 KiB to a few MiB at
  // GB/s. glibc would map each one afresh (above its mmap threshold) and hand freed heap back to
  // the kernel, so that the page faults and zeroing cost more than moving the bytes (about half
  // the speed of a copy; bench/kv_transport_bench). Keep such buffers in the heap, and up to
  // 256 MiB of it free for the next copy.
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  // Rank 0 starts the other ranks of a tensor-parallel group with its own flags.
  const std::vector<std::string> args(argv, argv + argc);
  strata::BlockTerminationSignals();
  strata::InitProgram(argc, argv,
                      "strata-worker --model DIR [--listen HOST:PORT] [--model_name NAME]: serves "
                      "a model to Strata coordinators over gRPC.");
  return strata::Main(args);
}
