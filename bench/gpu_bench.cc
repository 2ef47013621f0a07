// GPU benchmark of the forward pass (worker/model/gpu_model_runner.h) on a model built from its
// config.json alone with random weights (default: a Llama-3-8B-shaped model in bf16), against the
// card's own limits measured in the same run:
//   - copy bandwidth: a large device-to-device copy, bytes read plus written over time;
//   - GEMM rate: an 8192^3 GEMM through cuBLASLt in the activation type;
//   - the GEMMs of one layer at m = 1 (decode), as achieved bandwidth over the weight bytes;
//   - prefill: tokens/s of one prompt of --prefill_tokens tokens;
//   - decode: for each batch size, --prompt tokens of context per sequence, then --steps greedy
//     steps (CUDA graphs), step time median -> tokens/s; batch 1 also without graphs;
//   - roofline of batch-1 decode: the bytes a step must read (every weight but the embedding
//     table, plus the KV cache of the context) over the measured copy bandwidth;
//   - fine-tunes: decode at the largest batch with its sequences spread over 1, 4, ... random
//     packed deltas (--fine_tune_tenants, --fine_tune_bits), and the prefill of one fine-tune's
//     prompt;
//   - decode with seeded sampling on the GPU (the exponential race, and the sort at top-p 0.9);
//   - last, a CUPTI trace of a few decode steps (--trace_steps) of the default and the fused
//     decode layer: each kernel's time inside the graph and the idle time between kernels.
// Prints a table last and writes every figure as JSON to --out.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/kernel_trace.h"
#include "bench/stats.h"
#include "common/init.h"
#include "common/json.h"
#include "common/log.h"
#include "common/mapped_file.h"
#include "common/status_macros.h"
#include "kernels/dtype.h"
#include "worker/model/config.h"

#ifdef STRATA_HAVE_CUDA
#include <cuda_runtime_api.h>
#include <nvtx3/nvToolsExt.h>

#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"
#include "worker/model/delta.h"
#include "worker/model/gpu_model_runner.h"
#endif

ABSL_FLAG(std::string, config, "bench/configs/llama3_8b.json", "The model's config.json.");
ABSL_FLAG(std::string, dtype, "bf16", "Activation and weight type: bf16, f16 or f32.");
ABSL_FLAG(int64_t, prompt, 512, "Context tokens per sequence before decoding.");
ABSL_FLAG(int64_t, steps, 64, "Decode steps timed per batch size.");
ABSL_FLAG(std::string, batches, "1,8,64", "Decode batch sizes.");
ABSL_FLAG(int64_t, prefill_tokens, 2048, "Prompt length of the prefill measurement.");
ABSL_FLAG(std::string, out, "", "Write the results as JSON here.");
ABSL_FLAG(bool, only_decode, false,
          "Skip the matrix rate, per-op and prefill measurements: the copy bandwidth and the "
          "decode runs only (for profiling a decode step under ncu).");
ABSL_FLAG(
    std::string, variants,
    "shipped,prefetch_o,gemv_routes,gemv_two_stage,gemv_rope,gemv_down,one_block,combined,"
    "mma_prefill,mma_sync_prefill,fine_tunes,sampled,drafts",
    "Runs to make (the first five not in the default list: decided by the H200 runs of "
    "2026-11-27, docs/PERFORMANCE.md; a device call has 10 minutes): default (graphs, GEMV, tiled "
    "attention), cublas (cuBLASLt for every "
    "projection, batches up to 8), eager (batch 1), decode_attn (the decode attention kernel at "
    "every batch size), fused_norm (that and the fused residual norms), shipped "
    "(GpuRunnerOptions' defaults as they are, row limits included), gemv_variants (those at "
    "batch 1 with each other GEMV block shape; not in the default list), prefetch_o (those at "
    "batch 1 with o_proj's weights prefetched into L2 during attention), gemv_routes (those at "
    "batch 1 with one projection at a time through cuBLASLt), gemv_two_stage (those at batch 1 "
    "with each two-stage GEMV shape, variants 8 to 10), gemv_rope (those at batch 1 with RoPE "
    "and the KV write in the q/k/v GEMV), gemv_down (those at batch 1 with down_proj through "
    "the GEMV: variant 1, 8 and 9), one_block (those with the decode attention kernel's "
    "one-block build, at each batch it takes), combined (the batch-1 runs above that beat the "
    "shipped defaults, taken together), mma_prefill (prefill with the tensor-core attention "
    "kernel), mma_sync_prefill (the same through its mma.sync form), fine_tunes (decode and "
    "prefill with random deltas), sampled (decode with seeded sampling on the GPU instead of "
    "greedy: temperature 1 over the whole vocabulary, and top-p 0.9), drafts (speculative "
    "decoding's steps: each sequence's last token and k draft tokens, every row's logits "
    "argmaxed, k = 1, 2, 4, 8, batches 1 and 8, the shipped defaults).");
ABSL_FLAG(std::string, fine_tune_tenants, "1,4",
          "Distinct fine-tunes among the decode batch's sequences, per fine_tunes run.");
ABSL_FLAG(int, fine_tune_bits, 4, "Bits of the fine_tunes runs' random deltas (2, 4 or 8).");
ABSL_FLAG(std::string, cupti_lib, "libcupti.so.13",
          "The CUPTI library the traces load (CUDA 13's, whose record layout this is built for).");
ABSL_FLAG(int64_t, trace_steps, 3,
          "After every other run, trace this many decode steps per batch size with the shipped "
          "defaults through CUPTI, and with the fused decode layer up to 4 rows (0: none): per "
          "step, the kernels' busy and idle time inside the graph (trace_b*_ keys), and next to "
          "--out a table of kernels by total time and the last step's timeline "
          "(*_trace_bN[_fused_norm].tsv, *_trace_bN[_fused_norm]_step.tsv).");

namespace strata {
namespace {

#ifdef STRATA_HAVE_CUDA

CudaStreamHandle Handle(cudaStream_t s) { return reinterpret_cast<CudaStreamHandle>(s); }

// Milliseconds of `fn` on `stream`, median of `reps` after one warm-up, by CUDA events.
template <typename Fn>
double TimeMs(cudaStream_t stream, int reps, Fn&& fn) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  fn();
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a, stream);
    fn();
    cudaEventRecord(b, stream);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    times.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return Median(times);
}

// Microseconds per call of `fn` inside a CUDA graph of `reps` calls (the way a decode step runs its
// kernels: back to back, no host launch in between), median of 5 replays after one warm-up.
template <typename Fn>
double GraphTimeUs(cudaStream_t stream, int reps, Fn&& fn) {
  fn();  // plans and lazy module loads happen outside the capture
  cudaStreamSynchronize(stream);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
  for (int i = 0; i < reps; ++i) fn();
  if (cudaStreamEndCapture(stream, &graph) != cudaSuccess ||
      cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) {
    std::fprintf(stderr, "gpu_bench: graph capture failed\n");
    std::exit(1);
  }
  const double ms = TimeMs(stream, 5, [&] { cudaGraphLaunch(exec, stream); });
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return ms * 1e3 / reps;
}

// The results object. With `path`, every figure added is on disk at once (written aside, then
// renamed over it): a run stopped by its time limit still leaves what it measured, a whole JSON
// object, for gpu_check's table.
struct Json {
  std::string s = "{";
  std::string path;
  void Add(const std::string& k, double v) {
    if (s.size() > 1) s += ",";
    // (JSON has no NaN or infinity: a figure that is not a number is null.)
    s += std::isfinite(v) ? absl::StrFormat("\n  \"%s\": %.6g", k, v)
                          : absl::StrFormat("\n  \"%s\": null", k);
    Save();
  }
  void AddStr(const std::string& k, const std::string& v) {
    if (s.size() > 1) s += ",";
    s += absl::StrFormat("\n  \"%s\": %s", k, JsonQuote(v));
    Save();
  }
  void Save() const {
    if (path.empty()) return;
    const std::string aside = path + ".partial";
    std::ofstream f(aside);
    f << s << "\n}\n";
    f.close();
    if (f.fail()) return;  // (a full disk, say: the last whole file stays)
    std::rename(aside.c_str(), path.c_str());
  }
};

// One batch of `seqs` sequences: prefill of `prompt` tokens each (in chunks that fit), then the
// caller's decode steps. Sequence s owns blocks [s * per_seq, (s + 1) * per_seq).
struct Batch {
  int64_t seqs = 0, per_seq = 0, block_tokens = 0;
  std::vector<int32_t> tables;
  // Each sequence's fine-tune (empty: all on the base).
  std::vector<const DeltaWeights*> deltas;
  std::vector<int64_t> lengths;
  std::vector<int32_t> last;

  int64_t Slot(int64_t s, int64_t p) const {
    return int64_t{tables[s * per_seq + p / block_tokens]} * block_tokens + p % block_tokens;
  }
};

void Prefill(GpuModelRunner* r, Batch* b, int64_t prompt, int64_t max_tokens, std::mt19937* rng) {
  const int64_t V = r->config().vocab_size;
  b->lengths.assign(b->seqs, 0);
  b->last.assign(b->seqs, 0);
  for (int64_t s = 0; s < b->seqs; ++s) {
    for (int64_t done = 0; done < prompt;) {
      const int64_t n = std::min(prompt - done, max_tokens);
      std::vector<int32_t> tokens(n), positions(n), token_seq(n, static_cast<int32_t>(s));
      std::vector<int64_t> slots(n);
      for (int64_t i = 0; i < n; ++i) {
        tokens[i] = static_cast<int32_t>((*rng)() % V);
        positions[i] = static_cast<int32_t>(done + i);
        slots[i] = b->Slot(s, done + i);
      }
      const std::vector<int32_t> logit_tokens = {static_cast<int32_t>(n - 1)};
      ForwardBatch fb{tokens,  positions,  token_seq,    slots,    b->tables,
                      b->seqs, b->per_seq, logit_tokens, b->deltas};
      int32_t next = 0;
      CHECK_OK(r->ForwardGreedy(fb, absl::MakeSpan(&next, 1), {}));
      b->last[s] = next;
      done += n;
    }
    b->lengths[s] = prompt;
  }
}

// Speculative decoding's steps: each of b's sequences computes its last token and `k` draft tokens
// (random), every row argmaxed (ForwardGreedy), and moves on one position (as if nothing of the
// draft were kept, so the context stays the same length). The median milliseconds per step.
double DraftSteps(GpuModelRunner* r, Batch* b, int64_t k, int64_t steps, std::mt19937* rng) {
  const int64_t V = r->config().vocab_size;
  const int64_t n = b->seqs * (1 + k);
  std::vector<int32_t> tokens(n), positions(n), token_seq(n), logit_tokens(n), next(n);
  std::vector<int64_t> slots(n);
  std::iota(logit_tokens.begin(), logit_tokens.end(), 0);
  std::vector<double> times;
  for (int64_t step = 0; step < steps; ++step) {
    for (int64_t s = 0; s < b->seqs; ++s) {
      for (int64_t i = 0; i <= k; ++i) {
        const int64_t t = s * (1 + k) + i;
        tokens[t] = i == 0 ? b->last[s] : static_cast<int32_t>((*rng)() % V);
        positions[t] = static_cast<int32_t>(b->lengths[s] + i);
        token_seq[t] = static_cast<int32_t>(s);
        slots[t] = b->Slot(s, b->lengths[s] + i);
      }
    }
    ForwardBatch fb{tokens,  positions,  token_seq,    slots,    b->tables,
                    b->seqs, b->per_seq, logit_tokens, b->deltas};
    const auto t0 = std::chrono::steady_clock::now();
    CHECK_OK(r->ForwardGreedy(fb, absl::MakeSpan(next), {}));
    const auto t1 = std::chrono::steady_clock::now();
    if (step > 0) times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    for (int64_t s = 0; s < b->seqs; ++s) {
      b->last[s] = next[s * (1 + k)];
      ++b->lengths[s];
    }
  }
  return Median(times);
}

// Decodes `steps` steps of b's sequences, greedy (ForwardGreedy) or, with `rows` (one per sequence,
// their draws changing every step), with seeded sampling on the GPU (ForwardSample): the median
// milliseconds per step (wall time), and in device_ms the median of the steps' device time.
double Decode(GpuModelRunner* r, Batch* b, int64_t steps, double* device_ms,
              std::vector<gpu::SampleRow>* rows = nullptr,
              const std::function<void(bool before)>& around_step = nullptr) {
  std::vector<double> times, device;
  std::vector<int32_t> token_seq(b->seqs), logit_tokens(b->seqs), positions(b->seqs);
  std::iota(token_seq.begin(), token_seq.end(), 0);
  std::iota(logit_tokens.begin(), logit_tokens.end(), 0);
  std::vector<int64_t> slots(b->seqs);
  std::vector<int32_t> next(b->seqs);
  for (int64_t step = 0; step < steps; ++step) {
    for (int64_t s = 0; s < b->seqs; ++s) {
      positions[s] = static_cast<int32_t>(b->lengths[s]);
      slots[s] = b->Slot(s, b->lengths[s]);
    }
    ForwardBatch fb{b->last, positions,  token_seq,    slots,    b->tables,
                    b->seqs, b->per_seq, logit_tokens, b->deltas};
    // Timed steps sit in an NVTX range, so that a profiler can take just them
    // (ncu --nvtx --nvtx-include "strata_decode_step/").
    if (step > 0) nvtxRangePushA("strata_decode_step");
    if (around_step) around_step(true);
    const auto t0 = std::chrono::steady_clock::now();
    if (rows == nullptr) {
      CHECK_OK(r->ForwardGreedy(fb, absl::MakeSpan(next), {}));
    } else {
      for (size_t i = 0; i < rows->size(); ++i) {
        (*rows)[i].u =
            static_cast<double>((step * 7919 + static_cast<int64_t>(i) * 104729) % 9973) / 9973.0;
        (*rows)[i].race_key = (static_cast<uint64_t>(step) << 32) | i;  // a race's draws
      }
      GpuModelRunner::Sampling sampling;
      sampling.rows = *rows;
      std::vector<float> lp(b->seqs);
      CHECK_OK(r->ForwardSample(fb, sampling, absl::MakeSpan(next), absl::MakeSpan(lp)));
    }
    const auto t1 = std::chrono::steady_clock::now();
    if (around_step) around_step(false);
    if (step > 0) nvtxRangePop();
    if (step > 0) {
      times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      device.push_back(r->last_step_device_ms());
    }
    b->last = next;
    for (int64_t s = 0; s < b->seqs; ++s) ++b->lengths[s];
  }
  *device_ms = Median(device);
  return Median(times);
}

int Main() {
  absl::StatusOr<int> devices = CudaDeviceCount();
  if (!devices.ok()) {
    std::fprintf(stderr, "gpu_bench: no usable GPU: %s\n", devices.status().ToString().c_str());
    return 2;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  Json json;
  json.path = absl::GetFlag(FLAGS_out);
  json.AddStr("device", prop.name);
  json.Add("multiprocessors", prop.multiProcessorCount);

  const std::string dtype_name = absl::GetFlag(FLAGS_dtype);
  DType dtype = DType::kBF16;
  if (dtype_name == "f16") dtype = DType::kF16;
  if (dtype_name == "f32") dtype = DType::kF32;
  gpu::ActType act;
  CHECK_OK(ActTypeOf(dtype, &act));
  const int64_t eb = gpu::ActBytes(act);
  json.AddStr("dtype", dtype_name);

  absl::StatusOr<CudaStream> stream = CudaStream::Create();
  CHECK_OK(stream.status());
  const cudaStream_t st = stream->get();

  // Copy bandwidth: 2 GiB device to device.
  double copy_gbs = 0;
  {
    const size_t bytes = size_t{2} << 30;
    absl::StatusOr<DeviceBuffer> a = DeviceBuffer::Allocate(bytes),
                                 b = DeviceBuffer::Allocate(bytes);
    CHECK_OK(a.status());
    CHECK_OK(b.status());
    CHECK_OK(a->Fill(1));
    const double ms = TimeMs(st, 10, [&] {
      cudaMemcpyAsync(b->data(), a->data(), bytes, cudaMemcpyDeviceToDevice, st);
    });
    copy_gbs = 2.0 * bytes / (ms * 1e6);
    json.Add("copy_gb_per_s", copy_gbs);
  }

  absl::StatusOr<std::unique_ptr<CublasLtGemm>> gemm = CublasLtGemm::Create();
  CHECK_OK(gemm.status());
  const bool only_decode = absl::GetFlag(FLAGS_only_decode);
  // Matrix rate: 8192^3 on random data.
  if (!only_decode) {
    const int64_t N = 8192;
    absl::StatusOr<DeviceBuffer> x = DeviceBuffer::Allocate(N * N * eb),
                                 w = DeviceBuffer::Allocate(N * N * eb),
                                 y = DeviceBuffer::Allocate(N * N * eb);
    CHECK_OK(x.status());
    CHECK_OK(w.status());
    CHECK_OK(y.status());
    gpu::LaunchRandomNormal(x->data(), act, N * N, 0, 1, 1, st);
    gpu::LaunchRandomNormal(w->data(), act, N * N, 0, 1, 2, st);
    GemmArgs g{N, N, N, x->data(), 0, w->data(), nullptr, y->data(), 0, act, act};
    const double ms = TimeMs(st, 10, [&] { CHECK_OK((*gemm)->Run(g, st)); });
    json.Add("gemm_8192_tflops", 2.0 * N * N * N / (ms * 1e9));
  }

  // --config names a config.json file (or a model directory holding one).
  absl::StatusOr<ModelConfig> config = [&]() -> absl::StatusOr<ModelConfig> {
    const std::string path = absl::GetFlag(FLAGS_config);
    if (!absl::EndsWith(path, ".json")) return LoadModelConfig(path);
    ASSIGN_OR_RETURN(const std::string text, ReadFileToString(path));
    ASSIGN_OR_RETURN(const JsonDocument doc, JsonDocument::Parse(text, path));
    return ParseModelConfig(doc.root());
  }();
  CHECK_OK(config.status());
  const ModelConfig& c = *config;
  json.AddStr("config", absl::GetFlag(FLAGS_config));

  // The GEMMs of one layer at m = 1, as achieved weight bandwidth.
  if (!only_decode) {
    const int64_t H = c.hidden_size, I = c.intermediate_size;
    const int64_t qkv = c.q_dim() + 2 * c.kv_dim();
    struct Shape {
      const char* name;
      int64_t n, k;
    };
    for (const Shape& sh :
         {Shape{"qkv", qkv, H}, Shape{"o", H, c.q_dim()}, Shape{"gate_up", 2 * I, H},
          Shape{"down", H, I}, Shape{"lm_head", c.vocab_size, H}}) {
      absl::StatusOr<DeviceBuffer> w = DeviceBuffer::Allocate(sh.n * sh.k * eb),
                                   x = DeviceBuffer::Allocate(64 * sh.k * eb),
                                   y = DeviceBuffer::Allocate(64 * sh.n * 4);
      CHECK_OK(w.status());
      CHECK_OK(x.status());
      CHECK_OK(y.status());
      gpu::LaunchRandomNormal(w->data(), act, sh.n * sh.k, 0, 0.02f, 3, st);
      gpu::LaunchRandomNormal(x->data(), act, 64 * sh.k, 0, 1, 4, st);
      // Negative: m = 1 through the GEMV kernel's variant -m - 1.
      std::vector<int64_t> rows_or_variants = {1, 64};
      for (int v = 0; v < gpu::kGemvVariants; ++v) rows_or_variants.push_back(-v - 1);
      for (int64_t m : rows_or_variants) {
        const int64_t rows = m < 0 ? 1 : m;
        (*gemm)->set_small_m_gemv(m < 0);
        (*gemm)->set_gemv_variant(m < 0 ? static_cast<int>(-m - 1) : 0);
        GemmArgs g{rows, sh.n, sh.k, x->data(), 0, w->data(), nullptr, y->data(), 0, act, act};
        const double ms = GraphTimeUs(st, 20, [&] { CHECK_OK((*gemm)->Run(g, st)); }) / 1e3;
        const std::string key =
            m < 0 ? absl::StrCat("gemv", -m - 1, "_m1_") : absl::StrCat("gemm_m", m, "_");
        json.Add(key + sh.name + "_gb_per_s", (sh.n * sh.k * eb) / (ms * 1e6));
        json.Add(key + sh.name + "_us", ms * 1e3);
      }
      (*gemm)->set_small_m_gemv(false);
      (*gemm)->set_gemv_variant(0);
    }
  }
  // The other ops of one decode step at batch 1 and 64 (microseconds each, by events), and paged
  // attention over contexts of 512 and 4096 tokens, to place the time a step spends outside GEMMs.
  if (!only_decode) {
    const int64_t H = c.hidden_size, D = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
    const int64_t qkv_w = c.q_dim() + 2 * c.kv_dim(), I = c.intermediate_size;
    const int64_t bt = 16, max_ctx = 4096, max_b = 64;
    const int64_t blocks = max_b * max_ctx / bt;
    auto buf = [&](int64_t bytes) {
      absl::StatusOr<DeviceBuffer> b = DeviceBuffer::Allocate(bytes);
      CHECK_OK(b.status());
      return *std::move(b);
    };
    DeviceBuffer resid = buf(4 * max_b * H), normed = buf(eb * max_b * H),
                 qkv = buf(eb * max_b * qkv_w), attn = buf(eb * max_b * c.q_dim()),
                 gu = buf(eb * max_b * 2 * I), act_out = buf(eb * max_b * I), normw = buf(4 * H),
                 inv = buf(4 * D), kcache = buf(eb * blocks * bt * c.kv_dim()),
                 vcache = buf(eb * blocks * bt * c.kv_dim()), meta = buf(4 * 4 * max_b),
                 tables = buf(4 * max_b * (max_ctx / bt)), slots = buf(8 * max_b),
                 ws = buf(4 * int64_t{64} << 20), counters = buf(4 * max_b * nkv),
                 logits = buf(4 * max_b * c.vocab_size), argmax_tokens = buf(4 * max_b),
                 logprobs = buf(4 * max_b);
    CHECK_OK(counters.Fill(0));
    // Paged attention over the bench's caches and block tables: `tokens` queries (token stride
    // qkv_w) of `seqs` sequences of `per` blocks each.
    auto attn_args = [&](int64_t tokens, const void* q, const int32_t* token_seq,
                         const int32_t* token_pos, int64_t seqs, int64_t per, void* out) {
      gpu::PagedAttentionArgs pa;
      pa.num_tokens = tokens;
      pa.num_heads = nh;
      pa.num_kv_heads = nkv;
      pa.head_dim = D;
      pa.scale = 1.0f / std::sqrt(static_cast<float>(D));
      pa.q = q;
      pa.q_stride = qkv_w;
      pa.k_cache = kcache.data();
      pa.v_cache = vcache.data();
      pa.block_tokens = bt;
      pa.num_blocks = blocks;
      pa.token_seq = token_seq;
      pa.token_pos = token_pos;
      pa.block_tables = tables.as<int32_t>();
      pa.num_seqs = seqs;
      pa.max_blocks_per_seq = per;
      pa.out = out;
      pa.out_stride = c.q_dim();
      pa.act = act;
      return pa;
    };
    gpu::LaunchRandomNormal(resid.data(), gpu::ActType::kF32, max_b * H, 0, 1, 5, st);
    gpu::LaunchRandomNormal(qkv.data(), act, max_b * qkv_w, 0, 1, 6, st);
    gpu::LaunchRandomNormal(gu.data(), act, max_b * 2 * I, 0, 1, 7, st);
    gpu::LaunchRandomNormal(normw.data(), gpu::ActType::kF32, H, 1, 0, 0, st);
    gpu::LaunchRandomNormal(inv.data(), gpu::ActType::kF32, D, 0.01f, 0, 0, st);
    gpu::LaunchRandomNormal(kcache.data(), act, blocks * bt * c.kv_dim(), 0, 1, 8, st);
    gpu::LaunchRandomNormal(vcache.data(), act, blocks * bt * c.kv_dim(), 0, 1, 9, st);
    gpu::LaunchRandomNormal(logits.data(), gpu::ActType::kF32, max_b * c.vocab_size, 0, 2, 11, st);
    for (int64_t b : {int64_t{1}, int64_t{64}}) {
      for (int64_t ctx : {int64_t{512}, max_ctx}) {
        // Sequence s: blocks [s * per, (s + 1) * per), query at position ctx - 1.
        const int64_t per = max_ctx / bt;
        std::vector<int32_t> seq(b), pos(b), tab(b * per);
        std::vector<int64_t> sl(b);
        for (int64_t i = 0; i < b; ++i) {
          seq[i] = static_cast<int32_t>(i);
          pos[i] = static_cast<int32_t>(ctx - 1);
          sl[i] = (i * per + (ctx - 1) / bt) * bt + (ctx - 1) % bt;
        }
        std::iota(tab.begin(), tab.end(), 0);
        CHECK_OK(meta.CopyFromHost(seq.data(), 4 * b));
        CHECK_OK(CopyMemory(meta.as<int32_t>() + max_b, pos.data(), 4 * b));
        CHECK_OK(tables.CopyFromHost(tab.data(), 4 * tab.size()));
        CHECK_OK(slots.CopyFromHost(sl.data(), 8 * b));
        gpu::PagedAttentionArgs pa = attn_args(b, qkv.data(), meta.as<int32_t>(),
                                               meta.as<int32_t>() + max_b, b, per, attn.data());
        pa.num_tiles = b;
        pa.workspace = ws.as<float>();
        // Partitions for this context or for capacity, with the tiled or the decode kernel.
        for (const auto& [plan_keys, decode_kernel] :
             {std::pair{ctx, false}, std::pair{max_ctx, false}, std::pair{ctx, true},
              std::pair{max_ctx, true}}) {
          pa.decode_kernel = decode_kernel;
          pa.counters = counters.as<uint32_t>();
          ChooseAttentionPartitions(plan_keys, prop.multiProcessorCount, &pa);
          const double us =
              GraphTimeUs(st, 50, [&] { CHECK_OK(PagedAttentionCuda(pa, Handle(st))); });
          const std::string key =
              absl::StrCat("attn_b", b, "_ctx", ctx, plan_keys == ctx ? "" : "_capacity_plan",
                           pa.decode_kernel ? "_decode_kernel" : "");
          json.Add(key + "_us", us);
          json.Add(key + "_partitions", static_cast<double>(pa.num_partitions));
          json.Add(key + "_gb_per_s", 2.0 * b * ctx * c.kv_dim() * eb / (us * 1e3));
          // And the decode kernel's one-block build (PagedAttentionArgs::decode_one_block).
          if (decode_kernel && plan_keys == ctx) {
            pa.decode_one_block = true;
            json.Add(key + "_one_block_us",
                     GraphTimeUs(st, 50, [&] { CHECK_OK(PagedAttentionCuda(pa, Handle(st))); }));
            pa.decode_one_block = false;
          }
        }
        // The decode kernel at batch 1 with partitions of other sizes than the planner's (64
        // keys, a block's round, at 512 keys): longer ones merge fewer partitions but take more
        // rounds a block; unit 0 is one partition, no merge at all.
        if (b == 1) {
          for (const int64_t unit : {0, 32, 64, 128, 256, 512}) {
            pa.decode_kernel = true;
            pa.num_partitions = unit == 0 ? 1 : (ctx + unit - 1) / unit;
            pa.partition_keys = pa.num_partitions == 1 ? 0 : unit;
            const double us =
                GraphTimeUs(st, 50, [&] { CHECK_OK(PagedAttentionCuda(pa, Handle(st))); });
            json.Add(absl::StrCat("attn_b1_ctx", ctx, "_decode_kernel_unit", unit, "_us"), us);
          }
        }
      }
      const double eps = 1e-5;
      const CudaStreamHandle hs = Handle(st);
      json.Add(
          absl::StrCat("op_b", b, "_add_rms_norm_us"), GraphTimeUs(st, 50, [&] {
            CHECK_OK(AddRmsNormCuda({b, H, static_cast<float>(eps), resid.as<float>(),
                                     normed.data(), H, normw.as<float>(), normed.data(), H, act},
                                    hs));
          }));
      json.Add(absl::StrCat("op_b", b, "_rope_us"), GraphTimeUs(st, 50, [&] {
                 CHECK_OK(RopeCuda(
                     {b, nh, nkv, D, meta.as<int32_t>() + max_b, inv.as<float>(), qkv.data(), qkv_w,
                      static_cast<char*>(qkv.data()) + c.q_dim() * eb, qkv_w, act},
                     hs));
               }));
      gpu::WriteKvArgs wk;
      wk.num_tokens = b;
      wk.num_kv_heads = nkv;
      wk.head_dim = D;
      wk.block_tokens = bt;
      wk.num_blocks = blocks;
      wk.k = static_cast<char*>(qkv.data()) + c.q_dim() * eb;
      wk.k_stride = qkv_w;
      wk.v = static_cast<char*>(qkv.data()) + (c.q_dim() + c.kv_dim()) * eb;
      wk.v_stride = qkv_w;
      wk.slots = slots.as<int64_t>();
      wk.k_cache = kcache.data();
      wk.v_cache = vcache.data();
      wk.act = act;
      json.Add(absl::StrCat("op_b", b, "_write_kv_us"),
               GraphTimeUs(st, 50, [&] { CHECK_OK(WriteKvCacheCuda(wk, hs)); }));
      const gpu::RopeArgs rope{b,
                               nh,
                               nkv,
                               D,
                               meta.as<int32_t>() + max_b,
                               inv.as<float>(),
                               qkv.data(),
                               qkv_w,
                               static_cast<char*>(qkv.data()) + c.q_dim() * eb,
                               qkv_w,
                               act};
      json.Add(absl::StrCat("op_b", b, "_rope_write_kv_us"),
               GraphTimeUs(st, 50, [&] { CHECK_OK(RopeWriteKvCuda(rope, wk, hs)); }));
      json.Add(absl::StrCat("op_b", b, "_silu_mul_us"), GraphTimeUs(st, 50, [&] {
                 CHECK_OK(SiluMulCuda({b, I, gu.data(), act_out.data(), act}, hs));
               }));
      // The greedy step's last kernel: argmax and its log-probability over f32 logits.
      json.Add(absl::StrCat("op_b", b, "_argmax_us"), GraphTimeUs(st, 50, [&] {
                 CHECK_OK(ArgmaxCuda({b, c.vocab_size, logits.data(), 0, gpu::ActType::kF32,
                                      argmax_tokens.as<int32_t>(), logprobs.as<float>()},
                                     hs));
               }));
    }
    // Prefill attention: one prompt of up to 4096 tokens over its own keys (causal), in planned
    // tiles, through the CUDA-core tiled kernel and the tensor-core kernel's wmma and mma.sync
    // forms. TFLOP/s counts the multiply-adds of Q.K and P.V over the causal triangle.
    {
      const int64_t T = std::min(absl::GetFlag(FLAGS_prefill_tokens), max_ctx);
      const int64_t group = nh / nkv;
      DeviceBuffer q = buf(eb * T * qkv_w), out = buf(eb * T * c.q_dim()), pmeta = buf(4 * 2 * T),
                   ptiles = buf(4 * 2 * T);
      gpu::LaunchRandomNormal(q.data(), act, T * qkv_w, 0, 1, 10, st);
      std::vector<int32_t> seq(T, 0), pos(T);
      std::iota(pos.begin(), pos.end(), 0);
      CHECK_OK(pmeta.CopyFromHost(seq.data(), 4 * T));
      CHECK_OK(CopyMemory(pmeta.as<int32_t>() + T, pos.data(), 4 * T));
      std::vector<int32_t> tab(max_ctx / bt);
      std::iota(tab.begin(), tab.end(), 0);
      CHECK_OK(tables.CopyFromHost(tab.data(), 4 * tab.size()));
      for (const int kernel : {0, 1, 2}) {  // tiled, wmma, mma.sync
        const bool mma = kernel > 0;
        if (mma && !AttentionMmaRunsHere(act, D, group)) continue;
        const int64_t tile_tokens =
            mma ? AttentionMmaTileTokens(group) : AttentionTileTokens(D, group);
        const std::vector<int32_t> tiles = PlanAttentionTiles(seq, pos, tile_tokens);
        CHECK_OK(ptiles.CopyFromHost(tiles.data(), 4 * tiles.size()));
        gpu::PagedAttentionArgs pa = attn_args(
            T, q.data(), pmeta.as<int32_t>(), pmeta.as<int32_t>() + T, 1, max_ctx / bt, out.data());
        pa.tiles = ptiles.as<int32_t>();
        pa.num_tiles = static_cast<int64_t>(tiles.size() / 2);
        pa.tile_tokens = tile_tokens;
        pa.mma_prefill = mma;
        pa.mma_sync = kernel == 2;
        pa.workspace = ws.as<float>();
        ChooseAttentionPartitions(T, prop.multiProcessorCount, &pa);
        CHECK_LE(gpu::PagedAttentionWorkspaceFloats(pa), int64_t{64} << 20);
        CHECK_EQ(gpu::PagedAttentionUsesMmaKernel(pa), mma);
        const double us = GraphTimeUs(st, 5, [&] { CHECK_OK(PagedAttentionCuda(pa, Handle(st))); });
        const std::string key = absl::StrCat("attn_prefill", T,
                                             kernel == 1   ? "_mma"
                                             : kernel == 2 ? "_mma_sync"
                                                           : "");
        json.Add(key + "_us", us);
        const double flops = 4.0 * nh * D * (static_cast<double>(T) * (T + 1) / 2);
        json.Add(key + "_tflops", flops / (us * 1e6));
      }
    }
  }
  gemm->reset();

  std::vector<int64_t> batches;
  for (absl::string_view b : absl::StrSplit(absl::GetFlag(FLAGS_batches), ',')) {
    int64_t v;
    if (absl::SimpleAtoi(b, &v) && v > 0) batches.push_back(v);
  }
  const int64_t max_batch = *std::max_element(batches.begin(), batches.end());
  const int64_t prompt = absl::GetFlag(FLAGS_prompt);
  const int64_t steps = absl::GetFlag(FLAGS_steps);
  const int64_t prefill_tokens = absl::GetFlag(FLAGS_prefill_tokens);
  const int64_t block_tokens = 16;
  // Positions a sequence reaches: the decode runs', the traces' (3 warm-up steps and theirs).
  // (The drafts runs' steps reach 8 positions further.)
  const int64_t ctx =
      std::max({prompt + steps + 9, prompt + 4 + absl::GetFlag(FLAGS_trace_steps), prefill_tokens});
  const int64_t per_seq = (ctx + block_tokens - 1) / block_tokens;

  GpuRunnerOptions o;
  // The first runner, and the variants but decode_attn, fused_norm and mma_prefill, use the tiled
  // attention kernels, so that the keys keep the meaning of earlier runs; the shipped defaults
  // (decode attention kernel and tensor-core prefill on) are the decode_attn and mma_prefill
  // figures, and the fine_tunes runs use them.
  o.decode_attention_kernel = false;
  o.prefill_mma_attention = false;
  o.block_tokens = block_tokens;
  o.act = dtype;
  o.max_batch_tokens = std::max<int64_t>(prefill_tokens, 1024);
  o.max_seqs = std::max<int64_t>(max_batch, 1);
  o.max_blocks_per_seq = per_seq;
  o.num_blocks = per_seq * o.max_seqs;
  // The shipped attention defaults on this run's shapes: the sampled, fine-tune and traced runs.
  GpuRunnerOptions shipped = o;
  shipped.decode_attention_kernel = GpuRunnerOptions{}.decode_attention_kernel;
  shipped.prefill_mma_attention = GpuRunnerOptions{}.prefill_mma_attention &&
                                  AttentionMmaRunsHere(act, c.head_dim, c.group_size());
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<std::unique_ptr<GpuModelRunner>> runner = GpuModelRunner::CreateRandom(c, o, 1);
  CHECK_OK(runner.status());
  json.Add("create_s",
           std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  const GpuRunnerMemory mem = (*runner)->memory();
  json.Add("weight_bytes", static_cast<double>(mem.weight_bytes));
  json.Add("kv_cache_bytes", static_cast<double>(mem.kv_cache_bytes));
  json.Add("params", static_cast<double>(c.NumParameters()));

  std::mt19937 rng(1);
  Batch proto;
  proto.block_tokens = block_tokens;
  proto.per_seq = per_seq;
  // A batch of `seqs` sequences, sequence s on blocks [s * per_seq, (s + 1) * per_seq).
  auto batch_of = [&proto, per_seq](int64_t seqs) {
    Batch b = proto;
    b.seqs = seqs;
    b.tables.resize(seqs * per_seq);
    std::iota(b.tables.begin(), b.tables.end(), 0);
    return b;
  };

  // Prefill: one prompt of prefill_tokens tokens, median of 3 (after one warm-up).
  auto prefill = [&](GpuModelRunner* r, const std::string& key,
                     const DeltaWeights* fine_tune = nullptr) {
    Batch b = batch_of(1);
    if (fine_tune != nullptr) b.deltas = {fine_tune};
    std::vector<double> times;
    for (int rep = 0; rep < 4; ++rep) {
      const auto a = std::chrono::steady_clock::now();
      Prefill(r, &b, prefill_tokens, prefill_tokens, &rng);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
      if (rep > 0) times.push_back(s);
    }
    json.Add(key, prefill_tokens / Median(times));
  };
  if (!only_decode) {
    json.Add("prefill_tokens", static_cast<double>(prefill_tokens));
    prefill(runner->get(), "prefill_tokens_per_s");
  }

  // Bytes one batch-1 decode step must read: every weight but the embedding table (one row of it),
  // and the KV cache of the context (mid-run length).
  const int64_t embed_bytes = c.vocab_size * c.hidden_size * eb;
  const double weights_per_step =
      static_cast<double>(mem.weight_bytes - (c.tie_word_embeddings ? 0 : embed_bytes));
  const double kv_per_token = 2.0 * c.num_layers * c.kv_dim() * eb;
  const double b1_bytes = weights_per_step + kv_per_token * (prompt + steps / 2.0);
  const double roofline = copy_gbs * 1e9 / b1_bytes;
  json.Add("decode_b1_bytes_per_step", b1_bytes);
  json.Add("decode_b1_roofline_tokens_per_s", roofline);

  // Decode with graphs for every batch size, then batch 1 with cuBLASLt instead of the GEMV kernel
  // for the projections and batch 1 eager (each a new runner, made after the one before is gone,
  // so that they fit).
  struct DecodeRun {
    int64_t batch = 1;
    bool graphs = true, cublas = false, decode_attn = false, fused_norm = false;
    bool shipped = false;     // GpuRunnerOptions' defaults, whatever the fields above say
    int gemv_variant = -1;    // with shipped: GpuRunnerOptions::gemv_variant (-1: its default)
    bool prefetch_o = false;  // with shipped: GpuRunnerOptions::gemv_prefetch_o_proj
    const char* cublas_for = nullptr;  // with shipped: this projection through cuBLASLt
    bool gemv_rope = false;            // with shipped: GpuRunnerOptions::gemv_rope
    bool gemv_down = false;            // with shipped: GpuRunnerOptions::GemvRoutes::down
    bool one_block = false;            // with shipped: GpuRunnerOptions::decode_attention_one_block
  };
  std::vector<DecodeRun> runs;
  const std::vector<std::string> variants = absl::StrSplit(absl::GetFlag(FLAGS_variants), ',');
  auto wanted = [&variants](absl::string_view v) {
    return std::find(variants.begin(), variants.end(), v) != variants.end();
  };
  if (wanted("default")) {
    for (int64_t bs : batches) runs.push_back({.batch = bs, .graphs = true});
  }
  // Projections through cuBLASLt at every batch size where the GEMV would take them.
  if (wanted("cublas")) {
    for (int64_t bs : batches) {
      if (bs <= 8) runs.push_back({.batch = bs, .graphs = true, .cublas = true});
    }
  }
  if (wanted("eager")) runs.push_back({.batch = 1, .graphs = false});
  // The decode attention kernel (GpuRunnerOptions::decode_attention_kernel) at every batch size,
  // then with the residual-add RMSNorms folded into the GEMVs as well (fused_residual_norm).
  if (wanted("decode_attn")) {
    for (int64_t bs : batches) runs.push_back({.batch = bs, .graphs = true, .decode_attn = true});
  }
  if (wanted("fused_norm")) {
    for (int64_t bs : batches) {
      if (bs <= 4) {  // fused up to 4 rows
        runs.push_back({.batch = bs, .graphs = true, .decode_attn = true, .fused_norm = true});
      }
    }
  }
  // The shipped defaults as they are (each option's row limits included) at every batch size.
  if (wanted("shipped")) {
    for (int64_t bs : batches) runs.push_back({.batch = bs, .graphs = true, .shipped = true});
  }
  // The shipped defaults at batch 1 with o_proj's GEMV prefetching its weights into L2 during
  // attention (GpuRunnerOptions::gemv_prefetch_o_proj).
  if (wanted("prefetch_o"))
    runs.push_back({.batch = 1, .graphs = true, .shipped = true, .prefetch_o = true});
  // The shipped defaults at batch 1 with one projection at a time through cuBLASLt instead of
  // the GEMV (GpuRunnerOptions::gemv_routes).
  if (wanted("gemv_routes")) {
    for (const char* p : {"qkv", "o_proj", "gate_up", "lm_head"}) {
      runs.push_back({.batch = 1, .graphs = true, .shipped = true, .cublas_for = p});
    }
  }
  // The shipped defaults at batch 1 with RoPE and the KV write in the q/k/v GEMV.
  if (wanted("gemv_rope")) {
    runs.push_back({.batch = 1, .graphs = true, .shipped = true, .gemv_rope = true});
  }
  // The shipped defaults at batch 1 with down_proj through the GEMV (GemvRoutes::down), with the
  // default shape and the two-stage ones of a row a warp.
  if (wanted("gemv_down")) {
    for (int v : {-1, 8, 9}) {
      runs.push_back(
          {.batch = 1, .graphs = true, .shipped = true, .gemv_variant = v, .gemv_down = true});
    }
  }
  // The shipped defaults with the decode attention kernel's one-block build, at each batch the
  // decode kernel takes.
  if (wanted("one_block")) {
    for (int64_t bs : batches) {
      if (bs <= GpuRunnerOptions{}.decode_attention_max_rows) {
        runs.push_back({.batch = bs, .graphs = true, .shipped = true, .one_block = true});
      }
    }
  }
  // The shipped defaults at batch 1 with each other GEMV block shape (gemv.cu's variants).
  // gemv_two_stage: the two-stage shapes only (variants 8 to 10).
  if (wanted("gemv_variants") || wanted("gemv_two_stage")) {
    for (int v = wanted("gemv_variants") ? 0 : 8; v < gpu::kGemvVariants; ++v) {
      if (v != GpuRunnerOptions{}.gemv_variant) {
        runs.push_back({.batch = 1, .graphs = true, .shipped = true, .gemv_variant = v});
      }
    }
  }
  // Seeded sampling on the GPU in place of the graph's argmax (the engine's path for requests
  // with a temperature; the shipped attention defaults): what sampling adds to a step. Top-p 1
  // draws by the exponential race (no sort); top-p 0.9 sorts every row's candidates.
  struct SampledRun {
    const char* key;
    float top_p;
  };
  std::vector<SampledRun> sampled;
  if (wanted("sampled")) sampled = {{"sampled", 1.0f}, {"sampled_top_p", 0.9f}};
  std::unique_ptr<GpuModelRunner> other;
  std::map<std::string, double> tokens_per_s;  // each decode run's, by key
  // A runner of its own for a variant, made after the ones before are gone, so that they fit.
  auto fresh = [&](const GpuRunnerOptions& oo) -> GpuModelRunner* {
    runner->reset();
    other.reset();
    absl::StatusOr<std::unique_ptr<GpuModelRunner>> e = GpuModelRunner::CreateRandom(c, oo, 1);
    CHECK_OK(e.status());
    other = *std::move(e);
    return other.get();
  };
  for (const DecodeRun& run : runs) {
    GpuModelRunner* r = runner->get();
    if (run.shipped) {
      GpuRunnerOptions oo = shipped;
      if (run.gemv_variant >= 0) oo.gemv_variant = run.gemv_variant;
      oo.gemv_prefetch_o_proj = run.prefetch_o;
      oo.gemv_rope = run.gemv_rope;
      oo.gemv_routes.down = run.gemv_down;
      oo.decode_attention_one_block = run.one_block;
      if (run.cublas_for != nullptr) {
        const absl::string_view p = run.cublas_for;
        oo.gemv_routes.qkv = p != "qkv";
        oo.gemv_routes.o_proj = p != "o_proj";
        oo.gemv_routes.gate_up = p != "gate_up";
        oo.gemv_routes.lm_head = p != "lm_head";
      }
      r = fresh(oo);
    } else if (!run.graphs || run.cublas || run.decode_attn || run.fused_norm) {
      GpuRunnerOptions oo = o;
      oo.cuda_graphs = run.graphs;
      oo.small_m_gemv = !run.cublas;
      oo.decode_attention_kernel = run.decode_attn;
      // The decode kernel at every batch size here (the shipped defaults stop at a row limit).
      oo.decode_attention_max_rows = max_batch;
      oo.fused_residual_norm = run.fused_norm;
      if (run.fused_norm) oo.gemv_max_rows = 8;  // the fused forms are GEMVs
      r = fresh(oo);
    }
    Batch b = batch_of(run.batch);
    Prefill(r, &b, prompt, o.max_batch_tokens, &rng);
    double device_ms = 0;
    const double ms = Decode(r, &b, steps, &device_ms);
    const std::string key =
        absl::StrCat("decode_b", run.batch, run.graphs ? "" : "_eager", run.cublas ? "_cublas" : "",
                     run.decode_attn ? "_decode_attn" : "", run.fused_norm ? "_fused_norm" : "",
                     run.shipped ? "_shipped" : "",
                     run.gemv_variant >= 0 ? absl::StrCat("_gemv", run.gemv_variant) : "",
                     run.prefetch_o ? "_prefetch_o" : "",
                     run.cublas_for != nullptr ? absl::StrCat("_cublas_", run.cublas_for) : "",
                     run.gemv_rope ? "_gemv_rope" : "", run.gemv_down ? "_gemv_down" : "",
                     run.one_block ? "_one_block" : "");
    json.Add(key + "_ms_per_step", ms);
    json.Add(key + "_device_ms_per_step", device_ms);
    tokens_per_s[key] = run.batch * 1000.0 / ms;
    json.Add(key + "_tokens_per_s", tokens_per_s[key]);
    if (run.batch == 1 && run.graphs) {
      json.Add(key + "_fraction_of_roofline", (1000.0 / ms) / roofline);
    }
  }
  // The batch-1 experiments that beat the shipped defaults (by 0.5%, above run-to-run noise) in
  // this run, taken together: each projection moved to cuBLASLt that won, the fastest GEMV shape,
  // then each option that won against the shape it was measured with (down_proj on the GEMV
  // against the chosen shape where it was measured with it; RoPE in the q/k/v GEMV only while q/k/v
  // stays on the GEMV). What it took is written as decode_b1_combined_took_* (1, or the variant),
  // and the combination is measured once more: one run of a whole check tells whether the
  // winners add up.
  if (wanted("combined") && tokens_per_s.count("decode_b1_shipped") > 0) {
    const double base = tokens_per_s["decode_b1_shipped"];
    auto beats = [&](const std::string& key, double than) {
      auto it = tokens_per_s.find(key);
      return it != tokens_per_s.end() && it->second > 1.005 * than;
    };
    GpuRunnerOptions oo = shipped;
    int took = 0;
    struct Route {
      const char* name;
      bool* on_gemv;
    };
    for (const Route& p :
         {Route{"qkv", &oo.gemv_routes.qkv}, Route{"o_proj", &oo.gemv_routes.o_proj},
          Route{"gate_up", &oo.gemv_routes.gate_up}, Route{"lm_head", &oo.gemv_routes.lm_head}}) {
      if (beats(absl::StrCat("decode_b1_shipped_cublas_", p.name), base)) {
        *p.on_gemv = false;
        json.Add(absl::StrCat("decode_b1_combined_took_cublas_", p.name), 1);
        ++took;
      }
    }
    int best_variant = -1;
    double best = base;
    for (int v = 0; v < gpu::kGemvVariants; ++v) {
      const std::string key = absl::StrCat("decode_b1_shipped_gemv", v);
      if (beats(key, best)) {
        best = tokens_per_s[key];
        best_variant = v;
      }
    }
    if (best_variant >= 0) {
      oo.gemv_variant = best_variant;
      json.Add("decode_b1_combined_took_gemv_variant", best_variant);
      ++took;
    }
    // down_proj on the GEMV: against the chosen shape, measured with it or (the default shape
    // kept) with the default.
    const std::string down_key =
        best_variant >= 0 ? absl::StrCat("decode_b1_shipped_gemv", best_variant, "_gemv_down")
                          : "decode_b1_shipped_gemv_down";
    if (beats(down_key, best)) {
      oo.gemv_routes.down = true;
      json.Add("decode_b1_combined_took_gemv_down", 1);
      ++took;
    }
    if (oo.gemv_routes.qkv && beats("decode_b1_shipped_gemv_rope", base)) {
      oo.gemv_rope = true;
      json.Add("decode_b1_combined_took_gemv_rope", 1);
      ++took;
    }
    if (beats("decode_b1_shipped_one_block", base)) {
      oo.decode_attention_one_block = true;
      json.Add("decode_b1_combined_took_one_block", 1);
      ++took;
    }
    if (beats("decode_b1_shipped_prefetch_o", base)) {
      oo.gemv_prefetch_o_proj = true;
      json.Add("decode_b1_combined_took_prefetch_o", 1);
      ++took;
    }
    json.Add("decode_b1_combined_took", took);
    if (took > 0) {
      GpuModelRunner* const r = fresh(oo);
      Batch b = batch_of(1);
      Prefill(r, &b, prompt, o.max_batch_tokens, &rng);
      double device_ms = 0;
      const double ms = Decode(r, &b, steps, &device_ms);
      json.Add("decode_b1_combined_ms_per_step", ms);
      json.Add("decode_b1_combined_device_ms_per_step", device_ms);
      json.Add("decode_b1_combined_tokens_per_s", 1000.0 / ms);
      json.Add("decode_b1_combined_fraction_of_roofline", (1000.0 / ms) / roofline);
    }
  }
  // Then again with each row's sampling split over blocks (GpuRunnerOptions::sampler_split_rows;
  // keys ending _split).
  for (const bool split : {false, true}) {
    if (sampled.empty()) break;
    GpuRunnerOptions oo = shipped;
    oo.sampler_split_rows = split;
    GpuModelRunner* const r = fresh(oo);
    for (const SampledRun& sr : sampled) {
      for (int64_t bs : batches) {
        Batch b = batch_of(bs);
        Prefill(r, &b, prompt, o.max_batch_tokens, &rng);
        std::vector<gpu::SampleRow> rows(bs);
        for (gpu::SampleRow& row : rows) row.top_p = sr.top_p;
        double device_ms = 0;
        const double ms = Decode(r, &b, steps, &device_ms, &rows);
        const std::string key = absl::StrCat("decode_b", bs, "_", sr.key, split ? "_split" : "");
        json.Add(key + "_ms_per_step", ms);
        json.Add(key + "_device_ms_per_step", device_ms);
        json.Add(key + "_tokens_per_s", bs * 1000.0 / ms);
      }
    }
  }
  // Speculative decoding's steps on the shipped defaults: keys draft_b{batch}_k{k}_ms_per_step,
  // and the tokens/s such steps would give if every draft were kept. (k = 0 is a plain decode
  // step, replayed from its graph; a step with drafts runs the tiled path, as the engine's do.)
  if (wanted("drafts")) {
    GpuModelRunner* const r = fresh(shipped);
    for (const int64_t bs : {int64_t{1}, int64_t{8}}) {
      if (bs > o.max_seqs) continue;
      for (const int64_t k : {0, 1, 2, 4, 8}) {
        if (bs * (1 + k) > o.max_seqs) continue;  // ForwardGreedy's rows
        Batch b = batch_of(bs);
        Prefill(r, &b, prompt, o.max_batch_tokens, &rng);
        const double ms = DraftSteps(r, &b, k, steps, &rng);
        const std::string key = absl::StrCat("draft_b", bs, "_k", k);
        json.Add(key + "_ms_per_step", ms);
        json.Add(key + "_tokens_per_s_all_kept", static_cast<double>(bs * (1 + k)) * 1000.0 / ms);
      }
    }
  }
  // Prefill again with the tensor-core attention kernel (GpuRunnerOptions::prefill_mma_attention).
  if (!only_decode && wanted("mma_prefill") &&
      AttentionMmaRunsHere(act, c.head_dim, c.group_size())) {
    GpuRunnerOptions oo = o;
    oo.prefill_mma_attention = true;
    prefill(fresh(oo), "prefill_mma_tokens_per_s");
  }
  // And through the kernel's mma.sync form (GpuRunnerOptions::prefill_mma_sync).
  if (!only_decode && wanted("mma_sync_prefill") &&
      AttentionMmaRunsHere(act, c.head_dim, c.group_size())) {
    GpuRunnerOptions oo = o;
    oo.prefill_mma_attention = true;
    oo.prefill_mma_sync = true;
    prefill(fresh(oo), "prefill_mma_sync_tokens_per_s");
  }
  // Fine-tunes: random packed deltas (Strata's delta format; the values do not matter for speed),
  // one per tenant, copied to the runner's device region on their first step.
  if (wanted("fine_tunes")) {
    std::vector<int64_t> tenants;
    for (absl::string_view t : absl::StrSplit(absl::GetFlag(FLAGS_fine_tune_tenants), ',')) {
      int64_t v;
      if (absl::SimpleAtoi(t, &v) && v > 0) tenants.push_back(v);
    }
    const int64_t most = tenants.empty() ? 0 : *std::max_element(tenants.begin(), tenants.end());
    std::vector<std::unique_ptr<DeltaWeights>> deltas;
    for (int64_t i = 0; i < most; ++i) {
      deltas.push_back(RandomDeltaWeights(c, absl::GetFlag(FLAGS_fine_tune_bits), false, 100 + i));
    }
    if (most > 0) {
      const int64_t per_delta = deltas[0]->resident_bytes + (1 << 20);
      json.Add("fine_tune_delta_bytes", static_cast<double>(deltas[0]->resident_bytes));
      GpuRunnerOptions oo = shipped;
      oo.delta_bytes = most * per_delta;
      GpuModelRunner* const r = fresh(oo);
      // A fine-tune's first step: one token, most of it the copy of its delta to the GPU (from
      // pageable memory, while the step waits).
      {
        Batch b = batch_of(1);
        b.deltas = {deltas[0].get()};
        const auto a = std::chrono::steady_clock::now();
        Prefill(r, &b, 1, 1, &rng);
        json.Add("fine_tune_first_step_ms",
                 std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a)
                     .count());
      }
      if (!only_decode) prefill(r, "prefill_ft_tokens_per_s", deltas[0].get());
      for (int64_t t : tenants) {
        Batch b = batch_of(max_batch);
        for (int64_t s = 0; s < max_batch; ++s) b.deltas.push_back(deltas[s % t].get());
        Prefill(r, &b, prompt, o.max_batch_tokens, &rng);
        double device_ms = 0;
        const double ms = Decode(r, &b, steps, &device_ms);
        const std::string key = absl::StrCat("decode_b", max_batch, "_ft", t);
        json.Add(key + "_ms_per_step", ms);
        json.Add(key + "_device_ms_per_step", device_ms);
        json.Add(key + "_tokens_per_s", max_batch * 1000.0 / ms);
      }
      json.Add("fine_tune_uploads", static_cast<double>(r->delta_stats().uploads));
    }
  }
  // The results so far are on disk before tracing starts, in case CUPTI fails the process.
  const std::string out = absl::GetFlag(FLAGS_out);
  json.Save();  // (each figure is on disk already; the object again, for the record)
  const int64_t trace_steps = absl::GetFlag(FLAGS_trace_steps);
  if (trace_steps > 0) {
    // Started before the runner, whose graphs CUPTI must see instantiated.
    absl::StatusOr<std::unique_ptr<KernelTrace>> trace =
        KernelTrace::Start(absl::GetFlag(FLAGS_cupti_lib));
    if (!trace.ok()) {
      json.AddStr("trace_error", std::string(trace.status().message()));
    } else {
      // Traces `trace_steps` decode steps of r at batch bs under the keys `key`_*.
      auto trace_decode = [&](GpuModelRunner* r, int64_t bs, const std::string& key) {
        Batch b = batch_of(bs);
        Prefill(r, &b, prompt, o.max_batch_tokens, &rng);
        double device_ms = 0;
        Decode(r, &b, 3, &device_ms);  // graphs captured and warm
        // A window per step (so that the host's time between steps is not counted idle), the
        // records collected once after the last step.
        std::vector<std::pair<uint64_t, uint64_t>> windows;
        Decode(r, &b, trace_steps, &device_ms, nullptr, [&](bool before) {
          if (before) {
            windows.push_back({(*trace)->Now(), 0});
          } else {
            windows.back().second = (*trace)->Now();  // the step's tokens are back: it is done
          }
        });
        const uint64_t dropped_before = (*trace)->dropped();
        const std::vector<KernelRecord> all =
            (*trace)->Collect(windows.front().first, windows.back().second);
        double kernels = 0, span = 0, busy = 0, idle = 0;
        std::vector<KernelRecord> last;
        for (const auto& [from, to] : windows) {
          last.clear();
          for (const KernelRecord& k : all) {
            if (k.start_ns >= from && k.start_ns < to) last.push_back(k);
          }
          const KernelTraceSummary s = Summarize(last);
          kernels += s.kernels;
          span += s.span_us;
          busy += s.busy_us;
          idle += s.idle_us;
        }
        const double n = static_cast<double>(trace_steps);
        json.Add(key + "_kernels_per_step", kernels / n);
        json.Add(key + "_span_us_per_step", span / n);
        json.Add(key + "_busy_us_per_step", busy / n);
        json.Add(key + "_idle_us_per_step", idle / n);
        json.Add(key + "_traced_device_ms_per_step", device_ms);  // against the untraced runs
        // Records CUPTI dropped since the last collection (this prefill and warm-up included): a
        // health flag.
        json.Add(key + "_dropped_records",
                 static_cast<double>((*trace)->dropped() - dropped_before));
        if (out.empty()) return;
        const std::string stem = absl::StrCat(
            absl::EndsWith(out, ".json") ? out.substr(0, out.size() - 5) : out, "_", key);
        // Time by kernel over every traced step, largest first.
        std::ofstream table(stem + ".tsv");
        table << "kernel\tlaunches_per_step\tus_per_step\tus_per_launch\n";
        for (const KernelTraceSummary::Entry& e : Summarize(all).by_name) {
          table << absl::StrFormat("%s\t%.2f\t%.2f\t%.2f\n", e.name, e.count / n, e.total_us / n,
                                   e.total_us / e.count);
        }
        // The last step's kernels in order: start (from the first), duration, and the gap after
        // the previous kernel's end (negative: they overlapped).
        std::ofstream timeline(stem + "_step.tsv");
        timeline << "index\tkernel\tstart_us\tduration_us\tgap_us\n";
        for (size_t i = 0; i < last.size(); ++i) {
          const double start = (last[i].start_ns - last[0].start_ns) / 1000.0;
          const double gap =
              i == 0 ? 0.0 : (static_cast<double>(last[i].start_ns) - last[i - 1].end_ns) / 1000.0;
          timeline << absl::StrFormat("%d\t%s\t%.3f\t%.3f\t%.3f\n", i, last[i].name, start,
                                      (last[i].end_ns - last[i].start_ns) / 1000.0, gap);
        }
      };
      GpuModelRunner* r = fresh(shipped);
      for (int64_t bs : batches) trace_decode(r, bs, absl::StrCat("trace_b", bs));
      // The fused decode layer too (fused_residual_norm, up to 4 rows), next to the default.
      if (std::any_of(batches.begin(), batches.end(), [](int64_t bs) { return bs <= 4; })) {
        GpuRunnerOptions fused = shipped;
        fused.fused_residual_norm = true;
        r = fresh(fused);
        for (int64_t bs : batches) {
          if (bs <= 4) trace_decode(r, bs, absl::StrCat("trace_b", bs, "_fused_norm"));
        }
      }
    }
  }
  json.Save();
  std::printf("%s\n}\n", json.s.c_str());
  return 0;
}

#else

int Main() {
  std::fprintf(stderr, "gpu_bench: built without CUDA\n");
  return 2;
}

#endif

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::InitProgram(argc, argv, "GPU forward-pass benchmark against the card's limits.");
  return strata::Main();
}
