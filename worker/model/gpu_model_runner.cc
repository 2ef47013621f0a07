#include "worker/model/gpu_model_runner.h"

#ifdef STRATA_HAVE_CUDA

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <iterator>
#include <map>
#include <numeric>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cuda/delta.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"
#include "kernels/elementwise.h"
#include "worker/model/delta.h"
#include "worker/model/gpu_delta_plan.h"

namespace strata {
namespace {

constexpr size_t kAlign = 256;

size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

CudaStreamHandle Handle(cudaStream_t s) { return reinterpret_cast<CudaStreamHandle>(s); }

// Host conversion of n elements of `src` (f32, bf16 or f16) into `act`, appended as raw bytes.
void ConvertToAct(const void* src, DType dtype, int64_t n, gpu::ActType act,
                  std::vector<uint8_t>* out) {
  const size_t eb = static_cast<size_t>(gpu::ActBytes(act));
  out->resize(static_cast<size_t>(n) * eb);
  const auto* s8 = static_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const float f = ElementAsFloat(s8, dtype, i);
    uint8_t* d = out->data() + i * eb;
    if (act == gpu::ActType::kF32) {
      std::memcpy(d, &f, 4);
    } else {
      const uint16_t h = act == gpu::ActType::kBF16 ? FloatToBf16(f) : FloatToF16(f);
      std::memcpy(d, &h, 2);
    }
  }
}

struct LayerDev {
  void* qkv_w = nullptr;
  void* qkv_b = nullptr;
  void* o_w = nullptr;
  void* o_b = nullptr;
  void* gate_up_w = nullptr;
  void* down_w = nullptr;
  float* in_norm = nullptr;
  float* post_norm = nullptr;
  float* q_norm = nullptr;
  float* k_norm = nullptr;
};

// A fine-tune's delta on the device: the packed matrices' views point into the runner's delta
// region; a vector pointer is null where the fine-tune keeps the base's.
// A LoRA factor pair on the device, in the activations' type: A [rank, cols], B [rows, rank] (the
// adapter's scale folded in). rank 0: none.
struct LowRankDev {
  int64_t rank = 0, rows = 0, cols = 0;
  const void* a = nullptr;
  const void* b = nullptr;
};

// One projection's update on the device: its packed delta and its low-rank part (either may be
// absent).
struct ProjDeltaDev {
  PackedDelta packed;
  LowRankDev lora;
};

struct LayerDeltaDev {
  ProjDeltaDev q, k, v, o, gate, up, down;
  const float* input_norm = nullptr;
  const float* post_norm = nullptr;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  const float* q_bias = nullptr;
  const float* k_bias = nullptr;
  const float* v_bias = nullptr;
  const float* o_bias = nullptr;
};

struct DeltaDev {
  PackedDelta embed, lm_head;
  // LoRA on the embedding, its A transposed ([vocab, rank], so that a token's column is a row to
  // gather), and on the LM head.
  LowRankDev lora_embed_t, lora_head;
  const float* final_norm = nullptr;
  std::vector<LayerDeltaDev> layers;
};

// Where a delta's bytes go in its place in the device region: the arena at the same address
// modulo 64 as on the host (its tensors' 64-byte alignment holds), then each vector it holds,
// 16-byte aligned, then each low-rank factor pair converted to the activations' type (`eb` bytes
// an element), 16-byte aligned. A LoRA adapter's arena holds only its f32 factors: it is not
// copied.
struct DeltaLayout {
  size_t shift = 0;
  size_t arena_bytes = 0;
  size_t total = 0;
  std::vector<const std::vector<float>*> vectors;  // non-empty ones, in placement order
  std::vector<const LowRankDelta*> low_rank;       // rank > 0, in placement order
};

size_t Align16(size_t n) { return (n + 15) / 16 * 16; }

// LoRA factors sit at 256-byte offsets in the region, as cuBLASLt's operands elsewhere do (its
// algorithms may assume that alignment). The host arena (worker/model/lora.cc) aligns each f32
// factor to 256 bytes too, so the device copy never needs more than DeltaCache reserved.
size_t Align256(size_t n) { return (n + 255) / 256 * 256; }

size_t LowRankBytes(const LowRankDelta& lr, int64_t eb) {
  return Align256(static_cast<size_t>(lr.rank * lr.cols * eb)) +
         Align256(static_cast<size_t>(lr.rows * lr.rank * eb));
}

DeltaLayout LayoutOf(const DeltaWeights& d, int64_t eb) {
  DeltaLayout lay;
  lay.shift = reinterpret_cast<uintptr_t>(d.arena.data()) % 64;
  lay.arena_bytes = d.lora ? 0 : Align16(lay.shift + d.arena.size());
  const auto add = [&lay](const std::vector<float>& v) {
    if (!v.empty()) lay.vectors.push_back(&v);
  };
  add(d.final_norm);
  for (const LayerDelta& L : d.layers) {
    for (const std::vector<float>* v : {&L.input_norm, &L.post_attention_norm, &L.q_norm, &L.k_norm,
                                        &L.q_bias, &L.k_bias, &L.v_bias, &L.o_bias}) {
      add(*v);
    }
  }
  for (const LayerDelta& L : d.layers) {
    for (const LowRankDelta* lr :
         {&L.lora_q, &L.lora_k, &L.lora_v, &L.lora_o, &L.lora_gate, &L.lora_up, &L.lora_down}) {
      if (lr->rank > 0) lay.low_rank.push_back(lr);
    }
  }
  for (const LowRankDelta* lr : {&d.lora_embed, &d.lora_head}) {
    if (lr->rank > 0) lay.low_rank.push_back(lr);
  }
  lay.total = lay.arena_bytes;
  for (const std::vector<float>* v : lay.vectors) lay.total += Align16(4 * v->size());
  if (!lay.low_rank.empty()) lay.total = Align256(lay.total);
  for (const LowRankDelta* lr : lay.low_rank) lay.total += LowRankBytes(*lr, eb);
  return lay;
}

// n f32 values as `act` elements at `out`.
void ConvertForDevice(const float* v, int64_t n, gpu::ActType act, uint8_t* out) {
  if (act == gpu::ActType::kF32) {
    std::memcpy(out, v, static_cast<size_t>(n) * 4);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = act == gpu::ActType::kBF16 ? FloatToBf16(v[i]) : FloatToF16(v[i]);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

// Rows of one fine-tune that the fused tensor-core delta product (DeltaMmaCuda, 16-bit
// activations) serves; above this, panels of the delta are unpacked for a cuBLASLt GEMM. With f32
// activations a delta GEMV serves fewer than kDeltaPanelMinRows rows. On an H200 the CUDA-core
// GEMV took 108 ms a step for 16 rows of each of 4 tenants (Llama-3-8B shape, 4-bit deltas) and
// panels 59 ms for 64 rows of one; both are far from reading the delta once.
constexpr int64_t kDeltaMmaMaxRows = 64;
// Tiles of the tensor-core delta product that may split their columns (counters, zeroed once);
// the split partial products use the panel product's f32 scratch (delta_out).
constexpr int64_t kDeltaSplitCounters = 1024;
// With f32 activations (no tensor-core product): rows a delta GEMV serves, below panels.
constexpr int64_t kDeltaPanelMinRows = 32;
// Panel scratch: at most this many bytes of unpacked delta, and at most this many gathered rows.
constexpr int64_t kDeltaPanelBytes = 32 << 20;
constexpr int64_t kDeltaChunkRows = 1024;

}  // namespace

struct GpuModelRunner::Impl {
  ModelConfig c;
  GpuRunnerOptions o;
  gpu::ActType act = gpu::ActType::kBF16;
  int64_t eb = 2;
  int64_t H = 0, D = 0, nh = 0, nkv = 0, qd = 0, kvd = 0, qkv_w = 0, I = 0, V = 0;
  int64_t tile_tokens = 1;
  // The tensor-core attention kernel is on and runs on this device: steps that prefill (a tile
  // of two or more tokens) plan tiles of mma_tile_tokens and take it.
  bool mma_prefill = false;
  int64_t mma_tile_tokens = 1;
  // What Prepare planned for this step.
  int64_t step_tile_tokens = 1;
  bool step_mma = false;
  int sms = 1;

  DeviceBuffer pool;
  size_t used = 0;
  std::unique_ptr<CublasLtGemm> gemm;
  std::unique_ptr<CudaStream> compute, copy;
  cudaEvent_t inputs_ready = nullptr, outputs_ready = nullptr;
  // Timing events around a step's device work (after its inputs, before its results' copy).
  cudaEvent_t step_begin = nullptr, step_end = nullptr;
  float last_step_ms = 0;

  void* embed = nullptr;
  void* lm_head = nullptr;
  float* final_norm = nullptr;
  float* inv_freq = nullptr;
  std::vector<LayerDev> layers;
  std::vector<void*> kc, vc;

  // Inputs: one region, the same layout on the host (pinned) and the device.
  size_t off_tokens = 0, off_pos = 0, off_seq = 0, off_tiles = 0, off_logit_rows = 0,
         off_tables = 0, off_slots = 0, inputs_bytes = 0;
  PinnedHostBuffer h_inputs_buf;
  char* h_inputs = nullptr;
  char* d_inputs = nullptr;
  // Outputs.
  PinnedHostBuffer h_outputs_buf;
  float* h_logits = nullptr;
  int32_t* h_tokens = nullptr;
  float* h_logprobs = nullptr;
  int32_t* d_out_tokens = nullptr;
  float* d_out_logprobs = nullptr;

  // Scratch.
  float* hidden = nullptr;
  void *normed = nullptr, *qkv = nullptr, *attn = nullptr, *proj = nullptr, *gate_up = nullptr,
       *actb = nullptr, *rows = nullptr;
  float* logits = nullptr;
  float* attn_ws = nullptr;
  int64_t attn_ws_floats = 0;
  uint32_t* attn_counters = nullptr;  // [max_seqs, num_kv_heads], zero between launches
  // Seeded sampling: its workspace (max_seqs x vocab sort buffers, made on first use) and its
  // per-step inputs, staged in pinned memory and copied on the compute stream (both grown as
  // needed). The staging buffer is free again when the step's results have come back.
  DeviceBuffer sample_ws;
  std::array<size_t, 2> sample_ws_need{};  // SampleWorkspaceBytes(S_(), V, without / with sort)
  DeviceBuffer sample_in;
  PinnedHostBuffer sample_staging;

  std::map<int64_t, cudaGraphExec_t> graphs;
  GpuRunnerMemory mem;

  // Fine-tunes: the device region and its bookkeeping (null without delta_bytes), the device
  // copies by DeltaWeights::serial, this step's plan and its segments' copies, and the panel
  // scratch (ApplyDelta).
  char* delta_region = nullptr;
  std::unique_ptr<DeltaResidency> residency;
  // Node-based: seg_devs points into it while later segments of a step are added.
  std::unordered_map<uint64_t, DeltaDev> delta_devs;
  int64_t delta_step = 0;
  DeltaStepPlan plan;
  std::vector<const DeltaDev*> seg_devs;
  size_t off_delta_idx = 0, delta_idx_ints = 0;
  int64_t max_k = 0, panel_rows = 0, chunk_rows = 0;
  void* delta_xs = nullptr;
  void* delta_panel = nullptr;
  float* delta_out = nullptr;
  uint32_t* delta_counters = nullptr;  // [kDeltaSplitCounters], zero between launches

  ~Impl() {
    for (auto& [b, g] : graphs) cudaGraphExecDestroy(g);
    if (inputs_ready) cudaEventDestroy(inputs_ready);
    if (outputs_ready) cudaEventDestroy(outputs_ready);
    if (step_begin) cudaEventDestroy(step_begin);
    if (step_end) cudaEventDestroy(step_end);
  }

  template <typename T = void>
  T* Take(size_t bytes) {
    void* p = static_cast<char*>(pool.data()) + used;
    used += AlignUp(bytes);
    return static_cast<T*>(p);
  }

  int64_t T_() const { return o.max_batch_tokens; }
  int64_t S_() const { return o.max_seqs; }
  int64_t M_() const { return o.max_blocks_per_seq; }

  int32_t* In32(size_t off) const { return reinterpret_cast<int32_t*>(d_inputs + off); }
  int32_t* Host32(size_t off) const { return reinterpret_cast<int32_t*>(h_inputs + off); }

  absl::Status Init(const ModelConfig& config, const GpuRunnerOptions& options);
  int64_t WeightBytes() const;
  void LayOut();
  absl::Status UploadWeights(const ModelWeights& w);
  absl::Status RandomWeights(uint64_t seed);
  absl::Status Prepare(const ForwardBatch& b, int64_t padded, std::vector<int32_t>* tiles);
  absl::Status Run(int64_t n, int64_t num_seqs, int64_t num_tiles, bool tiled, int64_t max_keys,
                   int64_t m, bool gather, bool greedy);
  // The final norm's rows logit_rows[offset, offset + m) (m <= max_seqs) through lm_head, and the
  // greedy choice when asked; gather: pick the rows, else rows 0..m of the batch are the ones.
  absl::Status Head(int64_t offset, int64_t m, bool gather, bool greedy);
  absl::Status Upload();
  absl::Status Download(bool logits_out, int64_t m);
  // Seeded sampling of the m rows of logits into the greedy outputs' places.
  absl::Status Sample(const GpuModelRunner::Sampling& sampling, int64_t m);
  int64_t PartitionsWorkspace(int64_t num_tiles, int64_t tile_tok, int64_t max_keys,
                              gpu::PagedAttentionArgs* a) const;

  // Fine-tunes. PrepareDeltas plans the step's segments, makes their deltas resident (uploading
  // what is not) and stages the row indices with the step's inputs.
  absl::Status PrepareDeltas(const ForwardBatch& b);
  absl::StatusOr<const DeltaDev*> MakeResident(const DeltaWeights& d);
  const int32_t* DeltaIdx(int64_t at) const { return In32(off_delta_idx) + at; }
  // y[rows[i]] += x[rows[i]] · Δᵀ for the `count` rows listed at `rows` (device); x act, y
  // out_type.
  absl::Status ApplyDelta(const PackedDelta& d, const int32_t* rows, int64_t count, const void* x,
                          int64_t ldx, void* y, int64_t ldy, gpu::ActType out_type);
  // Rows of a LoRA B factor of rank `rank` per product: at most panel_rows (delta_out's width), and
  // a multiple of what keeps each panel's start 256-byte aligned.
  int64_t LowRankPanelStep(int64_t rank) const {
    const int64_t q = 256 / std::gcd<int64_t>(rank * eb, 256);
    const int64_t step = panel_rows / q * q;
    return step > 0 ? step : panel_rows;
  }
  // y[rows[i]] += (x[rows[i]] · Aᵀ) · Bᵀ for a LoRA adapter's factors (a no-op for rank 0).
  absl::Status ApplyLowRank(const LowRankDev& lr, const int32_t* rows, int64_t count, const void* x,
                            int64_t ldx, void* y, int64_t ldy, gpu::ActType out_type);
  // Each segment's update (picked by `pick`: its packed delta, then its low-rank part) applied to
  // its rows.
  template <typename Pick>
  absl::Status ApplySegments(Pick pick, const void* x, int64_t ldx, void* y, int64_t ldy);
  // y[rows] += bias (f32 [width]) for each segment whose `pick` is not null; y act, row stride ldy.
  template <typename Pick>
  absl::Status AddBiases(Pick pick, void* y, int64_t width, int64_t ldy);
  // RMSNorm again, over the runs of each segment whose `pick` gives its own weight: out = norm of
  // the f32 residual (already updated) with that weight.
  template <typename Pick>
  absl::Status Renorm(Pick pick, void* out);
  // Per-head RMSNorm (in place) of x's heads with each token's weight: the fine-tune's where
  // `pick` gives one, else `base`; one launch per run of tokens sharing a weight.
  template <typename Pick>
  absl::Status HeadNormRuns(int64_t n, int64_t heads, void* x, const float* base, Pick pick);
};

absl::Status GpuModelRunner::Impl::Init(const ModelConfig& config,
                                        const GpuRunnerOptions& options) {
  c = config;
  o = options;
  RETURN_IF_ERROR(ActTypeOf(o.act, &act));
  eb = gpu::ActBytes(act);
  H = c.hidden_size;
  D = c.head_dim;
  nh = c.num_heads;
  nkv = c.num_kv_heads;
  qd = nh * D;
  kvd = nkv * D;
  qkv_w = qd + 2 * kvd;
  I = c.intermediate_size;
  V = c.vocab_size;
  if (D != 16 && D != 32 && D != 64 && D != 128 && D != 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("gpu runner: head_dim ", D, " unsupported (16, 32, 64, 128 or 256)"));
  }
  if (c.group_size() > gpu::PagedAttentionMaxRows(D)) {
    return absl::InvalidArgumentError(absl::StrCat("gpu runner: GQA group ", c.group_size(),
                                                   " exceeds ", gpu::PagedAttentionMaxRows(D)));
  }
  if (o.num_blocks <= 0 || o.block_tokens <= 0 || o.max_batch_tokens <= 0 || o.max_seqs <= 0 ||
      o.max_blocks_per_seq <= 0) {
    return absl::InvalidArgumentError(
        "gpu runner: num_blocks, block_tokens, max_batch_tokens, max_seqs and max_blocks_per_seq "
        "must be positive");
  }
  if (o.delta_bytes < 0) {
    return absl::InvalidArgumentError("gpu runner: delta_bytes must be >= 0");
  }
  if (o.gemv_max_rows < 0 || o.gemv_max_rows > 8) {
    return absl::InvalidArgumentError(
        "gpu runner: gemv_max_rows must be 0 to 8 (the GEMV kernel's most rows)");
  }
  if (o.decode_attention_max_rows < 0) {
    return absl::InvalidArgumentError("gpu runner: decode_attention_max_rows must be >= 0");
  }
  if (o.gemv_variant < 0 || o.gemv_variant >= gpu::kGemvVariants) {
    return absl::InvalidArgumentError(
        absl::StrCat("gpu runner: gemv_variant must be 0 to ", gpu::kGemvVariants - 1));
  }
  // Row limits act on powers of two: decode graphs run their batch padded to one, so a limit in
  // between would treat a graph step and an eager step of the same batch differently.
  auto floor_pow2 = [](int64_t v) {
    return v < 1 ? int64_t{0} : static_cast<int64_t>(std::bit_floor(static_cast<uint64_t>(v)));
  };
  o.gemv_max_rows = floor_pow2(o.gemv_max_rows);
  o.decode_attention_max_rows = floor_pow2(o.decode_attention_max_rows);
  if (o.max_seqs > o.max_batch_tokens) o.max_seqs = o.max_batch_tokens;
  tile_tokens = AttentionTileTokens(D, c.group_size());
  RETURN_IF_ERROR(CudaDeviceCount().status());
  cudaDeviceProp prop{};
  RETURN_IF_ERROR(CudaStatus(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties"));
  sms = prop.multiProcessorCount;
  mma_prefill = o.prefill_mma_attention && AttentionMmaRunsHere(act, D, c.group_size());
  mma_tile_tokens = AttentionMmaTileTokens(c.group_size());
  ASSIGN_OR_RETURN(gemm, CublasLtGemm::Create());
  gemm->set_small_m_gemv(o.small_m_gemv);
  gemm->set_gemv_max_m(o.gemv_max_rows);
  gemm->set_gemv_variant(o.gemv_variant);
  ASSIGN_OR_RETURN(CudaStream cs, CudaStream::Create());
  compute = std::make_unique<CudaStream>(std::move(cs));
  ASSIGN_OR_RETURN(CudaStream ps, CudaStream::Create());
  copy = std::make_unique<CudaStream>(std::move(ps));
  RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&inputs_ready, cudaEventDisableTiming),
                             "cudaEventCreate"));
  RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&outputs_ready, cudaEventDisableTiming),
                             "cudaEventCreate"));
  RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&step_begin), "cudaEventCreate"));
  RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&step_end), "cudaEventCreate"));

  // Attention split-K workspace: the most any padded decode graph or eager step may use.
  gpu::PagedAttentionArgs probe;
  probe.num_heads = nh;
  probe.num_kv_heads = nkv;
  probe.head_dim = D;
  int64_t ws = 0;
  for (int64_t b = 1; b <= S_(); b *= 2) {
    probe.decode_kernel = o.decode_attention_kernel && b <= o.decode_attention_max_rows;
    ws = std::max(ws, PartitionsWorkspace(b, 1, M_() * o.block_tokens, &probe));
  }
  probe.decode_kernel = o.decode_attention_kernel && S_() <= o.decode_attention_max_rows;
  ws = std::max(ws, PartitionsWorkspace(S_(), 1, M_() * o.block_tokens, &probe));
  attn_ws_floats = std::max<int64_t>(ws, 4 * sms * 16 * (D + 2));

  // Sizes.
  inputs_bytes = 0;
  auto field = [&](size_t bytes) {
    const size_t off = inputs_bytes;
    inputs_bytes += AlignUp(bytes);
    return off;
  };
  off_tokens = field(4 * T_());
  off_pos = field(4 * T_());
  off_seq = field(4 * T_());
  off_tiles = field(8 * T_());
  off_logit_rows = field(4 * T_());
  off_tables = field(4 * S_() * M_());
  off_slots = field(8 * T_());
  if (o.delta_bytes > 0) {
    // A step's fine-tune rows, their token ids and their logit rows: at most 3 per token.
    delta_idx_ints = static_cast<size_t>(3 * T_());
    off_delta_idx = field(4 * delta_idx_ints);
  }

  mem.weight_bytes = WeightBytes();
  mem.kv_cache_bytes = 2 * c.num_layers * o.num_blocks * o.block_tokens * kvd * eb;
  const int64_t Tn = T_(), S = S_();
  mem.scratch_bytes =
      static_cast<int64_t>(AlignUp(4 * Tn * H) + AlignUp(eb * Tn * H) + AlignUp(eb * Tn * qkv_w) +
                           AlignUp(eb * Tn * qd) + AlignUp(eb * Tn * H) + AlignUp(eb * Tn * 2 * I) +
                           AlignUp(eb * Tn * I) + AlignUp(eb * S * H) + AlignUp(4 * S * V) +
                           AlignUp(4 * attn_ws_floats) + AlignUp(4 * S * nkv) + AlignUp(4 * S) * 2 +
                           inputs_bytes + AlignUp(4 * D));
  if (o.delta_bytes > 0) {
    // Panels of unpacked delta rows (at most kDeltaPanelBytes, at most 4096 rows), the gathered
    // rows of x they meet (kDeltaChunkRows at a time) and the f32 product.
    max_k = std::max({H, qd, I});
    const int64_t max_rows = std::max({V, I, qd, H});
    panel_rows = std::clamp<int64_t>(kDeltaPanelBytes / (max_k * eb), 8, 4096);
    panel_rows = std::min(panel_rows, (max_rows + 7) / 8 * 8) / 8 * 8;
    chunk_rows = std::min(Tn, kDeltaChunkRows);
    mem.delta_bytes = static_cast<int64_t>(
        AlignUp(o.delta_bytes) + AlignUp(chunk_rows * max_k * eb) +
        AlignUp(panel_rows * max_k * eb) + AlignUp(4 * chunk_rows * panel_rows) +
        AlignUp(4 * kDeltaSplitCounters));
  }
  const size_t total = static_cast<size_t>(mem.weight_bytes + mem.kv_cache_bytes +
                                           mem.scratch_bytes + mem.delta_bytes) +
                       64 * kAlign * (c.num_layers + 4);
  ASSIGN_OR_RETURN(pool, DeviceBuffer::Allocate(total));
  ASSIGN_OR_RETURN(h_inputs_buf, PinnedHostBuffer::Allocate(inputs_bytes));
  h_inputs = h_inputs_buf.as<char>();
  const size_t out_bytes = AlignUp(4 * S * V) + 2 * AlignUp(4 * S);
  ASSIGN_OR_RETURN(h_outputs_buf, PinnedHostBuffer::Allocate(out_bytes));
  h_logits = h_outputs_buf.as<float>();
  h_tokens = reinterpret_cast<int32_t*>(reinterpret_cast<char*>(h_logits) + AlignUp(4 * S * V));
  h_logprobs = reinterpret_cast<float*>(reinterpret_cast<char*>(h_tokens) + AlignUp(4 * S));
  LayOut();

  std::vector<float> inv(D / 2);
  ComputeRopeInvFreq(D, c.rope_theta, c.rope_scaling, inv.data());
  RETURN_IF_ERROR(CudaStatus(
      cudaMemcpy(inv_freq, inv.data(), 4 * inv.size(), cudaMemcpyHostToDevice), "upload inv_freq"));
  RETURN_IF_ERROR(
      CudaStatus(cudaMemset(attn_counters, 0, 4 * S_() * nkv), "zero attention counters"));
  if (delta_counters != nullptr) {
    RETURN_IF_ERROR(CudaStatus(cudaMemset(delta_counters, 0, 4 * kDeltaSplitCounters),
                               "zero delta split counters"));
  }
  return CudaStatus(cudaDeviceSynchronize(), "upload inv_freq");
}

int64_t GpuModelRunner::Impl::WeightBytes() const {
  int64_t e = V * H * (c.tie_word_embeddings ? 1 : 2);
  int64_t per_layer = qkv_w * H + H * qd + 2 * I * H + H * I;
  if (c.qkv_bias) per_layer += qkv_w;
  if (c.o_bias) per_layer += H;
  int64_t bytes = (e + c.num_layers * per_layer) * eb;
  bytes += 4 * (H + c.num_layers * (2 * H + 2 * D));
  return bytes;
}

void GpuModelRunner::Impl::LayOut() {
  embed = Take(V * H * eb);
  lm_head = c.tie_word_embeddings ? embed : Take(V * H * eb);
  final_norm = Take<float>(4 * H);
  inv_freq = Take<float>(4 * D);
  layers.resize(c.num_layers);
  for (LayerDev& L : layers) {
    L.qkv_w = Take(qkv_w * H * eb);
    if (c.qkv_bias) L.qkv_b = Take(qkv_w * eb);
    L.o_w = Take(H * qd * eb);
    if (c.o_bias) L.o_b = Take(H * eb);
    L.gate_up_w = Take(2 * I * H * eb);
    L.down_w = Take(H * I * eb);
    L.in_norm = Take<float>(4 * H);
    L.post_norm = Take<float>(4 * H);
    if (c.qk_norm) {
      L.q_norm = Take<float>(4 * D);
      L.k_norm = Take<float>(4 * D);
    }
  }
  const int64_t per_layer = o.num_blocks * o.block_tokens * kvd * eb;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    kc.push_back(Take(per_layer));
    vc.push_back(Take(per_layer));
  }
  const int64_t Tn = T_(), S = S_();
  hidden = Take<float>(4 * Tn * H);
  normed = Take(eb * Tn * H);
  qkv = Take(eb * Tn * qkv_w);
  attn = Take(eb * Tn * qd);
  proj = Take(eb * Tn * H);
  gate_up = Take(eb * Tn * 2 * I);
  actb = Take(eb * Tn * I);
  rows = Take(eb * S * H);
  logits = Take<float>(4 * S * V);
  attn_ws = Take<float>(4 * attn_ws_floats);
  attn_counters = Take<uint32_t>(4 * S * nkv);
  d_out_tokens = Take<int32_t>(4 * S);
  d_out_logprobs = Take<float>(4 * S);
  d_inputs = Take<char>(inputs_bytes);
  if (o.delta_bytes > 0) {
    delta_region = Take<char>(o.delta_bytes);
    delta_xs = Take(chunk_rows * max_k * eb);
    delta_panel = Take(panel_rows * max_k * eb);
    delta_out = Take<float>(4 * chunk_rows * panel_rows);
    delta_counters = Take<uint32_t>(4 * kDeltaSplitCounters);
    residency = std::make_unique<DeltaResidency>(o.delta_bytes);
  }
}

absl::Status GpuModelRunner::Impl::UploadWeights(const ModelWeights& w) {
  std::vector<uint8_t> buf;
  auto put = [&](void* dst, const void* src, DType dtype, int64_t n) -> absl::Status {
    if (n == 0) return absl::OkStatus();
    const void* from = src;
    if (dtype == o.act) {
      return CudaStatus(cudaMemcpy(dst, src, n * eb, cudaMemcpyHostToDevice), "upload weights");
    }
    ConvertToAct(src, dtype, n, act, &buf);
    from = buf.data();
    return CudaStatus(cudaMemcpy(dst, from, n * eb, cudaMemcpyHostToDevice), "upload weights");
  };
  auto put_f32 = [&](float* dst, const std::vector<float>& v) -> absl::Status {
    if (v.empty()) return absl::OkStatus();
    return CudaStatus(cudaMemcpy(dst, v.data(), 4 * v.size(), cudaMemcpyHostToDevice),
                      "upload norms");
  };
  auto put_bias = [&](char* dst, const std::vector<float>& v, int64_t n) -> absl::Status {
    if (v.empty()) return CudaStatus(cudaMemset(dst, 0, n * eb), "zero bias");
    return put(dst, v.data(), DType::kF32, n);
  };
  auto matrix = [&](void* dst, const Matrix& m) {
    return put(dst, m.data, m.dtype, m.rows * m.cols);
  };
  RETURN_IF_ERROR(matrix(embed, w.embed));
  if (lm_head != embed) RETURN_IF_ERROR(matrix(lm_head, w.lm_head));
  RETURN_IF_ERROR(put_f32(final_norm, w.final_norm));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = w.layers[l];
    LayerDev& d = layers[l];
    char* qkvw = static_cast<char*>(d.qkv_w);
    RETURN_IF_ERROR(matrix(qkvw, L.q));
    RETURN_IF_ERROR(matrix(qkvw + qd * H * eb, L.k));
    RETURN_IF_ERROR(matrix(qkvw + (qd + kvd) * H * eb, L.v));
    if (d.qkv_b) {
      char* b = static_cast<char*>(d.qkv_b);
      RETURN_IF_ERROR(put_bias(b, L.q_bias, qd));
      RETURN_IF_ERROR(put_bias(b + qd * eb, L.k_bias, kvd));
      RETURN_IF_ERROR(put_bias(b + (qd + kvd) * eb, L.v_bias, kvd));
    }
    RETURN_IF_ERROR(matrix(d.o_w, L.o));
    if (d.o_b) RETURN_IF_ERROR(put_bias(static_cast<char*>(d.o_b), L.o_bias, H));
    char* gu = static_cast<char*>(d.gate_up_w);
    RETURN_IF_ERROR(matrix(gu, L.gate));
    RETURN_IF_ERROR(matrix(gu + I * H * eb, L.up));
    RETURN_IF_ERROR(matrix(d.down_w, L.down));
    RETURN_IF_ERROR(put_f32(d.in_norm, L.input_norm));
    RETURN_IF_ERROR(put_f32(d.post_norm, L.post_attention_norm));
    if (c.qk_norm) {
      RETURN_IF_ERROR(put_f32(d.q_norm, L.q_norm));
      RETURN_IF_ERROR(put_f32(d.k_norm, L.k_norm));
    }
  }
  return absl::OkStatus();
}

absl::Status GpuModelRunner::Impl::RandomWeights(uint64_t seed) {
  cudaStream_t s = compute->get();
  uint64_t tensor = 0;
  auto normal = [&](void* dst, int64_t n) {
    return CudaStatus(
        gpu::LaunchRandomNormal(dst, act, n, 0.0f, 0.02f, seed + 1000003 * ++tensor, s),
        "random weights");
  };
  auto ones = [&](float* dst, int64_t n) {
    return CudaStatus(gpu::LaunchRandomNormal(dst, gpu::ActType::kF32, n, 1.0f, 0.0f, 0, s),
                      "random weights");
  };
  RETURN_IF_ERROR(normal(embed, V * H));
  if (lm_head != embed) RETURN_IF_ERROR(normal(lm_head, V * H));
  RETURN_IF_ERROR(ones(final_norm, H));
  for (LayerDev& d : layers) {
    RETURN_IF_ERROR(normal(d.qkv_w, qkv_w * H));
    if (d.qkv_b) RETURN_IF_ERROR(normal(d.qkv_b, qkv_w));
    RETURN_IF_ERROR(normal(d.o_w, H * qd));
    if (d.o_b) RETURN_IF_ERROR(normal(d.o_b, H));
    RETURN_IF_ERROR(normal(d.gate_up_w, 2 * I * H));
    RETURN_IF_ERROR(normal(d.down_w, H * I));
    RETURN_IF_ERROR(ones(d.in_norm, H));
    RETURN_IF_ERROR(ones(d.post_norm, H));
    if (d.q_norm) {
      RETURN_IF_ERROR(ones(d.q_norm, D));
      RETURN_IF_ERROR(ones(d.k_norm, D));
    }
  }
  return compute->Synchronize();
}

int64_t GpuModelRunner::Impl::PartitionsWorkspace(int64_t num_tiles, int64_t tile_tok,
                                                  int64_t max_keys,
                                                  gpu::PagedAttentionArgs* a) const {
  a->num_tiles = num_tiles;
  a->tile_tokens = tile_tok;
  ChooseAttentionPartitions(max_keys, sms, a);
  return gpu::PagedAttentionWorkspaceFloats(*a);
}

absl::StatusOr<const DeltaDev*> GpuModelRunner::Impl::MakeResident(const DeltaWeights& d) {
  // Resident already (checked and laid out when it was copied): only its last use moves.
  if (auto it = delta_devs.find(d.serial);
      it != delta_devs.end() && residency->resident(d.serial)) {
    RETURN_IF_ERROR(residency->Place(d.serial, 0, delta_step).status());
    return &it->second;
  }
  const auto* arena = d.arena.data();
  auto vec = [&](const std::vector<float>& v, int64_t size, const char* what) -> absl::Status {
    if (!v.empty() && static_cast<int64_t>(v.size()) != size) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: a fine-tune's ", what, " has ", v.size(), " values, not ", size));
    }
    return absl::OkStatus();
  };
  auto mat = [&](const PackedDelta& p, int64_t rows, int64_t cols,
                 const char* what) -> absl::Status {
    if (p.rows == 0) return absl::OkStatus();
    const auto inside = [&](const void* ptr, int64_t bytes) {
      const auto* b = static_cast<const uint8_t*>(ptr);
      return b >= arena && b + bytes <= arena + d.arena.size();
    };
    if (p.rows != rows || p.cols != cols || !ValidatePackedDelta(p).ok() ||
        !inside(p.q, p.rows * p.QBytesPerRow()) ||
        (p.sparse_2_4 && !inside(p.index, p.rows * p.IndexBytesPerRow())) ||
        !inside(p.scale, 4 * p.rows)) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: a fine-tune's ", what, " delta is not a [", rows, ", ", cols,
                       "] packed delta in its arena (loaded for another base?)"));
    }
    return absl::OkStatus();
  };
  auto low_rank_ok = [&](const LowRankDelta& lr, int64_t rows, int64_t cols,
                         const char* what) -> absl::Status {
    if (lr.rank == 0) return absl::OkStatus();
    if (lr.rows != rows || lr.cols != cols || lr.a == nullptr || lr.b == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("forward: a fine-tune's ", what,
                                                     " LoRA part is not [", rows, ", ", cols,
                                                     "] (loaded for another base?)"));
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(mat(d.embed, V, H, "embedding"));
  RETURN_IF_ERROR(mat(d.lm_head, V, H, "lm_head"));
  RETURN_IF_ERROR(vec(d.final_norm, H, "final norm"));
  for (const LayerDelta& L : d.layers) {
    // Each projection's packed and low-rank parts, [rows, cols] as the base's matrix.
    const struct {
      const PackedDelta& packed;
      const LowRankDelta& lora;
      int64_t rows, cols;
      const char* what;
    } projections[] = {
        {L.q, L.lora_q, qd, H, "q_proj"},         {L.k, L.lora_k, kvd, H, "k_proj"},
        {L.v, L.lora_v, kvd, H, "v_proj"},        {L.o, L.lora_o, H, qd, "o_proj"},
        {L.gate, L.lora_gate, I, H, "gate_proj"}, {L.up, L.lora_up, I, H, "up_proj"},
        {L.down, L.lora_down, H, I, "down_proj"},
    };
    for (const auto& p : projections) {
      RETURN_IF_ERROR(mat(p.packed, p.rows, p.cols, p.what));
      RETURN_IF_ERROR(low_rank_ok(p.lora, p.rows, p.cols, p.what));
    }
    RETURN_IF_ERROR(vec(L.input_norm, H, "input norm"));
    RETURN_IF_ERROR(vec(L.post_attention_norm, H, "post-attention norm"));
    RETURN_IF_ERROR(vec(L.q_norm, D, "q_norm"));
    RETURN_IF_ERROR(vec(L.k_norm, D, "k_norm"));
    RETURN_IF_ERROR(vec(L.q_bias, qd, "q bias"));
    RETURN_IF_ERROR(vec(L.k_bias, kvd, "k bias"));
    RETURN_IF_ERROR(vec(L.v_bias, kvd, "v bias"));
    RETURN_IF_ERROR(vec(L.o_bias, H, "o bias"));
  }
  RETURN_IF_ERROR(low_rank_ok(d.lora_embed, H, V, "embedding"));
  RETURN_IF_ERROR(low_rank_ok(d.lora_head, V, H, "lm_head"));
  // A delta's device bytes stay within what DeltaCache reserves for it plus a few hundred bytes
  // (GpuRunnerOptions::delta_bytes).
  const DeltaLayout lay = LayoutOf(d, eb);
  const size_t shift = lay.shift, arena_bytes = lay.arena_bytes, bytes = lay.total;
  ASSIGN_OR_RETURN(DeltaResidency::Placement place,
                   residency->Place(d.serial, static_cast<int64_t>(bytes), delta_step));
  // Copies of deltas evicted to make room are stale now.
  for (auto it = delta_devs.begin(); it != delta_devs.end();) {
    if (residency->resident(it->first) && it->first != d.serial) {
      ++it;
    } else {
      it = delta_devs.erase(it);
    }
  }
  char* base = delta_region + place.offset;
  uint8_t* dev_arena = reinterpret_cast<uint8_t*>(base + shift);
  if (!d.arena.empty() && arena_bytes > 0) {
    RETURN_IF_ERROR(CudaStatus(cudaMemcpy(dev_arena, arena, d.arena.size(), cudaMemcpyHostToDevice),
                               "upload delta"));
  }
  // The vectors, staged in one host buffer laid out as on the device.
  std::vector<uint8_t> staging(bytes - arena_bytes);
  std::map<const std::vector<float>*, const float*> where;
  size_t at = 0;
  for (const std::vector<float>* v : lay.vectors) {
    std::memcpy(staging.data() + at, v->data(), 4 * v->size());
    where[v] = reinterpret_cast<const float*>(base + arena_bytes + at);
    at += Align16(4 * v->size());
  }
  std::map<const LowRankDelta*, LowRankDev> low_rank;
  if (!lay.low_rank.empty()) at = Align256(arena_bytes + at) - arena_bytes;
  for (const LowRankDelta* lr : lay.low_rank) {
    LowRankDev& dev = low_rank[lr];
    dev.rank = lr->rank;
    dev.rows = lr->rows;
    dev.cols = lr->cols;
    // A (the embedding's transposed: [cols (vocab), rank]), and B with the scale folded in, in
    // the activations' type.
    const bool transposed = lr == &d.lora_embed;
    std::vector<float> f(static_cast<size_t>(lr->rank * lr->cols));
    for (int64_t r = 0; r < lr->rank; ++r) {
      for (int64_t c = 0; c < lr->cols; ++c) {
        f[transposed ? c * lr->rank + r : r * lr->cols + c] = lr->A(r, c);
      }
    }
    ConvertForDevice(f.data(), lr->rank * lr->cols, act, staging.data() + at);
    dev.a = base + arena_bytes + at;
    at += Align256(static_cast<size_t>(lr->rank * lr->cols * eb));
    f.resize(static_cast<size_t>(lr->rows * lr->rank));
    for (int64_t i = 0; i < lr->rows; ++i) {
      for (int64_t r = 0; r < lr->rank; ++r) f[i * lr->rank + r] = lr->ScaledB(i, r);
    }
    ConvertForDevice(f.data(), lr->rows * lr->rank, act, staging.data() + at);
    dev.b = base + arena_bytes + at;
    at += Align256(static_cast<size_t>(lr->rows * lr->rank * eb));
  }
  if (!staging.empty()) {
    RETURN_IF_ERROR(CudaStatus(
        cudaMemcpy(base + arena_bytes, staging.data(), staging.size(), cudaMemcpyHostToDevice),
        "upload delta vectors"));
  }
  // A copy from pageable memory may return before it lands, on the legacy stream, which the
  // (non-blocking) compute stream does not wait for.
  RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(nullptr), "upload delta"));
  auto moved = [&](const PackedDelta& p) {
    PackedDelta out = p;
    if (p.rows == 0) return out;
    out.q = dev_arena + (p.q - arena);
    out.index = p.sparse_2_4 ? dev_arena + (p.index - arena) : nullptr;
    out.scale = reinterpret_cast<const float*>(dev_arena +
                                               (reinterpret_cast<const uint8_t*>(p.scale) - arena));
    return out;
  };
  auto placed = [&](const std::vector<float>& v) -> const float* {
    return v.empty() ? nullptr : where.at(&v);
  };
  DeltaDev dev;
  dev.embed = moved(d.embed);
  dev.lm_head = moved(d.lm_head);
  dev.final_norm = placed(d.final_norm);
  auto lowered = [&](const LowRankDelta& lr) {
    return lr.rank > 0 ? low_rank.at(&lr) : LowRankDev{};
  };
  dev.lora_embed_t = lowered(d.lora_embed);
  dev.lora_head = lowered(d.lora_head);
  for (const LayerDelta& L : d.layers) {
    LayerDeltaDev& l = dev.layers.emplace_back();
    l.q = {moved(L.q), lowered(L.lora_q)};
    l.k = {moved(L.k), lowered(L.lora_k)};
    l.v = {moved(L.v), lowered(L.lora_v)};
    l.o = {moved(L.o), lowered(L.lora_o)};
    l.gate = {moved(L.gate), lowered(L.lora_gate)};
    l.up = {moved(L.up), lowered(L.lora_up)};
    l.down = {moved(L.down), lowered(L.lora_down)};
    l.input_norm = placed(L.input_norm);
    l.post_norm = placed(L.post_attention_norm);
    l.q_norm = placed(L.q_norm);
    l.k_norm = placed(L.k_norm);
    l.q_bias = placed(L.q_bias);
    l.k_bias = placed(L.k_bias);
    l.v_bias = placed(L.v_bias);
    l.o_bias = placed(L.o_bias);
  }
  return &(delta_devs[d.serial] = std::move(dev));
}

absl::Status GpuModelRunner::Impl::PrepareDeltas(const ForwardBatch& b) {
  plan = PlanDeltaStep(b.tokens, b.token_seq, b.seq_deltas, b.logit_tokens, S_());
  seg_devs.clear();
  if (plan.empty()) return absl::OkStatus();
  if (residency == nullptr) {
    return absl::FailedPreconditionError(
        "forward: fine-tune deltas need a device delta region (GpuRunnerOptions::delta_bytes)");
  }
  if (plan.indices.size() > delta_idx_ints) {
    return absl::InvalidArgumentError("forward: too many logit rows for the fine-tune indices");
  }
  ++delta_step;
  for (int attempt = 0;; ++attempt) {
    absl::Status placed = absl::OkStatus();
    seg_devs.clear();
    for (const DeltaStepPlan::Segment& seg : plan.segments) {
      absl::StatusOr<const DeltaDev*> dev = MakeResident(*seg.delta);
      if (!dev.ok()) {
        placed = dev.status();
        break;
      }
      seg_devs.push_back(*dev);
    }
    if (placed.ok()) break;
    // The step's deltas may fit together but not in the gaps between those already placed:
    // start again in an empty region, once, if together they fit at all.
    if (!absl::IsResourceExhausted(placed) || attempt > 0) return placed;
    int64_t together = 0;
    for (const DeltaStepPlan::Segment& seg : plan.segments) {
      together += static_cast<int64_t>((LayoutOf(*seg.delta, eb).total + 255) / 256 * 256);
    }
    if (together > residency->capacity()) return placed;
    residency->Clear();
    delta_devs.clear();
  }
  std::memcpy(h_inputs + off_delta_idx, plan.indices.data(), 4 * plan.indices.size());
  return absl::OkStatus();
}

absl::Status GpuModelRunner::Impl::ApplyDelta(const PackedDelta& d, const int32_t* rows,
                                              int64_t count, const void* x, int64_t ldx, void* y,
                                              int64_t ldy, gpu::ActType out_type) {
  if (d.rows == 0 || count == 0) return absl::OkStatus();
  const CudaStreamHandle s = Handle(compute->get());
  const gpu::DeltaView view = ToDeltaView(d);
  // Few rows: the tensor-core product (16-bit activations) or the GEMV (f32).
  const bool mma = act != gpu::ActType::kF32;
  if (count <= (mma ? kDeltaMmaMaxRows : kDeltaPanelMinRows - 1)) {
    gpu::DeltaGemvArgs g;
    g.m = count;
    g.rows = rows;
    g.x = x;
    g.ldx = ldx;
    g.act = act;
    g.delta = view;
    g.y = y;
    g.ldy = ldy;
    g.out_type = out_type;
    if (!mma) return DeltaGemvCuda(g, s);
    g.split_workspace = delta_out;
    g.split_workspace_floats = chunk_rows * panel_rows;
    g.split_counters = delta_counters;
    g.split_counters_count = kDeltaSplitCounters;
    return DeltaMmaCuda(g, s);
  }
  // Many rows: gather them, then per panel of the delta's rows unpack, multiply, add back.
  const int64_t k = d.cols, ob = gpu::ActBytes(out_type);
  for (int64_t c0 = 0; c0 < count; c0 += chunk_rows) {
    const int64_t cn = std::min(chunk_rows, count - c0);
    const gpu::GatherRowsArgs gather{cn, k, x, ldx, rows + c0, delta_xs, k, act};
    RETURN_IF_ERROR(
        CudaStatus(gpu::LaunchGatherRows(gather, compute->get()), "gather_rows launch"));
    for (int64_t j0 = 0; j0 < d.rows; j0 += panel_rows) {
      const int64_t nb = std::min(panel_rows, d.rows - j0);
      gpu::UnpackDeltaArgs u;
      u.delta = view;
      u.num_rows = nb;
      u.row_begin = j0;
      u.out = delta_panel;
      u.ld_out = k;
      u.out_type = act;
      RETURN_IF_ERROR(UnpackDeltaCuda(u, s));
      RETURN_IF_ERROR(gemm->Run(
          {cn, nb, k, delta_xs, k, delta_panel, nullptr, delta_out, nb, act, gpu::ActType::kF32},
          s));
      const gpu::AddRowsArgs add{
          cn, nb, rows + c0, delta_out, nb, static_cast<char*>(y) + j0 * ob, ldy, out_type};
      RETURN_IF_ERROR(AddRowsCuda(add, s));
    }
  }
  return absl::OkStatus();
}

absl::Status GpuModelRunner::Impl::ApplyLowRank(const LowRankDev& lr, const int32_t* rows,
                                                int64_t count, const void* x, int64_t ldx, void* y,
                                                int64_t ldy, gpu::ActType out_type) {
  if (lr.rank == 0 || count == 0) return absl::OkStatus();
  const CudaStreamHandle s = Handle(compute->get());
  const int64_t k = lr.cols, r = lr.rank, n = lr.rows;
  // t = x · Aᵀ into the panel scratch (rounded to the activations' type, as every projection's
  // output is), then per panel of B's rows out = t · Bᵀ in f32, added to the rows of y.
  void* t = delta_panel;
  const int64_t step = LowRankPanelStep(r);
  const int64_t per_chunk = std::min(chunk_rows, panel_rows * max_k / r);
  if (per_chunk < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("forward: a LoRA factor of rank ", r, " exceeds the fine-tune scratch"));
  }
  for (int64_t c0 = 0; c0 < count; c0 += per_chunk) {
    const int64_t cn = std::min(per_chunk, count - c0);
    const gpu::GatherRowsArgs gather{cn, k, x, ldx, rows + c0, delta_xs, k, act};
    RETURN_IF_ERROR(
        CudaStatus(gpu::LaunchGatherRows(gather, compute->get()), "gather_rows launch"));
    RETURN_IF_ERROR(gemm->Run({.m = cn,
                               .n = r,
                               .k = k,
                               .x = delta_xs,
                               .ldx = k,
                               .w = lr.a,
                               .y = t,
                               .ldy = r,
                               .act = act,
                               .out_type = act},
                              s));
    for (int64_t j0 = 0; j0 < n; j0 += step) {
      const int64_t nb = std::min(step, n - j0);
      RETURN_IF_ERROR(gemm->Run({.m = cn,
                                 .n = nb,
                                 .k = r,
                                 .x = t,
                                 .ldx = r,
                                 .w = static_cast<const char*>(lr.b) + j0 * r * eb,
                                 .y = delta_out,
                                 .ldy = nb,
                                 .act = act,
                                 .out_type = gpu::ActType::kF32},
                                s));
      const gpu::AddRowsArgs add{cn,        nb,
                                 rows + c0, delta_out,
                                 nb,        static_cast<char*>(y) + j0 * gpu::ActBytes(out_type),
                                 ldy,       out_type};
      RETURN_IF_ERROR(AddRowsCuda(add, s));
    }
  }
  return absl::OkStatus();
}

template <typename Pick>
absl::Status GpuModelRunner::Impl::ApplySegments(Pick pick, const void* x, int64_t ldx, void* y,
                                                 int64_t ldy) {
  for (size_t i = 0; i < plan.segments.size(); ++i) {
    const DeltaStepPlan::Segment& seg = plan.segments[i];
    const ProjDeltaDev& proj = pick(*seg_devs[i]);
    RETURN_IF_ERROR(
        ApplyDelta(proj.packed, DeltaIdx(seg.rows_at), seg.num_rows, x, ldx, y, ldy, act));
    RETURN_IF_ERROR(
        ApplyLowRank(proj.lora, DeltaIdx(seg.rows_at), seg.num_rows, x, ldx, y, ldy, act));
  }
  return absl::OkStatus();
}

template <typename Pick>
absl::Status GpuModelRunner::Impl::AddBiases(Pick pick, void* y, int64_t width, int64_t ldy) {
  for (size_t i = 0; i < plan.segments.size(); ++i) {
    const float* bias = pick(*seg_devs[i]);
    if (bias == nullptr) continue;
    const DeltaStepPlan::Segment& seg = plan.segments[i];
    const gpu::AddRowsArgs add{seg.num_rows, width, DeltaIdx(seg.rows_at), bias, 0, y, ldy, act};
    RETURN_IF_ERROR(AddRowsCuda(add, Handle(compute->get())));
  }
  return absl::OkStatus();
}

template <typename Pick>
absl::Status GpuModelRunner::Impl::Renorm(Pick pick, void* out) {
  const float eps = static_cast<float>(c.rms_norm_eps);
  for (size_t i = 0; i < plan.segments.size(); ++i) {
    const float* weight = pick(*seg_devs[i]);
    if (weight == nullptr) continue;
    for (const auto& [begin, end] : plan.segments[i].runs) {
      RETURN_IF_ERROR(AddRmsNormCuda({end - begin, H, eps, hidden + int64_t{begin} * H, nullptr, H,
                                      weight, static_cast<char*>(out) + begin * H * eb, H, act},
                                     Handle(compute->get())));
    }
  }
  return absl::OkStatus();
}

template <typename Pick>
absl::Status GpuModelRunner::Impl::HeadNormRuns(int64_t n, int64_t heads, void* x,
                                                const float* base, Pick pick) {
  const float eps = static_cast<float>(c.rms_norm_eps);
  const auto weight_of = [&](int64_t t) {
    const int32_t seg = plan.empty() ? -1 : plan.token_segment[t];
    const float* w = seg < 0 ? nullptr : pick(*seg_devs[seg]);
    return w != nullptr ? w : base;
  };
  for (int64_t t = 0; t < n;) {
    const float* w = weight_of(t);
    int64_t end = t + 1;
    while (end < n && weight_of(end) == w) ++end;
    RETURN_IF_ERROR(HeadRmsNormCuda(
        {end - t, heads, D, eps, static_cast<char*>(x) + t * qkv_w * eb, qkv_w, w, act},
        Handle(compute->get())));
    t = end;
  }
  return absl::OkStatus();
}

absl::Status GpuModelRunner::Impl::Prepare(const ForwardBatch& b, int64_t padded,
                                           std::vector<int32_t>* tiles) {
  const int64_t n = static_cast<int64_t>(b.tokens.size());
  RETURN_IF_ERROR(ValidateForwardBatch(b, V, c.num_layers));
  if (padded > T_()) {
    return absl::InvalidArgumentError(
        absl::StrCat("forward: ", n, " tokens exceed max_batch_tokens ", T_()));
  }
  const int64_t seqs = std::max(b.num_seqs, padded == n ? b.num_seqs : padded);
  if (seqs > S_()) {
    return absl::InvalidArgumentError(
        absl::StrCat("forward: ", b.num_seqs, " sequences exceed max_seqs ", S_()));
  }
  if (b.max_blocks_per_seq > M_()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "forward: max_blocks_per_seq ", b.max_blocks_per_seq, " exceeds the runner's ", M_()));
  }
  const int64_t cache_slots = o.num_blocks * o.block_tokens;
  int32_t* tok = Host32(off_tokens);
  int32_t* pos = Host32(off_pos);
  int32_t* seq = Host32(off_seq);
  int64_t* slots = reinterpret_cast<int64_t*>(h_inputs + off_slots);
  for (int64_t i = 0; i < n; ++i) {
    if (b.token_seq[i] < 0 || b.token_seq[i] >= b.num_seqs) {
      return absl::InvalidArgumentError("forward: token_seq out of range");
    }
    if (b.positions[i] < 0 || b.positions[i] / o.block_tokens >= b.max_blocks_per_seq) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: position ", b.positions[i], " beyond the block table"));
    }
    if (b.slots[i] < 0 || b.slots[i] >= cache_slots) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: slot ", b.slots[i], " outside the cache"));
    }
    tok[i] = b.tokens[i];
    pos[i] = b.positions[i];
    seq[i] = b.token_seq[i];
    slots[i] = b.slots[i];
  }
  for (int64_t i = n; i < padded; ++i) {  // padding rows of a decode graph
    tok[i] = 0;
    pos[i] = 0;
    seq[i] = static_cast<int32_t>(i);
    slots[i] = -1;
  }
  // Block tables, repacked to the runner's row length. Entries a query can reach (blocks up to
  // its position's) must be in the cache; the rest may be anything and read as block 0.
  std::vector<int64_t> reach(b.num_seqs, -1);
  for (int64_t i = 0; i < n; ++i) {
    reach[b.token_seq[i]] =
        std::max<int64_t>(reach[b.token_seq[i]], b.positions[i] / o.block_tokens);
  }
  int32_t* tables = Host32(off_tables);
  std::fill(tables, tables + seqs * M_(), 0);
  for (int64_t s = 0; s < b.num_seqs; ++s) {
    for (int64_t j = 0; j < b.max_blocks_per_seq; ++j) {
      const int32_t blk = b.block_tables[s * b.max_blocks_per_seq + j];
      if (blk >= 0 && blk < o.num_blocks) {
        tables[s * M_() + j] = blk;
      } else if (j <= reach[s]) {
        return absl::InvalidArgumentError(absl::StrCat("forward: block table entry ", blk,
                                                       " of sequence ", s, " outside the cache"));
      }
    }
  }
  RETURN_IF_ERROR(PrepareDeltas(b));
  int32_t* lr = Host32(off_logit_rows);
  std::copy(b.logit_tokens.begin(), b.logit_tokens.end(), lr);
  for (int64_t i = static_cast<int64_t>(b.logit_tokens.size()); i < padded && i < S_(); ++i) {
    lr[i] = static_cast<int32_t>(i);
  }
  step_mma = false;
  step_tile_tokens = 1;
  if (tiles != nullptr) {
    // Steps that only decode keep the CUDA-core kernel's small tiles: a one-token tile would
    // leave all but one of the tensor-core kernel's warps idle.
    for (int64_t i = 1; mma_prefill && !step_mma && i < n; ++i) {
      step_mma = b.token_seq[i] == b.token_seq[i - 1] && b.positions[i] == b.positions[i - 1] + 1;
    }
    step_tile_tokens = step_mma ? mma_tile_tokens : tile_tokens;
    *tiles = PlanAttentionTiles(b.token_seq, b.positions, step_tile_tokens);
    std::memcpy(h_inputs + off_tiles, tiles->data(), 4 * tiles->size());
  }
  return absl::OkStatus();
}

absl::Status GpuModelRunner::Impl::Upload() {
  RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(d_inputs, h_inputs, inputs_bytes, cudaMemcpyHostToDevice, copy->get()),
      "upload inputs"));
  RETURN_IF_ERROR(CudaStatus(cudaEventRecord(inputs_ready, copy->get()), "cudaEventRecord"));
  RETURN_IF_ERROR(
      CudaStatus(cudaStreamWaitEvent(compute->get(), inputs_ready, 0), "cudaStreamWaitEvent"));
  return CudaStatus(cudaEventRecord(step_begin, compute->get()), "cudaEventRecord");
}

absl::Status GpuModelRunner::Impl::Download(bool logits_out, int64_t m) {
  RETURN_IF_ERROR(CudaStatus(cudaEventRecord(step_end, compute->get()), "cudaEventRecord"));
  RETURN_IF_ERROR(CudaStatus(cudaEventRecord(outputs_ready, compute->get()), "cudaEventRecord"));
  RETURN_IF_ERROR(
      CudaStatus(cudaStreamWaitEvent(copy->get(), outputs_ready, 0), "cudaStreamWaitEvent"));
  if (logits_out) {
    RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(h_logits, logits, 4 * m * V, cudaMemcpyDeviceToHost, copy->get()),
        "download logits"));
  } else {
    RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(h_tokens, d_out_tokens, 4 * m, cudaMemcpyDeviceToHost, copy->get()),
        "download tokens"));
    RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(h_logprobs, d_out_logprobs, 4 * m, cudaMemcpyDeviceToHost, copy->get()),
        "download logprobs"));
  }
  RETURN_IF_ERROR(copy->Synchronize());
  float ms = 0;
  if (cudaEventElapsedTime(&ms, step_begin, step_end) == cudaSuccess) last_step_ms = ms;
  return absl::OkStatus();
}

absl::Status GpuModelRunner::Impl::Run(int64_t n, int64_t num_seqs, int64_t num_tiles, bool tiled,
                                       int64_t max_keys, int64_t m, bool gather, bool greedy) {
  const CudaStreamHandle s = Handle(compute->get());
  const float eps = static_cast<float>(c.rms_norm_eps);
  RETURN_IF_ERROR(EmbedCuda({n, H, V, In32(off_tokens), embed, act, hidden}, s));
  // Fine-tunes: their embedding rows' deltas, added to the residual rows of their tokens.
  const bool deltas = !plan.empty();
  for (size_t i = 0; i < plan.segments.size(); ++i) {
    const DeltaStepPlan::Segment& seg = plan.segments[i];
    if (seg_devs[i]->embed.rows == 0) continue;
    gpu::UnpackDeltaArgs u;
    u.delta = ToDeltaView(seg_devs[i]->embed);
    u.num_rows = seg.num_rows;
    u.src_rows = DeltaIdx(seg.ids_at);
    u.dst_rows = DeltaIdx(seg.rows_at);
    u.out = hidden;
    u.ld_out = H;
    u.out_type = gpu::ActType::kF32;
    u.accumulate = true;
    RETURN_IF_ERROR(UnpackDeltaCuda(u, s));
  }
  // LoRA on the embedding: the tokens' rows of Aᵀ, times Bᵀ, added to their residual rows.
  for (size_t i = 0; i < plan.segments.size(); ++i) {
    const DeltaStepPlan::Segment& seg = plan.segments[i];
    const LowRankDev& e = seg_devs[i]->lora_embed_t;
    if (e.rank == 0) continue;
    for (int64_t c0 = 0; c0 < seg.num_rows; c0 += chunk_rows) {
      const int64_t cn = std::min(chunk_rows, seg.num_rows - c0);
      const gpu::GatherRowsArgs gather{cn,       e.rank, e.a, e.rank, DeltaIdx(seg.ids_at) + c0,
                                       delta_xs, e.rank, act};
      RETURN_IF_ERROR(
          CudaStatus(gpu::LaunchGatherRows(gather, compute->get()), "gather_rows launch"));
      // Per panel of B's rows: delta_out holds chunk_rows x panel_rows floats.
      const int64_t step = LowRankPanelStep(e.rank);
      for (int64_t j0 = 0; j0 < H; j0 += step) {
        const int64_t nb = std::min(step, H - j0);
        RETURN_IF_ERROR(gemm->Run({.m = cn,
                                   .n = nb,
                                   .k = e.rank,
                                   .x = delta_xs,
                                   .ldx = e.rank,
                                   .w = static_cast<const char*>(e.b) + j0 * e.rank * eb,
                                   .y = delta_out,
                                   .ldy = nb,
                                   .act = act,
                                   .out_type = gpu::ActType::kF32},
                                  s));
        const gpu::AddRowsArgs add{cn,          nb, DeltaIdx(seg.rows_at) + c0, delta_out, nb,
                                   hidden + j0, H,  gpu::ActType::kF32};
        RETURN_IF_ERROR(AddRowsCuda(add, s));
      }
    }
  }

  gpu::PagedAttentionArgs pa;
  pa.num_tokens = n;
  pa.num_heads = nh;
  pa.num_kv_heads = nkv;
  pa.head_dim = D;
  pa.scale = 1.0f / std::sqrt(static_cast<float>(D));
  pa.sliding_window = c.sliding_window;
  pa.q = qkv;
  pa.q_stride = qkv_w;
  pa.block_tokens = o.block_tokens;
  pa.num_blocks = o.num_blocks;
  pa.token_seq = In32(off_seq);
  pa.token_pos = In32(off_pos);
  pa.block_tables = In32(off_tables);
  pa.num_seqs = num_seqs;
  pa.max_blocks_per_seq = M_();
  pa.out = attn;
  pa.out_stride = qd;
  pa.act = act;
  pa.tiles = tiled ? In32(off_tiles) : nullptr;
  pa.decode_kernel = o.decode_attention_kernel && n <= o.decode_attention_max_rows;
  pa.mma_prefill = tiled && step_mma;
  pa.mma_sync = o.prefill_mma_sync;
  pa.decode_one_block = o.decode_attention_one_block;
  pa.counters = attn_counters;
  const int64_t tile_tok = tiled ? step_tile_tokens : 1;
  int64_t ws = PartitionsWorkspace(num_tiles, tile_tok, max_keys, &pa);
  while (ws > attn_ws_floats && pa.num_partitions > 1) {  // fewer, longer partitions
    pa.num_partitions = (pa.num_partitions + 1) / 2;
    if (pa.num_partitions <= 1) {
      pa.num_partitions = 1;
      pa.partition_keys = 0;
    }
    ws = gpu::PagedAttentionWorkspaceFloats(pa);
  }
  pa.workspace = attn_ws;

  // Decode steps may fold each residual add into the projection before it (o_proj and
  // down_proj accumulate into the f32 residual) and each RMSNorm into the projection after it
  // (qkv and gate_up normalize the residual as they read it): no norm kernels between layers.
  // gate_up then writes silu(gate) * up itself (GemvArgs::silu_pairs): no SiLU-mul kernel either.
  // Up to 4 rows: every GEMV block re-reads the whole residual rows for their norms, which at 8
  // rows costs about as many L2 bytes as the weights.
  // Fine-tunes add their deltas between the projections and the norms: no fused forms.
  const bool fused = o.fused_residual_norm && o.small_m_gemv && n <= 4 && n <= o.gemv_max_rows &&
                     !c.o_bias && H % 8 == 0 && qd % 8 == 0 && I % 8 == 0 && !deltas;
  // A decode GEMV over `x` (or, with `norm`, the residual normalized by it) into `y`; with
  // `silu_pairs`, SiLU-mul of its gate and up halves into y [n, rows / 2].
  auto gemv_args = [&](int64_t rows, int64_t k, const void* x, const float* norm, const void* w,
                       const void* bias, void* y, bool accumulate, bool silu_pairs = false) {
    gpu::GemvArgs g;
    g.m = n;
    g.n = rows;
    g.k = k;
    g.x = norm != nullptr ? static_cast<const void*>(hidden) : x;
    g.ldx = k;
    g.w = w;
    g.bias = bias;
    g.y = y;
    g.ldy = silu_pairs ? rows / 2 : rows;
    g.silu_pairs = silu_pairs;
    g.act = act;
    g.out_type = accumulate ? gpu::ActType::kF32 : act;
    g.norm_weight = norm;
    g.norm_eps = eps;
    g.accumulate = accumulate;
    g.variant = o.gemv_variant;  // the plain accumulating forms (o_proj, down_proj)
    return g;
  };
  auto gemv = [&](auto... args) { return GemvCuda(gemv_args(args...), s); };
  char* q = static_cast<char*>(qkv);
  // The fused form also folds RoPE and the KV cache write into the q/k/v GEMV, unless per-head
  // norms (Qwen3's) come between the projection and the rotation; so does gemv_rope for any step
  // whose q/k/v projection is the GEMV's.
  const bool qkv_gemv = o.gemv_routes.qkv && gemm->RoutesToGemv(n, H) && H % 8 == 0 && !deltas;
  const bool fused_rope = (fused || (o.gemv_rope && qkv_gemv)) && !c.qk_norm;
  const int64_t* d_slots = reinterpret_cast<const int64_t*>(d_inputs + off_slots);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerDev& L = layers[l];
    if (!fused) {
      RETURN_IF_ERROR(AddRmsNormCuda(
          {n, H, eps, hidden, l == 0 ? nullptr : proj, H, L.in_norm, normed, H, act}, s));
      if (deltas) {
        RETURN_IF_ERROR(Renorm([l](const DeltaDev& d) { return d.layers[l].input_norm; }, normed));
      }
    }
    if (fused_rope) {
      gpu::GemvArgs g = fused
                            ? gemv_args(qkv_w, H, nullptr, L.in_norm, L.qkv_w, L.qkv_b, qkv, false)
                            : gemv_args(qkv_w, H, normed, nullptr, L.qkv_w, L.qkv_b, qkv, false);
      g.rope_heads = nh;
      g.kv_heads = nkv;
      g.head_dim = D;
      g.positions = In32(off_pos);
      g.inv_freq = inv_freq;
      g.slots = d_slots;
      g.cache_slots = o.num_blocks * o.block_tokens;
      g.k_cache = kc[l];
      g.v_cache = vc[l];
      RETURN_IF_ERROR(GemvCuda(g, s));
    } else if (fused) {
      RETURN_IF_ERROR(gemv(qkv_w, H, nullptr, L.in_norm, L.qkv_w, L.qkv_b, qkv, false));
    } else {
      RETURN_IF_ERROR(gemm->Run({.m = n,
                                 .n = qkv_w,
                                 .k = H,
                                 .x = normed,
                                 .w = L.qkv_w,
                                 .bias = L.qkv_b,
                                 .y = qkv,
                                 .act = act,
                                 .out_type = act,
                                 .allow_gemv = o.gemv_routes.qkv},
                                s));
    }
    if (deltas) {
      RETURN_IF_ERROR(
          ApplySegments([l](const DeltaDev& d) { return d.layers[l].q; }, normed, H, q, qkv_w));
      RETURN_IF_ERROR(ApplySegments([l](const DeltaDev& d) { return d.layers[l].k; }, normed, H,
                                    q + qd * eb, qkv_w));
      RETURN_IF_ERROR(ApplySegments([l](const DeltaDev& d) { return d.layers[l].v; }, normed, H,
                                    q + (qd + kvd) * eb, qkv_w));
      RETURN_IF_ERROR(
          AddBiases([l](const DeltaDev& d) { return d.layers[l].q_bias; }, q, qd, qkv_w));
      RETURN_IF_ERROR(AddBiases([l](const DeltaDev& d) { return d.layers[l].k_bias; }, q + qd * eb,
                                kvd, qkv_w));
      RETURN_IF_ERROR(AddBiases([l](const DeltaDev& d) { return d.layers[l].v_bias; },
                                q + (qd + kvd) * eb, kvd, qkv_w));
    }
    if (c.qk_norm) {
      RETURN_IF_ERROR(
          HeadNormRuns(n, nh, q, L.q_norm, [l](const DeltaDev& d) { return d.layers[l].q_norm; }));
      RETURN_IF_ERROR(HeadNormRuns(n, nkv, q + qd * eb, L.k_norm,
                                   [l](const DeltaDev& d) { return d.layers[l].k_norm; }));
    }
    if (!fused_rope) {
      const gpu::RopeArgs rope{n,     nh,          nkv,   D,  In32(off_pos), inv_freq, q,
                               qkv_w, q + qd * eb, qkv_w, act};
      gpu::WriteKvArgs wk;
      wk.num_tokens = n;
      wk.num_kv_heads = nkv;
      wk.head_dim = D;
      wk.block_tokens = o.block_tokens;
      wk.num_blocks = o.num_blocks;
      wk.k = q + qd * eb;
      wk.k_stride = qkv_w;
      wk.v = q + (qd + kvd) * eb;
      wk.v_stride = qkv_w;
      wk.slots = d_slots;
      wk.k_cache = kc[l];
      wk.v_cache = vc[l];
      wk.act = act;
      RETURN_IF_ERROR(RopeWriteKvCuda(rope, wk, s));
    }
    pa.k_cache = kc[l];
    pa.v_cache = vc[l];
    RETURN_IF_ERROR(PagedAttentionCuda(pa, s));
    if (fused) {
      RETURN_IF_ERROR(gemv(H, qd, attn, nullptr, L.o_w, nullptr, hidden, true));
      RETURN_IF_ERROR(gemv(2 * I, H, nullptr, L.post_norm, L.gate_up_w, nullptr, actb, false,
                           /*silu_pairs=*/true));
    } else {
      RETURN_IF_ERROR(gemm->Run({.m = n,
                                 .n = H,
                                 .k = qd,
                                 .x = attn,
                                 .w = L.o_w,
                                 .bias = L.o_b,
                                 .y = proj,
                                 .act = act,
                                 .out_type = act,
                                 .gemv_l2_prefetch = o.gemv_prefetch_o_proj,
                                 .allow_gemv = o.gemv_routes.o_proj},
                                s));
      if (deltas) {
        RETURN_IF_ERROR(
            ApplySegments([l](const DeltaDev& d) { return d.layers[l].o; }, attn, qd, proj, H));
        RETURN_IF_ERROR(
            AddBiases([l](const DeltaDev& d) { return d.layers[l].o_bias; }, proj, H, H));
      }
      RETURN_IF_ERROR(AddRmsNormCuda({n, H, eps, hidden, proj, H, L.post_norm, normed, H, act}, s));
      if (deltas) {
        RETURN_IF_ERROR(Renorm([l](const DeltaDev& d) { return d.layers[l].post_norm; }, normed));
      }
      RETURN_IF_ERROR(gemm->Run({.m = n,
                                 .n = 2 * I,
                                 .k = H,
                                 .x = normed,
                                 .w = L.gate_up_w,
                                 .y = gate_up,
                                 .act = act,
                                 .out_type = act,
                                 .allow_gemv = o.gemv_routes.gate_up},
                                s));
      if (deltas) {
        char* gu = static_cast<char*>(gate_up);
        RETURN_IF_ERROR(ApplySegments([l](const DeltaDev& d) { return d.layers[l].gate; }, normed,
                                      H, gu, 2 * I));
        RETURN_IF_ERROR(ApplySegments([l](const DeltaDev& d) { return d.layers[l].up; }, normed, H,
                                      gu + I * eb, 2 * I));
      }
      RETURN_IF_ERROR(SiluMulCuda({n, I, gate_up, actb, act}, s));
    }
    if (fused) {
      RETURN_IF_ERROR(gemv(H, I, actb, nullptr, L.down_w, nullptr, hidden, true));
    } else {
      RETURN_IF_ERROR(gemm->Run({.m = n,
                                 .n = H,
                                 .k = I,
                                 .x = actb,
                                 .w = L.down_w,
                                 .y = proj,
                                 .act = act,
                                 .out_type = act,
                                 .gemv_long_rows = o.gemv_routes.down},
                                s));
      if (deltas) {
        RETURN_IF_ERROR(
            ApplySegments([l](const DeltaDev& d) { return d.layers[l].down; }, actb, I, proj, H));
      }
    }
  }
  // The final norm (the residual is complete already when fused).
  RETURN_IF_ERROR(AddRmsNormCuda(
      {n, H, eps, hidden, fused ? nullptr : proj, H, final_norm, normed, H, act}, s));
  if (deltas) RETURN_IF_ERROR(Renorm([](const DeltaDev& d) { return d.final_norm; }, normed));
  return Head(0, m, gather, greedy);
}

absl::Status GpuModelRunner::Impl::Head(int64_t offset, int64_t m, bool gather, bool greedy) {
  if (m == 0) return absl::OkStatus();
  const CudaStreamHandle s = Handle(compute->get());
  const void* x = normed;
  if (gather) {
    gpu::GatherRowsArgs g{m, H, normed, H, In32(off_logit_rows) + offset, rows, H, act};
    RETURN_IF_ERROR(CudaStatus(gpu::LaunchGatherRows(g, compute->get()), "gather_rows launch"));
    x = rows;
  }
  RETURN_IF_ERROR(gemm->Run({.m = m,
                             .n = V,
                             .k = H,
                             .x = x,
                             .w = lm_head,
                             .y = logits,
                             .act = act,
                             .out_type = gpu::ActType::kF32,
                             .allow_gemv = o.gemv_routes.lm_head},
                            s));
  // Fine-tunes' LM head deltas (the embedding's with tied embeddings) for their logit rows here.
  for (size_t i = 0; i < plan.segments.size(); ++i) {
    const DeltaStepPlan::Segment& seg = plan.segments[i];
    const auto [first, count] = DeltaStepPlan::LogitRange(seg, offset, m);
    if (count == 0) continue;
    if (!gather) return absl::InternalError("gpu runner: fine-tune logits need gathered rows");
    const PackedDelta& head = lm_head == embed ? seg_devs[i]->embed : seg_devs[i]->lm_head;
    RETURN_IF_ERROR(ApplyDelta(head, DeltaIdx(seg.logits_at + first), count, x, H, logits, V,
                               gpu::ActType::kF32));
    RETURN_IF_ERROR(ApplyLowRank(seg_devs[i]->lora_head, DeltaIdx(seg.logits_at + first), count, x,
                                 H, logits, V, gpu::ActType::kF32));
  }
  if (greedy) {
    RETURN_IF_ERROR(
        ArgmaxCuda({m, V, logits, V, gpu::ActType::kF32, d_out_tokens, d_out_logprobs}, s));
  }
  return absl::OkStatus();
}

absl::Status GpuModelRunner::Impl::Sample(const GpuModelRunner::Sampling& sp, int64_t m) {
  // One upload of every input: rows, then the int32 lists, each at an aligned offset, written
  // straight into the pinned staging buffer.
  const std::pair<const void*, size_t> parts[] = {
      {sp.rows.data(), sizeof(gpu::SampleRow) * sp.rows.size()},
      {sp.pen_offsets.data(), 4 * sp.pen_offsets.size()},
      {sp.pen_tokens.data(), 4 * sp.pen_tokens.size()},
      {sp.pen_counts.data(), 4 * sp.pen_counts.size()},
      {sp.ban_offsets.data(), 4 * sp.ban_offsets.size()},
      {sp.ban_tokens.data(), 4 * sp.ban_tokens.size()}};
  size_t at[std::size(parts)], total = 0;
  for (size_t i = 0; i < std::size(parts); ++i) {
    at[i] = total;
    total += AlignUp(parts[i].second);
  }
  const size_t rows_at = at[0], po = at[1], pt = at[2], pc = at[3], bo = at[4], bt = at[5];
  if (sample_in.bytes() < total || sample_staging.bytes() < total) {
    RETURN_IF_ERROR(compute->Synchronize());  // the old buffers may still be read
    const size_t bytes = std::max(total, sample_in.bytes() * 2);
    ASSIGN_OR_RETURN(DeviceBuffer in, DeviceBuffer::Allocate(bytes));
    ASSIGN_OR_RETURN(PinnedHostBuffer staging, PinnedHostBuffer::Allocate(bytes));
    sample_in = std::move(in);  // both or neither
    sample_staging = std::move(staging);
  }
  // The last step's copy out of the staging buffer finished before its results came back.
  for (size_t i = 0; i < std::size(parts); ++i) {
    if (parts[i].second > 0) {
      std::memcpy(sample_staging.as<char>() + at[i], parts[i].first, parts[i].second);
    }
  }
  // The sort's buffers (about 200 MB at 64 rows of a 128k vocabulary) only once a step needs them:
  // races and greedy rows (the API's defaults) do not.
  const bool sorted_draws =
      std::any_of(sp.rows.begin(), sp.rows.end(),
                  [this](const gpu::SampleRow& r) { return gpu::DrawsSorted(r, V); });
  // Sized once per runner and kind (of the two cub size queries a sorting step would make, the
  // launch's own remains).
  size_t& need = sample_ws_need[sorted_draws];
  if (need == 0) need = gpu::SampleWorkspaceBytes(S_(), V, sorted_draws);
  if (sample_ws.bytes() < need) {
    RETURN_IF_ERROR(compute->Synchronize());  // the old workspace may still be in use
    sample_ws = DeviceBuffer();
    absl::StatusOr<DeviceBuffer> ws = DeviceBuffer::Allocate(need);
    if (!ws.ok()) {
      return absl::Status(ws.status().code(),
                          absl::StrCat("gpu sampler workspace of ", need, " bytes",
                                       sorted_draws ? " (a top-k or top-p draw)" : "", ": ",
                                       ws.status().message()));
    }
    sample_ws = *std::move(ws);
  }
  char* d = static_cast<char*>(sample_in.data());
  RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(d, sample_staging.data(), total, cudaMemcpyHostToDevice, compute->get()),
      "upload sampling inputs"));
  gpu::SampleArgs a;
  a.rows = m;
  a.vocab = V;
  a.logits = logits;
  a.params = reinterpret_cast<const gpu::SampleRow*>(d + rows_at);
  if (!sp.pen_offsets.empty()) {
    a.pen_offsets = reinterpret_cast<const int32_t*>(d + po);
    a.pen_tokens = reinterpret_cast<const int32_t*>(d + pt);
    a.pen_counts = reinterpret_cast<const int32_t*>(d + pc);
  }
  if (!sp.ban_offsets.empty()) {
    a.ban_offsets = reinterpret_cast<const int32_t*>(d + bo);
    a.ban_tokens = reinterpret_cast<const int32_t*>(d + bt);
  }
  a.token = d_out_tokens;
  a.logprob = d_out_logprobs;
  a.workspace = sample_ws.data();
  a.sorted_draws = sorted_draws;
  a.split_rows = o.sampler_split_rows;
  // No wait here: the step's download waits for the compute stream, copy and sampling included.
  return SampleCuda(a, Handle(compute->get()));
}

GpuModelRunner::GpuModelRunner(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuModelRunner::~GpuModelRunner() = default;

absl::StatusOr<std::unique_ptr<GpuModelRunner>> GpuModelRunner::Create(
    const ModelWeights& weights, const GpuRunnerOptions& options) {
  if (weights.world_size != 1) {
    return absl::UnimplementedError("gpu runner: tensor parallelism is not supported yet");
  }
  auto impl = std::make_unique<Impl>();
  RETURN_IF_ERROR(impl->Init(weights.config, options));
  RETURN_IF_ERROR(impl->UploadWeights(weights));
  // Uploads from pageable memory may still be in flight on the legacy stream.
  RETURN_IF_ERROR(CudaStatus(cudaDeviceSynchronize(), "upload weights"));
  return std::unique_ptr<GpuModelRunner>(new GpuModelRunner(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<GpuModelRunner>> GpuModelRunner::CreateRandom(
    const ModelConfig& config, const GpuRunnerOptions& options, uint64_t seed) {
  auto impl = std::make_unique<Impl>();
  RETURN_IF_ERROR(impl->Init(config, options));
  RETURN_IF_ERROR(impl->RandomWeights(seed));
  return std::unique_ptr<GpuModelRunner>(new GpuModelRunner(std::move(impl)));
}

const ModelConfig& GpuModelRunner::config() const { return impl_->c; }
GpuRunnerMemory GpuModelRunner::memory() const { return impl_->mem; }
GpuDeltaStats GpuModelRunner::delta_stats() const {
  GpuDeltaStats st;
  if (const DeltaResidency* r = impl_->residency.get(); r != nullptr) {
    st.capacity_bytes = r->capacity();
    st.resident = r->num_resident();
    st.bytes_used = r->used_bytes();
    st.uploads = r->uploads();
    st.evictions = r->evictions();
  }
  return st;
}
std::vector<void*> GpuModelRunner::KvSegments() const {
  std::vector<void*> out;
  for (size_t l = 0; l < impl_->kc.size(); ++l) {
    out.push_back(impl_->kc[l]);
    out.push_back(impl_->vc[l]);
  }
  return out;
}
double GpuModelRunner::last_step_device_ms() const { return impl_->last_step_ms; }
int64_t GpuModelRunner::graphs_captured() const {
  return static_cast<int64_t>(impl_->graphs.size());
}

absl::Status GpuModelRunner::Forward(const ForwardBatch& b, absl::Span<float> logits) {
  const int64_t m = static_cast<int64_t>(b.logit_tokens.size());
  if (static_cast<int64_t>(logits.size()) != m * impl_->V) {
    return absl::InvalidArgumentError("forward: logits buffer has the wrong size");
  }
  if (b.tokens.empty()) return absl::OkStatus();
  return Step(b, /*greedy=*/false, nullptr, logits.data(), nullptr, nullptr);
}

absl::Status GpuModelRunner::ForwardGreedy(const ForwardBatch& b, absl::Span<int32_t> tokens,
                                           absl::Span<float> logprobs) {
  const int64_t m = static_cast<int64_t>(b.logit_tokens.size());
  if (static_cast<int64_t>(tokens.size()) != m ||
      (!logprobs.empty() && static_cast<int64_t>(logprobs.size()) != m)) {
    return absl::InvalidArgumentError("forward: tokens or logprobs has the wrong size");
  }
  if (b.tokens.empty()) return absl::OkStatus();
  return Step(b, /*greedy=*/true, nullptr, nullptr, tokens.data(),
              logprobs.empty() ? nullptr : logprobs.data());
}

absl::Status GpuModelRunner::ForwardSample(const ForwardBatch& b, const Sampling& sampling,
                                           absl::Span<int32_t> tokens, absl::Span<float> logprobs) {
  const int64_t m = static_cast<int64_t>(b.logit_tokens.size());
  if (static_cast<int64_t>(tokens.size()) != m ||
      (!logprobs.empty() && static_cast<int64_t>(logprobs.size()) != m)) {
    return absl::InvalidArgumentError("forward: tokens or logprobs has the wrong size");
  }
  if (static_cast<int64_t>(sampling.rows.size()) != m) {
    return absl::InvalidArgumentError("forward: one sampling row per logit token");
  }
  if (m > impl_->S_()) {
    return absl::InvalidArgumentError(
        absl::StrCat("forward: ", m, " sampled rows exceed max_seqs ", impl_->S_()));
  }
  auto csr_ok = [m](absl::Span<const int32_t> offsets, size_t entries) {
    if (offsets.empty()) return entries == 0;
    if (static_cast<int64_t>(offsets.size()) != m + 1 || offsets[0] != 0) return false;
    for (int64_t i = 0; i < m; ++i) {
      if (offsets[i + 1] < offsets[i]) return false;
    }
    return static_cast<size_t>(offsets[m]) == entries;
  };
  if (!csr_ok(sampling.pen_offsets, sampling.pen_tokens.size()) ||
      sampling.pen_counts.size() != sampling.pen_tokens.size()) {
    return absl::InvalidArgumentError("forward: pen_offsets, pen_tokens and pen_counts disagree");
  }
  if (!csr_ok(sampling.ban_offsets, sampling.ban_tokens.size())) {
    return absl::InvalidArgumentError("forward: ban_offsets and ban_tokens disagree");
  }
  const auto& hr = sampling.host_rows;
  if (sampling.host_logits.size() != hr.size() * static_cast<size_t>(impl_->V)) {
    return absl::InvalidArgumentError("forward: host_logits must hold vocab_size per host row");
  }
  for (size_t j = 0; j < hr.size(); ++j) {
    if (hr[j] < 0 || hr[j] >= m || (j > 0 && hr[j] <= hr[j - 1])) {
      return absl::InvalidArgumentError("forward: host_rows must be ascending logit-token indices");
    }
  }
  if (b.tokens.empty()) return absl::OkStatus();
  return Step(b, /*greedy=*/true, &sampling, nullptr, tokens.data(),
              logprobs.empty() ? nullptr : logprobs.data());
}

absl::Status GpuModelRunner::Step(const ForwardBatch& b, bool greedy, const Sampling* sampling,
                                  float* logits_out, int32_t* tokens_out, float* logprobs_out) {
  absl::Status status = RunStep(b, greedy, sampling, logits_out, tokens_out, logprobs_out);
  // A step that downloads results has waited for the compute stream; one that does not (no logit
  // rows: a chunk in the middle of a prompt) or that failed part-way waits here, so that nothing
  // of it is in flight when the call returns (tier copies and the next step's pinned inputs touch
  // what it was writing and reading).
  if (!status.ok() || b.logit_tokens.empty()) {
    absl::Status idle = impl_->compute->Synchronize();
    if (status.ok()) status = idle;
  }
  return status;
}

absl::Status GpuModelRunner::RunStep(const ForwardBatch& b, bool greedy, const Sampling* sampling,
                                     float* logits_out, int32_t* tokens_out, float* logprobs_out) {
  Impl& x = *impl_;
  const int64_t n = static_cast<int64_t>(b.tokens.size());
  const int64_t m = static_cast<int64_t>(b.logit_tokens.size());
  // A decode step (one token per sequence, in sequence order, each giving logits) replays a graph
  // captured for its batch size rounded up to a power of two.
  // Steps with fine-tunes run eagerly: their segments differ from step to step.
  bool decode = x.o.cuda_graphs && n == b.num_seqs && m == n &&
                static_cast<int64_t>(b.token_seq.size()) == n &&
                std::all_of(b.seq_deltas.begin(), b.seq_deltas.end(),
                            [](const DeltaWeights* d) { return d == nullptr; });
  for (int64_t i = 0; decode && i < n; ++i) {
    decode = b.token_seq[i] == i && b.logit_tokens[i] == i;
  }
  int64_t padded = 1;
  while (padded < n) padded *= 2;
  if (padded > x.S_()) decode = false;
  if (decode) {
    RETURN_IF_ERROR(x.Prepare(b, padded, nullptr));
    RETURN_IF_ERROR(x.Upload());
    const int64_t max_keys = x.M_() * x.o.block_tokens;
    auto it = x.graphs.find(padded);
    if (it == x.graphs.end()) {
      // Once uncaptured (creating the GEMM plans), then captured. The graph computes logits and
      // the greedy choice both; a step downloads what it needs.
      RETURN_IF_ERROR(x.Run(padded, padded, padded, false, max_keys, padded, false, true));
      RETURN_IF_ERROR(x.compute->Synchronize());
      cudaGraph_t graph = nullptr;
      RETURN_IF_ERROR(
          CudaStatus(cudaStreamBeginCapture(x.compute->get(), cudaStreamCaptureModeThreadLocal),
                     "cudaStreamBeginCapture"));
      absl::Status run = x.Run(padded, padded, padded, false, max_keys, padded, false, true);
      const cudaError_t end = cudaStreamEndCapture(x.compute->get(), &graph);
      RETURN_IF_ERROR(run);
      RETURN_IF_ERROR(CudaStatus(end, "cudaStreamEndCapture"));
      cudaGraphExec_t exec = nullptr;
      const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
      cudaGraphDestroy(graph);
      RETURN_IF_ERROR(CudaStatus(inst, "cudaGraphInstantiate"));
      it = x.graphs.emplace(padded, exec).first;
    }
    RETURN_IF_ERROR(CudaStatus(cudaGraphLaunch(it->second, x.compute->get()), "cudaGraphLaunch"));
  } else {
    // Tiles group a sequence's consecutive tokens (prompts, chunks); a step where every sequence
    // has one token, such as a decode step with fine-tunes, takes one row per token like a
    // replayed decode step, and so the decode attention kernel (the tiled kernels' one-token tiles
    // leave most rows idle). Then n <= num_seqs <= max_seqs, what the decode kernel's split
    // counters are sized for.
    // (Prepare validates the batch after this; anything out of range takes the tiled path there.)
    bool runs = static_cast<int64_t>(b.token_seq.size()) != n;
    std::vector<bool> seen(std::clamp<int64_t>(b.num_seqs, 0, x.S_()), false);
    for (int64_t i = 0; !runs && i < n; ++i) {
      const int64_t s = b.token_seq[i];
      runs = s < 0 || s >= static_cast<int64_t>(seen.size()) || seen[s];
      if (!runs) seen[s] = true;
    }
    std::vector<int32_t> tiles;
    RETURN_IF_ERROR(x.Prepare(b, n, runs ? &tiles : nullptr));
    int64_t max_keys = 0;
    for (int32_t p : b.positions) max_keys = std::max<int64_t>(max_keys, p + 1);
    RETURN_IF_ERROR(x.Upload());
    const int64_t num_tiles = runs ? static_cast<int64_t>(tiles.size() / 2) : n;
    RETURN_IF_ERROR(
        x.Run(n, b.num_seqs, num_tiles, runs, max_keys, std::min(m, x.S_()), true, greedy));
  }
  if (sampling != nullptr) {
    // Rows the caller samples itself: their logits go to the pinned output buffer before the
    // sampler modifies them in place (same stream), and arrive with the step's download.
    for (size_t j = 0; j < sampling->host_rows.size(); ++j) {
      RETURN_IF_ERROR(
          CudaStatus(cudaMemcpyAsync(x.h_logits + j * x.V, x.logits + sampling->host_rows[j] * x.V,
                                     4 * x.V, cudaMemcpyDeviceToHost, x.compute->get()),
                     "download host rows' logits"));
    }
    RETURN_IF_ERROR(x.Sample(*sampling, m));
  }
  // Results come back max_seqs rows at a time (more rows only for prompt log-probabilities).
  for (int64_t offset = 0; offset < m; offset += x.S_()) {
    const int64_t rows = std::min(m - offset, x.S_());
    if (offset > 0) RETURN_IF_ERROR(x.Head(offset, rows, /*gather=*/true, greedy));
    RETURN_IF_ERROR(x.Download(!greedy, rows));
    if (greedy) {
      std::memcpy(tokens_out + offset, x.h_tokens, 4 * rows);
      if (logprobs_out != nullptr) std::memcpy(logprobs_out + offset, x.h_logprobs, 4 * rows);
    } else {
      std::memcpy(logits_out + offset * x.V, x.h_logits, 4 * rows * x.V);
    }
  }
  if (sampling != nullptr && !sampling->host_rows.empty()) {
    std::memcpy(sampling->host_logits.data(), x.h_logits,
                4 * sampling->host_rows.size() * static_cast<size_t>(x.V));
  }
  return absl::OkStatus();
}

}  // namespace strata

#else  // !STRATA_HAVE_CUDA: every entry point says so.

#include "absl/status/status.h"

namespace strata {

struct GpuModelRunner::Impl {};

namespace {
absl::Status NoCuda() { return absl::UnavailableError("gpu runner: this build has no CUDA"); }
}  // namespace

GpuModelRunner::GpuModelRunner(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuModelRunner::~GpuModelRunner() = default;
absl::StatusOr<std::unique_ptr<GpuModelRunner>> GpuModelRunner::Create(const ModelWeights&,
                                                                       const GpuRunnerOptions&) {
  return NoCuda();
}
absl::StatusOr<std::unique_ptr<GpuModelRunner>> GpuModelRunner::CreateRandom(
    const ModelConfig&, const GpuRunnerOptions&, uint64_t) {
  return NoCuda();
}
absl::Status GpuModelRunner::Forward(const ForwardBatch&, absl::Span<float>) { return NoCuda(); }
absl::Status GpuModelRunner::ForwardGreedy(const ForwardBatch&, absl::Span<int32_t>,
                                           absl::Span<float>) {
  return NoCuda();
}
absl::Status GpuModelRunner::ForwardSample(const ForwardBatch&, const Sampling&,
                                           absl::Span<int32_t>, absl::Span<float>) {
  return NoCuda();
}
absl::Status GpuModelRunner::Step(const ForwardBatch&, bool, const Sampling*, float*, int32_t*,
                                  float*) {
  return NoCuda();
}
const ModelConfig& GpuModelRunner::config() const {
  static const ModelConfig none;
  return none;
}
GpuRunnerMemory GpuModelRunner::memory() const { return {}; }
GpuDeltaStats GpuModelRunner::delta_stats() const { return {}; }
std::vector<void*> GpuModelRunner::KvSegments() const { return {}; }
double GpuModelRunner::last_step_device_ms() const { return 0; }
int64_t GpuModelRunner::graphs_captured() const { return 0; }

}  // namespace strata

#endif  // STRATA_HAVE_CUDA
