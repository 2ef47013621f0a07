#include "worker/model/model_runner.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "kernels/attention.h"
#include "kernels/delta.h"
#include "kernels/elementwise.h"
#include "kernels/matmul.h"

namespace strata {
namespace {

// A fine-tune's tokens in one step from which ApplyDelta unpacks panels of the delta and multiplies
// them with the BLAS instead of streaming the packed rows past each token (prefill chunks), and
// the rows of a panel.
constexpr int64_t kDeltaPanelMinRows = 128;
constexpr int64_t kDeltaPanelRows = 256;
// Low-rank products up to this many multiply-adds run on the calling thread (RunMatMul).
constexpr int64_t kLowRankDirectMaxMacs = int64_t{1} << 21;
// ForEachSegment shares segments out among the pool's threads when none has more rows than this.
constexpr size_t kSegmentsInParallelMaxRows = 32;
// BlasMatMuls' shares of output columns are multiples of this, and products of fewer columns than
// this per thread run whole on the calling thread.
constexpr int64_t kBlasMinColumns = 64;

template <typename T>
T* Grow(std::vector<T>* v, size_t n) {
  if (v->size() < n) v->resize(n);
  return v->data();
}

// MatMulCpu through the direct kernel, 8 rows at a time, on the calling thread.
absl::Status DirectMatMul(const MatMulParams& p) {
  for (int64_t i = 0; i < p.m; i += kMatMulCpuGemvMaxRows) {
    MatMulParams part = p;
    part.m = std::min(kMatMulCpuGemvMaxRows, p.m - i);
    part.x = p.x + i * p.k;
    part.y = p.y + i * (p.ldy == 0 ? p.n : p.ldy);
    RETURN_IF_ERROR(MatMulCpu(part, nullptr, 0));
  }
  return absl::OkStatus();
}

void EmbedRow(const Matrix& embed, int32_t token, float* out) {
  const int64_t H = embed.cols;
  const uint8_t* row =
      static_cast<const uint8_t*>(embed.data) + token * H * DTypeBytes(embed.dtype);
  if (embed.dtype == DType::kF32) {
    std::memcpy(out, row, H * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < H; ++i) out[i] = ElementAsFloat(row, embed.dtype, i);
}

// The plan rank 0 broadcasts before each step: a header, then the batch's arrays.
constexpr uint32_t kPlanMagic = 0x504c414e;  // "PLAN"
enum PlanKind : uint32_t { kPlanStep = 1, kPlanStop = 2 };

struct PlanHeader {
  uint32_t magic = kPlanMagic;
  uint32_t kind = kPlanStep;
  int64_t num_blocks = 0;
  int64_t block_tokens = 0;
  int64_t num_seqs = 0;
  int64_t max_blocks_per_seq = 0;
  int64_t num_tokens = 0;
  int64_t num_table_entries = 0;
  int64_t num_logit_tokens = 0;
};

template <typename T>
void Append(std::string* out, absl::Span<const T> v) {
  out->append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

void EncodePlan(const ForwardBatch& b, const KvCacheLayers& cache, std::string* out) {
  PlanHeader h;
  h.num_blocks = cache.num_blocks;
  h.block_tokens = cache.block_tokens;
  h.num_seqs = b.num_seqs;
  h.max_blocks_per_seq = b.max_blocks_per_seq;
  h.num_tokens = static_cast<int64_t>(b.tokens.size());
  h.num_table_entries = static_cast<int64_t>(b.block_tables.size());
  h.num_logit_tokens = static_cast<int64_t>(b.logit_tokens.size());
  out->assign(reinterpret_cast<const char*>(&h), sizeof(h));
  Append(out, b.tokens);
  Append(out, b.positions);
  Append(out, b.token_seq);
  Append(out, b.slots);
  Append(out, b.block_tables);
  Append(out, b.logit_tokens);
}

// A decoded plan: the header and the arrays the batch's spans point into.
struct Plan {
  PlanHeader header;
  std::vector<int32_t> tokens, positions, token_seq, block_tables, logit_tokens;
  std::vector<int64_t> slots;
  ForwardBatch batch;
};

absl::Status DecodePlan(const std::string& in, Plan* plan) {
  const auto bad = [] { return absl::InternalError("tensor parallelism: malformed step plan"); };
  if (in.size() < sizeof(PlanHeader)) return bad();
  PlanHeader& h = plan->header;
  std::memcpy(&h, in.data(), sizeof(h));
  if (h.magic != kPlanMagic || (h.kind != kPlanStep && h.kind != kPlanStop)) return bad();
  if (h.kind == kPlanStop) return absl::OkStatus();
  const int64_t limit = static_cast<int64_t>(in.size());
  if (h.num_tokens < 0 || h.num_table_entries < 0 || h.num_logit_tokens < 0 ||
      h.num_tokens > limit || h.num_table_entries > limit || h.num_logit_tokens > limit) {
    return bad();
  }
  const size_t want = sizeof(h) + h.num_tokens * (3 * sizeof(int32_t) + sizeof(int64_t)) +
                      (h.num_table_entries + h.num_logit_tokens) * sizeof(int32_t);
  if (in.size() != want) return bad();
  size_t at = sizeof(h);
  const auto take = [&](auto* v, int64_t count) {
    v->resize(count);
    std::memcpy(v->data(), in.data() + at, count * sizeof((*v)[0]));
    at += count * sizeof((*v)[0]);
  };
  take(&plan->tokens, h.num_tokens);
  take(&plan->positions, h.num_tokens);
  take(&plan->token_seq, h.num_tokens);
  take(&plan->slots, h.num_tokens);
  take(&plan->block_tables, h.num_table_entries);
  take(&plan->logit_tokens, h.num_logit_tokens);
  ForwardBatch& b = plan->batch;
  b.tokens = plan->tokens;
  b.positions = plan->positions;
  b.token_seq = plan->token_seq;
  b.slots = plan->slots;
  b.block_tables = plan->block_tables;
  b.num_seqs = h.num_seqs;
  b.max_blocks_per_seq = h.max_blocks_per_seq;
  b.logit_tokens = plan->logit_tokens;
  return absl::OkStatus();
}

}  // namespace

KvCacheLayers KvCacheLayersIn(const ModelWeights& w, float* memory, int64_t num_blocks,
                              int64_t block_tokens) {
  const int64_t per_layer = num_blocks * block_tokens * w.num_kv_heads * w.config.head_dim;
  KvCacheLayers layers;
  layers.num_blocks = num_blocks;
  layers.block_tokens = block_tokens;
  for (int64_t l = 0; l < w.config.num_layers; ++l) {
    layers.k.push_back(memory + (2 * l) * per_layer);
    layers.v.push_back(memory + (2 * l + 1) * per_layer);
  }
  return layers;
}

absl::StatusOr<std::vector<KvCacheLayers>> GroupKvCaches(const ModelWeights& w, Collectives* comm,
                                                         int64_t num_blocks, int64_t block_tokens) {
  const int64_t per_rank = KvCacheStorage::BlockBytes(w, block_tokens) * num_blocks;
  ASSIGN_OR_RETURN(void* memory, comm->SharedMemory(per_rank * comm->world_size()));
  std::vector<KvCacheLayers> caches;
  for (int r = 0; r < comm->world_size(); ++r) {
    caches.push_back(
        KvCacheLayersIn(w, reinterpret_cast<float*>(static_cast<char*>(memory) + r * per_rank),
                        num_blocks, block_tokens));
  }
  return caches;
}

int64_t KvCacheStorage::BlockBytes(const ModelWeights& w, int64_t block_tokens) {
  return 2 * w.config.num_layers * block_tokens * w.num_kv_heads * w.config.head_dim *
         static_cast<int64_t>(sizeof(float));
}

KvCacheStorage::KvCacheStorage(const ModelWeights& w, int64_t num_blocks, int64_t block_tokens) {
  storage_.assign(static_cast<size_t>(BlockBytes(w, block_tokens) / sizeof(float) * num_blocks),
                  0.0f);
  layers_ = KvCacheLayersIn(w, storage_.data(), num_blocks, block_tokens);
}

ModelRunner::ModelRunner(const ModelWeights* weights, Collectives* comm, int num_threads)
    : w_(weights),
      comm_(comm),
      pool_(std::make_unique<ThreadPool>(
          num_threads > 0 ? num_threads : static_cast<int>(std::thread::hardware_concurrency()))) {
  SetMatMulCpuThreads(1);  // BlasMatMuls splits the BLAS's work over the pool itself
  segment_scratch_.resize(pool_->num_threads());
  const ModelConfig& c = w_->config;
  inv_freq_.resize(c.head_dim / 2);
  ComputeRopeInvFreq(c.head_dim, c.rope_theta, c.rope_scaling, inv_freq_.data());
}

ModelRunner::~ModelRunner() {
  if (absl::Status s = StopFollowers(); !s.ok()) {
    LOG(WARNING) << "stopping the other tensor-parallel ranks: " << s;
  }
}

absl::Status ModelRunner::StopFollowers() {
  if (comm_->world_size() == 1 || comm_->rank() != 0 || followers_stopped_) {
    return absl::OkStatus();
  }
  followers_stopped_ = true;
  PlanHeader h;
  h.kind = kPlanStop;
  plan_.assign(reinterpret_cast<const char*>(&h), sizeof(h));
  return comm_->Broadcast(&plan_);
}

absl::Status ModelRunner::ServeFollower() {
  if (comm_->rank() == 0) {
    return absl::FailedPreconditionError("ServeFollower: rank 0 leads, it does not follow");
  }
  const ModelConfig& c = w_->config;
  Plan plan;
  std::vector<KvCacheLayers> caches;
  std::vector<float> logits;
  std::string message;
  while (true) {
    absl::Status s = comm_->Broadcast(&message);
    if (s.ok()) s = DecodePlan(message, &plan);
    if (s.ok() && plan.header.kind == kPlanStop) return absl::OkStatus();
    if (s.ok() && caches.empty()) {
      absl::StatusOr<std::vector<KvCacheLayers>> mapped =
          GroupKvCaches(*w_, comm_, plan.header.num_blocks, plan.header.block_tokens);
      if (mapped.ok()) {
        caches = *std::move(mapped);
      } else {
        s = mapped.status();
      }
    }
    const KvCacheLayers* cache = caches.empty() ? nullptr : &caches[comm_->rank()];
    if (s.ok() && (cache->num_blocks != plan.header.num_blocks ||
                   cache->block_tokens != plan.header.block_tokens)) {
      s = absl::InternalError("tensor parallelism: the step plan changed the cache's geometry");
    }
    if (s.ok()) s = ValidateForwardBatch(plan.batch, c.vocab_size, c.num_layers);
    if (s.ok()) {
      logits.resize(plan.batch.logit_tokens.size() * c.vocab_size);
      s = ForwardLocal(plan.batch, *cache, absl::MakeSpan(logits));
    }
    if (!s.ok()) {
      comm_->Abort(absl::StrCat("step failed: ", s.message()));
      return s;
    }
  }
}

absl::Status ModelRunner::MatMul(const Matrix& m, const float* x, int64_t rows, float* y,
                                 int64_t ldy, const std::vector<float>& bias) {
  return MatMulGroup(x, rows, {{&m, y, ldy, &bias}});
}

absl::Status ModelRunner::MatMulGroup(const float* x, int64_t rows,
                                      std::initializer_list<Projection> projections) {
  std::vector<MatMulParams> params;
  int64_t total_columns = 0;
  bool direct = pool_->num_threads() > 1 && rows <= kMatMulCpuGemvMaxRows;
  for (const Projection& pr : projections) {
    MatMulParams p;
    p.m = rows;
    p.n = pr.m->rows;
    p.k = pr.m->cols;
    p.x = x;
    p.w = pr.m->data;
    p.w_dtype = pr.m->dtype;
    p.bias = pr.bias == nullptr || pr.bias->empty() ? nullptr : pr.bias->data();
    p.y = pr.y;
    p.ldy = pr.ldy;
    if (MatMulCpuWorkspaceBytes(p) > 0) direct = false;
    total_columns += p.n;
    params.push_back(p);
  }
  if (!direct) return BlasMatMuls(params);
  // Decode-sized: one parallel pass over the output columns of every projection together, so the
  // threads synchronize once for q, k and v (or gate and up) instead of once each.
  return pool_->ParallelForStatus(total_columns, 16, [&](int64_t begin, int64_t end) {
    int64_t offset = 0;
    for (const MatMulParams& p : params) {
      const int64_t b = std::max(begin, offset), e = std::min(end, offset + p.n);
      if (b < e) {
        MatMulParams part = p;
        part.n_begin = b - offset;
        part.n_end = e - offset;
        RETURN_IF_ERROR(MatMulCpu(part, nullptr, 0));
      }
      offset += p.n;
    }
    return absl::OkStatus();
  });
}

absl::Status ValidateForwardBatch(const ForwardBatch& b, int64_t vocab_size, int64_t num_layers) {
  const int64_t n = static_cast<int64_t>(b.tokens.size());
  if (b.positions.size() != b.tokens.size() || b.token_seq.size() != b.tokens.size() ||
      b.slots.size() != b.tokens.size()) {
    return absl::InvalidArgumentError(
        "forward: tokens, positions, token_seq and slots differ in length");
  }
  if (static_cast<int64_t>(b.block_tables.size()) != b.num_seqs * b.max_blocks_per_seq) {
    return absl::InvalidArgumentError("forward: block_tables is not num_seqs x max_blocks_per_seq");
  }
  for (int32_t t : b.tokens) {
    if (t < 0 || t >= vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: token id ", t, " outside the vocabulary"));
    }
  }
  for (int32_t i : b.logit_tokens) {
    if (i < 0 || i >= n) {
      return absl::InvalidArgumentError("forward: logit_tokens index out of range");
    }
  }
  if (!b.seq_deltas.empty() && static_cast<int64_t>(b.seq_deltas.size()) != b.num_seqs) {
    return absl::InvalidArgumentError("forward: seq_deltas is not one entry per sequence");
  }
  for (const DeltaWeights* d : b.seq_deltas) {
    if (d != nullptr && static_cast<int64_t>(d->layers.size()) != num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("forward: a delta of ", d->layers.size(),
                                                     " layers for a model of ", num_layers,
                                                     " (loaded for another base)"));
    }
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::Forward(const ForwardBatch& b, const KvCacheLayers& cache,
                                  absl::Span<float> logits) {
  const ModelConfig& c = w_->config;
  const int64_t n = static_cast<int64_t>(b.tokens.size());
  if (comm_->rank() != 0) {
    return absl::FailedPreconditionError(
        "forward: a tensor-parallel rank other than 0 runs rank 0's steps (ServeFollower)");
  }
  RETURN_IF_ERROR(ValidateForwardBatch(b, c.vocab_size, c.num_layers));
  if (static_cast<int64_t>(logits.size()) !=
      static_cast<int64_t>(b.logit_tokens.size()) * c.vocab_size) {
    return absl::InvalidArgumentError("forward: logits buffer has the wrong size");
  }
  if (static_cast<int64_t>(cache.k.size()) != c.num_layers || cache.v.size() != cache.k.size()) {
    return absl::InvalidArgumentError("forward: the cache has the wrong number of layers");
  }
  if (comm_->world_size() > 1 && std::any_of(b.seq_deltas.begin(), b.seq_deltas.end(),
                                             [](const DeltaWeights* d) { return d != nullptr; })) {
    return absl::FailedPreconditionError(
        "forward: fine-tune deltas run on one tensor-parallel rank only");
  }
  if (n == 0) return absl::OkStatus();
  if (comm_->world_size() == 1) return ForwardLocal(b, cache, logits);
  if (followers_stopped_) {
    return absl::FailedPreconditionError("forward: the other tensor-parallel ranks were stopped");
  }
  EncodePlan(b, cache, &plan_);
  RETURN_IF_ERROR(comm_->Broadcast(&plan_));
  absl::Status s = ForwardLocal(b, cache, logits);
  if (!s.ok()) comm_->Abort(absl::StrCat("rank 0's step failed: ", s.message()));
  return s;
}

void ModelRunner::BuildSegments(const ForwardBatch& b) {
  segments_.clear();
  const int64_t n = static_cast<int64_t>(b.tokens.size());
  token_delta_.assign(n, nullptr);
  if (b.seq_deltas.empty()) return;
  const auto segment = [&](const DeltaWeights* d) -> DeltaSegment& {
    for (DeltaSegment& s : segments_) {
      if (s.delta == d) return s;
    }
    segments_.push_back({d, {}, {}});
    return segments_.back();
  };
  for (int64_t t = 0; t < n; ++t) {
    const int32_t seq = b.token_seq[t];
    const DeltaWeights* d = seq >= 0 && seq < b.num_seqs ? b.seq_deltas[seq] : nullptr;
    token_delta_[t] = d;
    if (d != nullptr) segment(d).rows.push_back(static_cast<int32_t>(t));
  }
  for (size_t i = 0; i < b.logit_tokens.size(); ++i) {
    if (const DeltaWeights* d = token_delta_[b.logit_tokens[i]]; d != nullptr) {
      segment(d).logit_rows.push_back(static_cast<int32_t>(i));
    }
  }
}

absl::Status ModelRunner::ForEachSegment(
    bool logits, absl::FunctionRef<absl::Status(const DeltaSegment&, SegmentWork&)> fn) {
  const int parts = pool_->num_threads();
  const int64_t count = static_cast<int64_t>(segments_.size());
  size_t most = 0;
  for (const DeltaSegment& s : segments_) {
    most = std::max(most, (logits ? s.logit_rows : s.rows).size());
  }
  if (count < 2 || parts == 1 || most > kSegmentsInParallelMaxRows) {
    SegmentWork w{.on_pool = true, .scratch = &segment_scratch_[0]};
    for (const DeltaSegment& s : segments_) RETURN_IF_ERROR(fn(s, w));
    return absl::OkStatus();
  }
  return pool_->ParallelForStatus(parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      SegmentWork w{.on_pool = false, .scratch = &segment_scratch_[part]};
      for (int64_t i = count * part / parts; i < count * (part + 1) / parts; ++i) {
        RETURN_IF_ERROR(fn(segments_[i], w));
      }
    }
    return absl::OkStatus();
  });
}

absl::Status ModelRunner::ApplyDelta(const SegmentWork& w, const PackedDelta& d,
                                     const LowRankDelta& lr, const std::vector<int32_t>& rows,
                                     const float* x, int64_t ldx, float* y, int64_t ldy) {
  RETURN_IF_ERROR(ApplyPackedDelta(w, d, rows, x, ldx, y, ldy));
  return ApplyLowRank(w, lr, rows, x, ldx, y, ldy);
}

absl::Status ModelRunner::RunMatMul(const MatMulParams& p) {
  const size_t ws = MatMulCpuWorkspaceBytes(p);
  // Small products: the direct kernel on this thread (waking the pool's threads costs more than
  // the work; the direct kernel measured slower than the BLAS for prefill-sized ones).
  if (p.m * p.n * p.k <= kLowRankDirectMaxMacs) return DirectMatMul(p);
  if (ws > 0 || p.m > kMatMulCpuGemvMaxRows || pool_->num_threads() == 1) return BlasMatMuls({p});
  return pool_->ParallelForStatus(p.n, 16, [&](int64_t begin, int64_t end) {
    MatMulParams part = p;
    part.n_begin = begin;
    part.n_end = end;
    return MatMulCpu(part, nullptr, 0);
  });
}

absl::Status ModelRunner::BlasMatMuls(absl::Span<const MatMulParams> params) {
  const int parts = pool_->num_threads();
  int64_t total = 0;
  size_t ws = 0;
  for (const MatMulParams& p : params) {
    total += (p.n_end == 0 ? p.n : p.n_end) - p.n_begin;
    ws = std::max(ws, MatMulCpuWorkspaceBytes(p));
  }
  ws = (ws + 63) / 64 * 64;  // each share's workspace on its own cache lines
  if (parts == 1 || total < parts * kBlasMinColumns) {
    for (const MatMulParams& p : params) RETURN_IF_ERROR(MatMulCpu(p, Grow(&workspace_, ws), ws));
    return absl::OkStatus();
  }
  char* workspaces = Grow(&workspace_, ws * parts);
  return pool_->ParallelForStatus(parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t share = begin; share < end; ++share) {
      // Columns [c0, c1) of all the products together, on multiples of kBlasMinColumns.
      const int64_t units = (total + kBlasMinColumns - 1) / kBlasMinColumns;
      const int64_t c0 = units * share / parts * kBlasMinColumns;
      const int64_t c1 = std::min(total, units * (share + 1) / parts * kBlasMinColumns);
      int64_t offset = 0;
      for (const MatMulParams& p : params) {
        const int64_t cols = (p.n_end == 0 ? p.n : p.n_end) - p.n_begin;
        const int64_t b = std::max(c0, offset), e = std::min(c1, offset + cols);
        if (b < e) {
          MatMulParams part = p;
          part.n_begin = p.n_begin + (b - offset);
          part.n_end = p.n_begin + (e - offset);
          RETURN_IF_ERROR(MatMulCpu(part, workspaces + share * ws, ws));
        }
        offset += cols;
      }
    }
    return absl::OkStatus();
  });
}

absl::Status ModelRunner::ApplyLowRank(const SegmentWork& w, const LowRankDelta& lr,
                                       const std::vector<int32_t>& rows, const float* x,
                                       int64_t ldx, float* y, int64_t ldy) {
  if (lr.rank == 0 || rows.empty()) return absl::OkStatus();
  const auto matmul = [&](const MatMulParams& p) {
    return w.on_pool ? RunMatMul(p) : DirectMatMul(p);
  };
  const int64_t m = static_cast<int64_t>(rows.size()), k = lr.cols, r = lr.rank, n = lr.rows;
  // The segment's rows of x: in place when they are consecutive rows of a dense x (one sequence,
  // or a batch of one tenant), else gathered.
  const float* xs = x + int64_t{rows[0]} * ldx;
  if (ldx != k || rows.back() - rows.front() + 1 != m) {
    float* gathered = Grow(&w.scratch->x, m * k);
    for (int64_t i = 0; i < m; ++i) {
      std::memcpy(gathered + i * k, x + int64_t{rows[i]} * ldx, k * sizeof(float));
    }
    xs = gathered;
  }
  // t = scale · x · Aᵀ [m, r], then out = t · Bᵀ [m, n], added to the segment's rows of y.
  float* t = Grow(&w.scratch->t, m * r);
  RETURN_IF_ERROR(
      matmul({.m = m, .n = r, .k = k, .x = xs, .w = lr.a, .w_dtype = lr.dtype, .y = t}));
  for (int64_t i = 0; i < m * r; ++i) t[i] *= lr.scale;
  float* out = Grow(&w.scratch->out, m * n);
  RETURN_IF_ERROR(
      matmul({.m = m, .n = n, .k = r, .x = t, .w = lr.b, .w_dtype = lr.dtype, .y = out}));
  for (int64_t i = 0; i < m; ++i) {
    float* yr = y + int64_t{rows[i]} * ldy;
    const float* o = out + i * n;
    for (int64_t j = 0; j < n; ++j) yr[j] += o[j];
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::ApplyPackedDelta(const SegmentWork& w, const PackedDelta& d,
                                           const std::vector<int32_t>& rows, const float* x,
                                           int64_t ldx, float* y, int64_t ldy) {
  if (d.rows == 0 || rows.empty()) return absl::OkStatus();
  DeltaMatMulParams p;
  p.m = static_cast<int64_t>(rows.size());
  p.rows = rows.data();
  p.x = x;
  p.ldx = ldx;
  p.delta = d;
  p.y = y;
  p.ldy = ldy;
  if (!w.on_pool) return DeltaMatMulCpu(p);  // all columns, on this thread
  if (p.m >= kDeltaPanelMinRows) return ApplyDeltaPanels(d, rows, x, ldx, y, ldy);
  return pool_->ParallelForStatus(d.rows, 16, [&](int64_t begin, int64_t end) {
    DeltaMatMulParams part = p;
    part.n_begin = begin;
    part.n_end = end;
    return DeltaMatMulCpu(part);
  });
}

absl::Status ModelRunner::ApplyDeltaPanels(const PackedDelta& d, const std::vector<int32_t>& rows,
                                           const float* x, int64_t ldx, float* y, int64_t ldy) {
  const int64_t m = static_cast<int64_t>(rows.size()), k = d.cols;
  const int64_t panel_rows = std::min<int64_t>(kDeltaPanelRows, d.rows);
  float* xs = Grow(&delta_x_, m * k);
  float* panel = Grow(&delta_panel_, panel_rows * k);
  float* out = Grow(&delta_out_, m * panel_rows);
  for (int64_t i = 0; i < m; ++i) {
    std::memcpy(xs + i * k, x + int64_t{rows[i]} * ldx, k * sizeof(float));
  }
  for (int64_t j0 = 0; j0 < d.rows; j0 += panel_rows) {
    const int64_t nb = std::min(panel_rows, d.rows - j0);
    RETURN_IF_ERROR(pool_->ParallelForStatus(nb, 8, [&](int64_t begin, int64_t end) {
      return UnpackDeltaCpu(d, j0 + begin, j0 + end, panel + begin * k, /*accumulate=*/false);
    }));
    RETURN_IF_ERROR(BlasMatMuls({{.m = m, .n = nb, .k = k, .x = xs, .w = panel, .y = out}}));
    for (int64_t i = 0; i < m; ++i) {
      float* yr = y + int64_t{rows[i]} * ldy + j0;
      const float* o = out + i * nb;
      for (int64_t j = 0; j < nb; ++j) yr[j] += o[j];
    }
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::NormRows(
    int64_t n, const float* x, const std::vector<float>& weight,
    absl::FunctionRef<const std::vector<float>&(const DeltaWeights&)> replaced, float* out) {
  const int64_t H = w_->config.hidden_size;
  const float eps = static_cast<float>(w_->config.rms_norm_eps);
  if (segments_.empty()) return RmsNormCpu({n, H, eps, x, 0, weight.data(), out, 0});
  // Each token's weights (a fine-tune's replacement, or the base's); one call per run of tokens
  // that share them (a sequence's tokens are contiguous).
  const auto weights_of = [&](int64_t t) {
    const DeltaWeights* d = token_delta_[t];
    if (d == nullptr) return weight.data();
    const std::vector<float>& w = replaced(*d);
    return w.empty() ? weight.data() : w.data();
  };
  for (int64_t t = 0; t < n;) {
    const float* w = weights_of(t);
    int64_t end = t + 1;
    while (end < n && weights_of(end) == w) ++end;
    RETURN_IF_ERROR(RmsNormCpu({end - t, H, eps, x + t * H, 0, w, out + t * H, 0}));
    t = end;
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::ForwardLocal(const ForwardBatch& b, const KvCacheLayers& cache,
                                       absl::Span<float> logits) {
  const ModelConfig& c = w_->config;
  const int64_t n = static_cast<int64_t>(b.tokens.size());
  const int64_t H = c.hidden_size, D = c.head_dim;
  const int64_t qd = w_->num_heads * D, kvd = w_->num_kv_heads * D;
  const int64_t qkv_w = qd + 2 * kvd;
  const int64_t I = w_->intermediate_size;
  float* hidden = Grow(&hidden_, n * H);
  float* normed = Grow(&normed_, n * H);
  float* qkv = Grow(&qkv_, n * qkv_w);
  float* attn = Grow(&attn_, n * qd);
  float* proj = Grow(&proj_, n * H);
  float* gate_up = Grow(&gate_up_, n * 2 * I);
  float* act = Grow(&act_, n * I);

  for (int64_t t = 0; t < n; ++t) EmbedRow(w_->embed, b.tokens[t], hidden + t * H);
  BuildSegments(b);
  for (const DeltaSegment& s : segments_) {
    if (s.delta->embed.rows > 0) {
      for (int32_t t : s.rows) {
        RETURN_IF_ERROR(UnpackDeltaCpu(s.delta->embed, b.tokens[t], b.tokens[t] + 1, hidden + t * H,
                                       /*accumulate=*/true));
      }
    }
    if (const LowRankDelta& e = s.delta->lora_embed; e.rank > 0) {
      // hidden[t] += scale · B · A[:, token]: A's column for the token (scaled), then B's rows.
      float* a = Grow(&segment_scratch_[0].t, e.rank);
      float* o = Grow(&segment_scratch_[0].out, H);
      for (int32_t t : s.rows) {
        for (int64_t r = 0; r < e.rank; ++r) a[r] = e.scale * e.A(r, b.tokens[t]);
        RETURN_IF_ERROR(
            MatMulCpu({.m = 1, .n = H, .k = e.rank, .x = a, .w = e.b, .w_dtype = e.dtype, .y = o},
                      nullptr, 0));
        float* h = hidden + t * H;
        for (int64_t i = 0; i < H; ++i) h[i] += o[i];
      }
    }
  }

  const float eps = static_cast<float>(c.rms_norm_eps);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = w_->layers[l];
    RETURN_IF_ERROR(NormRows(
        n, hidden, L.input_norm,
        [l](const DeltaWeights& d) -> const std::vector<float>& { return d.layers[l].input_norm; },
        normed));
    if (observer_) observer_(l, ProjectionInput::kQkv, normed, n, H);
    // q, k and v side by side in one buffer: [n, qd | kvd | kvd].
    RETURN_IF_ERROR(MatMulGroup(normed, n,
                                {{&L.q, qkv, qkv_w, &L.q_bias},
                                 {&L.k, qkv + qd, qkv_w, &L.k_bias},
                                 {&L.v, qkv + qd + kvd, qkv_w, &L.v_bias}}));
    float* q = qkv;
    float* k = qkv + qd;
    float* v = qkv + qd + kvd;
    RETURN_IF_ERROR(ForEachSegment(false, [&](const DeltaSegment& s, SegmentWork& w) {
      const LayerDelta& LD = s.delta->layers[l];
      RETURN_IF_ERROR(ApplyDelta(w, LD.q, LD.lora_q, s.rows, normed, H, q, qkv_w));
      RETURN_IF_ERROR(ApplyDelta(w, LD.k, LD.lora_k, s.rows, normed, H, k, qkv_w));
      RETURN_IF_ERROR(ApplyDelta(w, LD.v, LD.lora_v, s.rows, normed, H, v, qkv_w));
      for (int32_t t : s.rows) {
        for (size_t i = 0; i < LD.q_bias.size(); ++i) q[t * qkv_w + i] += LD.q_bias[i];
        for (size_t i = 0; i < LD.k_bias.size(); ++i) k[t * qkv_w + i] += LD.k_bias[i];
        for (size_t i = 0; i < LD.v_bias.size(); ++i) v[t * qkv_w + i] += LD.v_bias[i];
      }
      return absl::OkStatus();
    }));
    if (c.qk_norm) {
      for (int64_t t = 0; t < n; ++t) {
        const LayerDelta* LD = token_delta_[t] == nullptr ? nullptr : &token_delta_[t]->layers[l];
        const float* q_norm =
            LD != nullptr && !LD->q_norm.empty() ? LD->q_norm.data() : L.q_norm.data();
        const float* k_norm =
            LD != nullptr && !LD->k_norm.empty() ? LD->k_norm.data() : L.k_norm.data();
        RETURN_IF_ERROR(
            RmsNormCpu({w_->num_heads, D, eps, q + t * qkv_w, D, q_norm, q + t * qkv_w, D}));
        RETURN_IF_ERROR(
            RmsNormCpu({w_->num_kv_heads, D, eps, k + t * qkv_w, D, k_norm, k + t * qkv_w, D}));
      }
    }
    RopeParams rope;
    rope.num_tokens = n;
    rope.num_q_heads = w_->num_heads;
    rope.num_k_heads = w_->num_kv_heads;
    rope.head_dim = D;
    rope.positions = b.positions.data();
    rope.inv_freq = inv_freq_.data();
    rope.q = q;
    rope.q_stride = qkv_w;
    rope.k = k;
    rope.k_stride = qkv_w;
    RETURN_IF_ERROR(RopeCpu(rope));

    WriteKvParams write;
    write.num_tokens = n;
    write.num_kv_heads = w_->num_kv_heads;
    write.head_dim = D;
    write.block_tokens = cache.block_tokens;
    write.num_blocks = cache.num_blocks;
    write.k = k;
    write.k_stride = qkv_w;
    write.v = v;
    write.v_stride = qkv_w;
    write.slots = b.slots.data();
    write.k_cache = cache.k[l];
    write.v_cache = cache.v[l];
    RETURN_IF_ERROR(WriteKvCacheCpu(write));

    PagedAttentionParams pa;
    pa.num_tokens = n;
    pa.num_heads = w_->num_heads;
    pa.num_kv_heads = w_->num_kv_heads;
    pa.head_dim = D;
    pa.scale = 1.0f / std::sqrt(static_cast<float>(D));
    pa.sliding_window = c.sliding_window;
    pa.q = q;
    pa.q_stride = qkv_w;
    pa.k_cache = cache.k[l];
    pa.v_cache = cache.v[l];
    pa.block_tokens = cache.block_tokens;
    pa.num_blocks = cache.num_blocks;
    pa.token_seq = b.token_seq.data();
    pa.token_pos = b.positions.data();
    pa.block_tables = b.block_tables.data();
    pa.num_seqs = b.num_seqs;
    pa.max_blocks_per_seq = b.max_blocks_per_seq;
    pa.out = attn;
    RETURN_IF_ERROR(pool_->ParallelForStatus(n * w_->num_heads, 1, [&](int64_t begin, int64_t end) {
      PagedAttentionParams part = pa;
      part.work_begin = begin;
      part.work_end = end;
      return PagedAttentionCpu(part);
    }));

    if (observer_) observer_(l, ProjectionInput::kO, attn, n, qd);
    RETURN_IF_ERROR(MatMul(L.o, attn, n, proj, H, L.o_bias));
    RETURN_IF_ERROR(ForEachSegment(false, [&](const DeltaSegment& s, SegmentWork& w) {
      const LayerDelta& LD = s.delta->layers[l];
      RETURN_IF_ERROR(ApplyDelta(w, LD.o, LD.lora_o, s.rows, attn, qd, proj, H));
      for (int32_t t : s.rows) {
        for (size_t i = 0; i < LD.o_bias.size(); ++i) proj[t * H + i] += LD.o_bias[i];
      }
      return absl::OkStatus();
    }));
    RETURN_IF_ERROR(comm_->AllReduceSum(proj, n * H));
    for (int64_t i = 0; i < n * H; ++i) hidden[i] += proj[i];

    RETURN_IF_ERROR(NormRows(
        n, hidden, L.post_attention_norm,
        [l](const DeltaWeights& d) -> const std::vector<float>& {
          return d.layers[l].post_attention_norm;
        },
        normed));
    if (observer_) observer_(l, ProjectionInput::kGateUp, normed, n, H);
    RETURN_IF_ERROR(MatMulGroup(
        normed, n, {{&L.gate, gate_up, 2 * I, nullptr}, {&L.up, gate_up + I, 2 * I, nullptr}}));
    RETURN_IF_ERROR(ForEachSegment(false, [&](const DeltaSegment& s, SegmentWork& w) {
      const LayerDelta& LD = s.delta->layers[l];
      RETURN_IF_ERROR(ApplyDelta(w, LD.gate, LD.lora_gate, s.rows, normed, H, gate_up, 2 * I));
      return ApplyDelta(w, LD.up, LD.lora_up, s.rows, normed, H, gate_up + I, 2 * I);
    }));
    RETURN_IF_ERROR(SiluMulCpu({n, I, gate_up, act}));
    if (observer_) observer_(l, ProjectionInput::kDown, act, n, I);
    RETURN_IF_ERROR(MatMul(L.down, act, n, proj, H, {}));
    RETURN_IF_ERROR(ForEachSegment(false, [&](const DeltaSegment& s, SegmentWork& w) {
      const LayerDelta& LD = s.delta->layers[l];
      return ApplyDelta(w, LD.down, LD.lora_down, s.rows, act, I, proj, H);
    }));
    RETURN_IF_ERROR(comm_->AllReduceSum(proj, n * H));
    for (int64_t i = 0; i < n * H; ++i) hidden[i] += proj[i];
  }

  // Final norm and lm_head only for the rows that need logits.
  const int64_t m = static_cast<int64_t>(b.logit_tokens.size());
  if (m == 0) return absl::OkStatus();
  float* rows = Grow(&head_rows_, m * H);
  for (int64_t i = 0; i < m; ++i) {
    const DeltaWeights* d = token_delta_[b.logit_tokens[i]];
    const float* norm =
        d != nullptr && !d->final_norm.empty() ? d->final_norm.data() : w_->final_norm.data();
    RETURN_IF_ERROR(
        RmsNormCpu({1, H, eps, hidden + b.logit_tokens[i] * H, 0, norm, rows + i * H, 0}));
  }
  if (comm_->world_size() == 1) {
    RETURN_IF_ERROR(MatMul(w_->lm_head, rows, m, logits.data(), c.vocab_size, {}));
    // With tied embeddings the embedding's delta is the LM head's.
    const bool tied = w_->lm_head.data == w_->embed.data;
    return ForEachSegment(true, [&](const DeltaSegment& s, SegmentWork& w) {
      const PackedDelta& head = tied ? s.delta->embed : s.delta->lm_head;
      return ApplyDelta(w, head, s.delta->lora_head, s.logit_rows, rows, H, logits.data(),
                        c.vocab_size);
    });
  }
  // Each rank computes its vocabulary rows; gather them, then lay them out per token.
  const int64_t per_rank = (c.vocab_size + comm_->world_size() - 1) / comm_->world_size();
  float* part = Grow(&head_logits_, m * per_rank * (comm_->world_size() + 1));
  std::fill(part, part + m * per_rank, 0.0f);
  RETURN_IF_ERROR(MatMul(w_->lm_head, rows, m, part, per_rank, {}));
  float* gathered = part + m * per_rank;
  RETURN_IF_ERROR(comm_->AllGather(part, m * per_rank, gathered));
  for (int64_t r = 0; r < comm_->world_size(); ++r) {
    const int64_t begin = r * per_rank;
    const int64_t count = std::min(per_rank, c.vocab_size - begin);
    for (int64_t i = 0; i < m && count > 0; ++i) {
      std::memcpy(logits.data() + i * c.vocab_size + begin, gathered + (r * m + i) * per_rank,
                  count * sizeof(float));
    }
  }
  return absl::OkStatus();
}

}  // namespace strata
