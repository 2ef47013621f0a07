#include "worker/model/delta.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/hash.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "worker/model/config.h"

namespace strata {

DeltaWeights::DeltaWeights()
    : serial([] {
        static std::atomic<uint64_t> next{1};
        return next.fetch_add(1, std::memory_order_relaxed);
      }()) {}
namespace {

// BaseFingerprint hashes this many evenly spaced samples of this many bytes from each tensor.
constexpr int64_t kFingerprintSamples = 16;
constexpr int64_t kFingerprintSampleBytes = 4096;
constexpr int64_t kArenaAlign = 64;

float ElementToFloat(const TensorView& t, int64_t i) {
  return ElementAsFloat(t.data.data(), t.dtype, i);
}

// "N.q", "N.index" or "N.scale": a part of a packed matrix N.
bool IsMatrixPart(absl::string_view name) {
  return absl::EndsWith(name, ".q") || absl::EndsWith(name, ".index") ||
         absl::EndsWith(name, ".scale");
}

bool IsFloat(DType t) { return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16; }

std::string Hex64(uint64_t v) { return absl::StrFormat("%016x", v); }

// The data checksum is XXH3-64 over the tensors' own XXH3-64s (little-endian), in file order.
void AppendTensorHash(absl::Span<const uint8_t> data, std::string* out) {
  const uint64_t h =
      Hash64(absl::string_view(reinterpret_cast<const char*>(data.data()), data.size()));
  out->append(reinterpret_cast<const char*>(&h), sizeof(h));
}

// Where a tensor of the base goes in a LayerDelta / DeltaWeights.
struct Slot {
  PackedDelta* matrix = nullptr;  // a weight matrix
  std::vector<float>* vector = nullptr;
  bool bias = false;  // the vector is a bias: stored as fine-tune minus base
  int64_t rows = 0, cols = 0;
};

absl::StatusOr<Slot> FindSlot(DeltaWeights* d, const ModelConfig& c, absl::string_view name) {
  const int64_t H = c.hidden_size, D = c.head_dim, I = c.intermediate_size;
  Slot s;
  if (name == "model.embed_tokens.weight") return Slot{&d->embed, nullptr, false, c.vocab_size, H};
  if (name == "lm_head.weight") return Slot{&d->lm_head, nullptr, false, c.vocab_size, H};
  if (name == "model.norm.weight") return Slot{nullptr, &d->final_norm, false, H, 0};
  absl::string_view rest = name;
  int64_t layer = -1;
  if (absl::ConsumePrefix(&rest, "model.layers.")) {
    const size_t dot = rest.find('.');
    if (dot != absl::string_view::npos && absl::SimpleAtoi(rest.substr(0, dot), &layer) &&
        layer >= 0 && layer < c.num_layers && absl::StrCat(layer) == rest.substr(0, dot)) {
      rest.remove_prefix(dot + 1);
      LayerDelta& L = d->layers[layer];
      const struct {
        absl::string_view suffix;
        Slot slot;
      } table[] = {
          {"self_attn.q_proj.weight", {&L.q, nullptr, false, c.q_dim(), H}},
          {"self_attn.k_proj.weight", {&L.k, nullptr, false, c.kv_dim(), H}},
          {"self_attn.v_proj.weight", {&L.v, nullptr, false, c.kv_dim(), H}},
          {"self_attn.o_proj.weight", {&L.o, nullptr, false, H, c.q_dim()}},
          {"mlp.gate_proj.weight", {&L.gate, nullptr, false, I, H}},
          {"mlp.up_proj.weight", {&L.up, nullptr, false, I, H}},
          {"mlp.down_proj.weight", {&L.down, nullptr, false, H, I}},
          {"input_layernorm.weight", {nullptr, &L.input_norm, false, H, 0}},
          {"post_attention_layernorm.weight", {nullptr, &L.post_attention_norm, false, H, 0}},
          {"self_attn.q_norm.weight", {nullptr, &L.q_norm, false, D, 0}},
          {"self_attn.k_norm.weight", {nullptr, &L.k_norm, false, D, 0}},
          {"self_attn.q_proj.bias", {nullptr, &L.q_bias, true, c.q_dim(), 0}},
          {"self_attn.k_proj.bias", {nullptr, &L.k_bias, true, c.kv_dim(), 0}},
          {"self_attn.v_proj.bias", {nullptr, &L.v_bias, true, c.kv_dim(), 0}},
          {"self_attn.o_proj.bias", {nullptr, &L.o_bias, true, H, 0}},
      };
      for (const auto& entry : table) {
        if (rest != entry.suffix) continue;
        if (!c.qk_norm && (entry.slot.vector == &L.q_norm || entry.slot.vector == &L.k_norm)) {
          break;  // the base has no per-head q/k norm for it to change
        }
        return entry.slot;
      }
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " is not a weight of a ",
                                                 c.architecture_name,
                                                 " decoder that a delta can change"));
}

// The base's f32 values of a vector, for bias differences.
absl::StatusOr<std::vector<float>> BaseVector(const ModelWeights& base, absl::string_view name,
                                              const Slot& slot, const DeltaWeights& d) {
  // Find the layer's base bias by the slot's address within the delta.
  for (size_t l = 0; l < d.layers.size(); ++l) {
    const LayerDelta& L = d.layers[l];
    const LayerWeights& B = base.layers[l];
    if (slot.vector == &L.q_bias) return B.q_bias;
    if (slot.vector == &L.k_bias) return B.k_bias;
    if (slot.vector == &L.v_bias) return B.v_bias;
    if (slot.vector == &L.o_bias) return B.o_bias;
  }
  return absl::InternalError(absl::StrCat("no base vector for ", name));
}

absl::StatusOr<int> ParseBits(const std::map<std::string, std::string>& meta,
                              const std::string& path) {
  auto it = meta.find("bits");
  int bits = 0;
  if (it == meta.end() || !absl::SimpleAtoi(it->second, &bits) ||
      (bits != 2 && bits != 4 && bits != 8)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": metadata field bits must be 2, 4 or 8"));
  }
  return bits;
}

}  // namespace

std::string BaseFingerprint(const SafetensorsModel& model) {
  std::string buffer;
  for (const std::string& name : model.Names()) {
    const TensorView* t = model.Find(name);
    absl::StrAppend(&buffer, name, "|", DTypeName(t->dtype), "|", absl::StrJoin(t->shape, ","), "|",
                    t->data.size(), "|");
    const int64_t size = static_cast<int64_t>(t->data.size());
    const int64_t sample = std::min(size, kFingerprintSampleBytes);
    // Samples from the first to the last page, evenly spaced.
    for (int64_t i = 0; i < kFingerprintSamples && sample > 0; ++i) {
      const int64_t at = (size - sample) * i / (kFingerprintSamples - 1);
      buffer.append(reinterpret_cast<const char*>(t->data.data() + at), sample);
    }
  }
  return Hex64(Hash64(buffer));
}

namespace {

// The header of an open delta file (ReadDeltaFileInfo).
absl::StatusOr<DeltaFileInfo> InfoOf(const SafetensorsFile& file, const std::string& path) {
  const auto& meta = file.metadata();
  const auto field = [&](const std::string& key) -> std::string {
    auto it = meta.find(key);
    return it == meta.end() ? "" : it->second;
  };
  if (field("format") != kDeltaFormat) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": metadata field format is \"", field("format"), "\", not \"",
                     kDeltaFormat, "\" (make delta files with stratactl delta compress)"));
  }
  if (field("format_version") != kDeltaFormatVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": metadata field format_version is \"", field("format_version"),
                     "\"; this build reads version ", kDeltaFormatVersion));
  }
  DeltaFileInfo info;
  info.base_model = field("base_model");
  info.base_fingerprint = field("base_fingerprint");
  if (info.base_fingerprint.size() != 16) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": metadata field base_fingerprint must be 16 hex digits"));
  }
  ASSIGN_OR_RETURN(info.bits, ParseBits(meta, path));
  const std::string sparsity = field("sparsity");
  if (sparsity != "2:4" && sparsity != "none") {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": metadata field sparsity must be \"2:4\" or \"none\""));
  }
  info.sparse_2_4 = sparsity == "2:4";
  if (field("data_xxh3").size() != 16) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": metadata field data_xxh3 must be 16 hex digits"));
  }
  info.data_xxh3 = field("data_xxh3");
  info.num_tensors = static_cast<int64_t>(file.tensors().size());
  for (const TensorView& t : file.tensors()) info.data_bytes += t.data.size();
  return info;
}

}  // namespace

absl::StatusOr<DeltaFileInfo> ReadDeltaFileInfo(const std::string& path) {
  ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::Open(path));
  return InfoOf(file, path);
}

absl::StatusOr<std::unique_ptr<DeltaWeights>> LoadDelta(const std::string& path,
                                                        const ModelWeights& base,
                                                        const std::string& base_fingerprint) {
  if (base.world_size != 1) {
    return absl::FailedPreconditionError(
        "fine-tune deltas are served by workers of one tensor-parallel rank only");
  }
  // One open for the header and the data: a file replaced in between cannot mix the two. Read,
  // not mapped: a file rewritten in place while it loads fails its checksum rather than killing
  // the worker (the load holds the file's bytes twice, briefly).
  ASSIGN_OR_RETURN(SafetensorsFile file,
                   SafetensorsFile::Open(path, SafetensorsFile::Access::kRead));
  ASSIGN_OR_RETURN(DeltaFileInfo info, InfoOf(file, path));
  if (info.base_fingerprint != base_fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": made from a different base model (base_fingerprint ", info.base_fingerprint,
        ", base ", info.base_model, "); the worker's base has fingerprint ", base_fingerprint));
  }
  const ModelConfig& c = base.config;
  auto d = std::make_unique<DeltaWeights>();
  d->path = path;
  d->revision = info.data_xxh3;
  d->bits = info.bits;
  d->sparse_2_4 = info.sparse_2_4;
  d->layers.resize(c.num_layers);

  // Pass 1: checksum, and the arena's size (the packed matrices' parts; vectors are kept apart).
  std::string checksum_input;
  int64_t arena_bytes = 0;
  for (const TensorView& t : file.tensors()) {
    AppendTensorHash(t.data, &checksum_input);
    if (IsMatrixPart(t.name)) {
      arena_bytes +=
          (static_cast<int64_t>(t.data.size()) + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
    }
  }
  if (Hex64(Hash64(checksum_input)) != info.data_xxh3) {
    return absl::DataLossError(
        absl::StrCat(path, ": tensor data does not match its checksum (data_xxh3)"));
  }
  if (arena_bytes > 0) d->arena.resize(static_cast<size_t>(arena_bytes + kArenaAlign));
  uint8_t* next = d->arena.data();
  next += (kArenaAlign - reinterpret_cast<uintptr_t>(next) % kArenaAlign) % kArenaAlign;
  const auto copy = [&](const TensorView& t) {
    uint8_t* at = next;
    std::memcpy(at, t.data.data(), t.data.size());
    next += (t.data.size() + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
    return at;
  };

  // Pass 2: every matrix is three tensors under one name; every vector one.
  std::map<std::string, std::vector<const TensorView*>> parts;
  std::set<std::string> vectors_seen;
  for (const TensorView& t : file.tensors()) {
    absl::string_view name = t.name;
    if (IsMatrixPart(name)) {
      const size_t dot = name.rfind('.');
      parts[std::string(name.substr(0, dot))].push_back(&t);
      continue;
    }
    if (!vectors_seen.insert(std::string(name)).second) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, " appears twice"));
    }
    ASSIGN_OR_RETURN(Slot slot, FindSlot(d.get(), c, name), _.Prepend(path));
    if (slot.vector == nullptr || t.dtype != DType::kF32 ||
        t.shape != std::vector<int64_t>{slot.rows}) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor ", t.DebugString(), " should be F32 [", slot.rows, "]"));
    }
    std::vector<float> values(slot.rows);
    std::memcpy(values.data(), t.data.data(), slot.rows * sizeof(float));
    if (slot.bias) {
      ASSIGN_OR_RETURN(std::vector<float> b, BaseVector(base, name, slot, *d));
      if (b.size() != values.size()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor ", name, " changes a bias the base does not have"));
      }
      for (size_t i = 0; i < values.size(); ++i) values[i] -= b[i];
    }
    for (size_t i = 0; i < values.size(); ++i) {
      if (!std::isfinite(values[i])) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor ", name, "[", i, "] is not finite"));
      }
    }
    *slot.vector = std::move(values);
    d->resident_bytes += slot.rows * static_cast<int64_t>(sizeof(float));
  }
  for (const auto& [name, tensors] : parts) {
    ASSIGN_OR_RETURN(Slot slot, FindSlot(d.get(), c, name), _.Prepend(path));
    if (slot.matrix == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor ", name, " is a vector, not a packed matrix"));
    }
    PackedDelta& p = *slot.matrix;
    p.rows = slot.rows;
    p.cols = slot.cols;
    p.bits = info.bits;
    p.sparse_2_4 = info.sparse_2_4;
    const TensorView *q = nullptr, *index = nullptr, *scale = nullptr;
    for (const TensorView* t : tensors) {
      const TensorView** slot_part = absl::EndsWith(t->name, ".q")       ? &q
                                     : absl::EndsWith(t->name, ".index") ? &index
                                                                         : &scale;
      if (*slot_part != nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor ", t->name, " appears twice"));
      }
      *slot_part = t;
    }
    const auto& base = name;  // (clang before 16 cannot capture a structured binding)
    const auto check = [&](const TensorView* t, const char* suffix, DType dtype,
                           std::vector<int64_t> shape) -> absl::Status {
      if (t == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor ", base, suffix, " is missing"));
      }
      if (t->dtype != dtype || t->shape != shape) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", t->DebugString(),
                                                       " should be ", DTypeName(dtype), " [",
                                                       absl::StrJoin(shape, ", "), "]"));
      }
      return absl::OkStatus();
    };
    if (p.cols % 8 != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor ", name, " has ", p.cols, " columns, not a multiple of 8"));
    }
    RETURN_IF_ERROR(check(q, ".q", DType::kU8, {p.rows, p.QBytesPerRow()}));
    RETURN_IF_ERROR(check(scale, ".scale", DType::kF32, {p.rows}));
    if (p.sparse_2_4) {
      RETURN_IF_ERROR(check(index, ".index", DType::kU8, {p.rows, p.IndexBytesPerRow()}));
    } else if (index != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor ", index->name, " in a delta without sparsity"));
    }
    p.q = copy(*q);
    p.scale = reinterpret_cast<const float*>(copy(*scale));
    if (index != nullptr) p.index = copy(*index);
    // A value is at most 2^(bits-1) scales: bounding the scale keeps every delta value finite
    // and far below anything a real fine-tune changes a weight by.
    const float max_scale = 1e4f / static_cast<float>(1 << (p.bits - 1));
    for (int64_t r = 0; r < p.rows; ++r) {
      if (!(p.scale[r] >= 0 && p.scale[r] <= max_scale)) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, ".scale[", r,
                                                       "] is not in [0, ", max_scale, "]"));
      }
    }
  }
  d->resident_bytes += static_cast<int64_t>(d->arena.size());
  // The runner applies the embedding's delta to a tied LM head (the same test as here).
  if (d->lm_head.rows > 0 && base.lm_head.data == base.embed.data) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": changes lm_head.weight, which the base ties to model.embed_tokens.weight"));
  }
  return d;
}

namespace {

// f32 matrix m += B · A, or (B · A)ᵀ when `transposed` (an embedding's LoRA), in double so that
// the reference adds each element rounded once. Nothing for rank 0.
absl::Status AddLowRank(const LowRankDelta& lr, bool transposed, Matrix* m) {
  if (lr.rank == 0) return absl::OkStatus();
  if ((transposed ? lr.cols : lr.rows) != m->rows || (transposed ? lr.rows : lr.cols) != m->cols ||
      m->dtype != DType::kF32) {
    return absl::InvalidArgumentError(
        "materialize: a low-rank delta's shape differs from its matrix");
  }
  float* f = reinterpret_cast<float*>(m->owned.data());
  std::vector<double> row(static_cast<size_t>(lr.cols));
  for (int64_t i = 0; i < lr.rows; ++i) {
    std::fill(row.begin(), row.end(), 0.0);
    for (int64_t r = 0; r < lr.rank; ++r) {
      const double b = lr.ScaledB(i, r);
      for (int64_t j = 0; j < lr.cols; ++j) row[j] += b * lr.A(r, j);
    }
    for (int64_t j = 0; j < lr.cols; ++j) {
      float& v = transposed ? f[j * m->cols + i] : f[i * m->cols + j];
      v = static_cast<float>(v + row[j]);
    }
  }
  return absl::OkStatus();
}

// m as f32 plus the unpacked delta and the low-rank update B · A (each where present).
absl::StatusOr<Matrix> AddDelta(const Matrix& m, const PackedDelta& d,
                                const LowRankDelta& lr = {}) {
  Matrix out;
  out.dtype = DType::kF32;
  out.rows = m.rows;
  out.cols = m.cols;
  out.owned.resize(static_cast<size_t>(m.rows * m.cols) * sizeof(float));
  float* f = reinterpret_cast<float*>(out.owned.data());
  const uint8_t* src = static_cast<const uint8_t*>(m.data);
  for (int64_t i = 0; i < m.rows * m.cols; ++i) f[i] = ElementAsFloat(src, m.dtype, i);
  if (d.rows > 0) {
    if (d.rows != m.rows || d.cols != m.cols) {
      return absl::InvalidArgumentError("materialize: a delta's shape differs from its matrix");
    }
    RETURN_IF_ERROR(UnpackDeltaCpu(d, 0, d.rows, f, /*accumulate=*/true));
  }
  out.data = out.owned.data();
  RETURN_IF_ERROR(AddLowRank(lr, /*transposed=*/false, &out));
  return out;
}

void AddVector(const std::vector<float>& d, std::vector<float>* v) {
  for (size_t i = 0; i < d.size() && i < v->size(); ++i) (*v)[i] += d[i];
}

}  // namespace

std::unique_ptr<DeltaWeights> RandomDeltaWeights(const ModelConfig& c, int bits, bool sparse_2_4,
                                                 uint64_t seed) {
  auto d = std::make_unique<DeltaWeights>();
  d->bits = bits;
  d->sparse_2_4 = sparse_2_4;
  d->layers.resize(c.num_layers);
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  struct Shape {
    PackedDelta* p;
    int64_t rows, cols;
  };
  std::vector<Shape> shapes = {{&d->embed, V, H}};
  if (!c.tie_word_embeddings) shapes.push_back({&d->lm_head, V, H});
  for (LayerDelta& L : d->layers) {
    shapes.push_back({&L.q, c.q_dim(), H});
    shapes.push_back({&L.k, c.kv_dim(), H});
    shapes.push_back({&L.v, c.kv_dim(), H});
    shapes.push_back({&L.o, H, c.q_dim()});
    shapes.push_back({&L.gate, I, H});
    shapes.push_back({&L.up, I, H});
    shapes.push_back({&L.down, H, I});
  }
  const auto aligned = [](int64_t n) { return (n + kArenaAlign - 1) / kArenaAlign * kArenaAlign; };
  int64_t bytes = kArenaAlign;
  for (Shape& s : shapes) {
    PackedDelta& p = *s.p;
    p.rows = s.rows;
    p.cols = s.cols;
    p.bits = bits;
    p.sparse_2_4 = sparse_2_4;
    bytes += aligned(p.rows * p.QBytesPerRow()) + aligned(p.rows * p.IndexBytesPerRow()) +
             aligned(4 * p.rows);
  }
  d->arena.resize(static_cast<size_t>(bytes));
  uint8_t* next = d->arena.data();
  next += (kArenaAlign - reinterpret_cast<uintptr_t>(next) % kArenaAlign) % kArenaAlign;
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  const auto random64 = [&state] {  // xorshift64*
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545F4914F6CDD1Dull;
  };
  // The six valid nibbles of a 2:4 group: two distinct column offsets, the smaller first.
  constexpr uint8_t kPairs[6] = {0 | 1 << 2, 0 | 2 << 2, 0 | 3 << 2,
                                 1 | 2 << 2, 1 | 3 << 2, 2 | 3 << 2};
  const float scale = 0.02f * 0.01f * 2.0f / static_cast<float>((1 << (bits - 1)) - 1);
  for (Shape& s : shapes) {
    PackedDelta& p = *s.p;
    uint8_t* q = next;
    const int64_t q_bytes = p.rows * p.QBytesPerRow();
    for (int64_t i = 0; i < q_bytes; i += 8) {
      const uint64_t r = random64();
      std::memcpy(q + i, &r, static_cast<size_t>(std::min<int64_t>(8, q_bytes - i)));
    }
    next += aligned(q_bytes);
    if (sparse_2_4) {
      uint8_t* index = next;
      for (int64_t i = 0; i < p.rows * p.IndexBytesPerRow(); ++i) {
        const uint64_t r = random64();
        index[i] = static_cast<uint8_t>(kPairs[r % 6] | kPairs[(r >> 8) % 6] << 4);
      }
      p.index = index;
      next += aligned(p.rows * p.IndexBytesPerRow());
    }
    auto* scales = reinterpret_cast<float*>(next);
    std::fill(scales, scales + p.rows, scale);
    next += aligned(4 * p.rows);
    p.q = q;
    p.scale = scales;
  }
  d->resident_bytes = static_cast<int64_t>(d->arena.size());
  return d;
}

absl::StatusOr<std::unique_ptr<ModelWeights>> MaterializeDelta(const ModelWeights& base,
                                                               const DeltaWeights& delta) {
  if (base.world_size != 1) {
    return absl::FailedPreconditionError("materialize: the base must be one rank of one");
  }
  auto w = std::make_unique<ModelWeights>();
  w->config = base.config;
  w->num_heads = base.num_heads;
  w->num_kv_heads = base.num_kv_heads;
  w->intermediate_size = base.intermediate_size;
  const bool tied = base.lm_head.data == base.embed.data;
  ASSIGN_OR_RETURN(w->embed, AddDelta(base.embed, delta.embed));
  ASSIGN_OR_RETURN(w->lm_head, AddDelta(base.lm_head, tied ? delta.embed : delta.lm_head));
  // A LoRA's embedding and head parts change one side each, tied or not.
  RETURN_IF_ERROR(AddLowRank(delta.lora_embed, /*transposed=*/true, &w->embed));
  RETURN_IF_ERROR(AddLowRank(delta.lora_head, /*transposed=*/false, &w->lm_head));
  w->final_norm = delta.final_norm.empty() ? base.final_norm : delta.final_norm;
  for (size_t l = 0; l < base.layers.size(); ++l) {
    const LayerWeights& B = base.layers[l];
    const LayerDelta& D = delta.layers[l];
    LayerWeights L;
    ASSIGN_OR_RETURN(L.q, AddDelta(B.q, D.q, D.lora_q));
    ASSIGN_OR_RETURN(L.k, AddDelta(B.k, D.k, D.lora_k));
    ASSIGN_OR_RETURN(L.v, AddDelta(B.v, D.v, D.lora_v));
    ASSIGN_OR_RETURN(L.o, AddDelta(B.o, D.o, D.lora_o));
    ASSIGN_OR_RETURN(L.gate, AddDelta(B.gate, D.gate, D.lora_gate));
    ASSIGN_OR_RETURN(L.up, AddDelta(B.up, D.up, D.lora_up));
    ASSIGN_OR_RETURN(L.down, AddDelta(B.down, D.down, D.lora_down));
    L.q_bias = B.q_bias;
    L.k_bias = B.k_bias;
    L.v_bias = B.v_bias;
    L.o_bias = B.o_bias;
    AddVector(D.q_bias, &L.q_bias);
    AddVector(D.k_bias, &L.k_bias);
    AddVector(D.v_bias, &L.v_bias);
    AddVector(D.o_bias, &L.o_bias);
    L.input_norm = D.input_norm.empty() ? B.input_norm : D.input_norm;
    L.post_attention_norm =
        D.post_attention_norm.empty() ? B.post_attention_norm : D.post_attention_norm;
    L.q_norm = D.q_norm.empty() ? B.q_norm : D.q_norm;
    L.k_norm = D.k_norm.empty() ? B.k_norm : D.k_norm;
    w->layers.push_back(std::move(L));
  }
  return w;
}

absl::StatusOr<DeltaCompressReport> CompressDelta(const std::string& base_dir,
                                                  const std::string& fine_tune_dir,
                                                  const std::string& out_path,
                                                  const DeltaCompressOptions& options) {
  if (options.bits != 2 && options.bits != 4 && options.bits != 8) {
    return absl::InvalidArgumentError(absl::StrCat("bits must be 2, 4 or 8, not ", options.bits));
  }
  ASSIGN_OR_RETURN(ModelConfig base_config, LoadModelConfig(base_dir));
  ASSIGN_OR_RETURN(ModelConfig ft_config, LoadModelConfig(fine_tune_dir));
  const struct {
    const char* field;
    int64_t base, ft;
  } fields[] = {
      {"hidden_size", base_config.hidden_size, ft_config.hidden_size},
      {"intermediate_size", base_config.intermediate_size, ft_config.intermediate_size},
      {"num_hidden_layers", base_config.num_layers, ft_config.num_layers},
      {"num_attention_heads", base_config.num_heads, ft_config.num_heads},
      {"num_key_value_heads", base_config.num_kv_heads, ft_config.num_kv_heads},
      {"head_dim", base_config.head_dim, ft_config.head_dim},
      {"vocab_size", base_config.vocab_size, ft_config.vocab_size},
      {"tie_word_embeddings", base_config.tie_word_embeddings, ft_config.tie_word_embeddings},
  };
  for (const auto& f : fields) {
    if (f.base != f.ft) {
      return absl::InvalidArgumentError(
          absl::StrCat("config.json field ", f.field, " differs: base ", f.base, ", fine-tune ",
                       f.ft, " (a delta needs the same architecture)"));
    }
  }
  ASSIGN_OR_RETURN(SafetensorsModel base, SafetensorsModel::Open(base_dir));
  ASSIGN_OR_RETURN(SafetensorsModel ft, SafetensorsModel::Open(fine_tune_dir));
  if (base.Names() != ft.Names()) {
    return absl::InvalidArgumentError(
        "the base and the fine-tune hold different tensor names (a delta needs the same set)");
  }
  DeltaCompressReport report;
  report.base_fingerprint = BaseFingerprint(base);
  ThreadPool pool(options.threads > 0 ? options.threads
                                      : static_cast<int>(std::thread::hardware_concurrency()));
  // Every output tensor's bytes, kept alive until written.
  std::vector<std::vector<uint8_t>> buffers;
  std::vector<TensorToWrite> out;
  DeltaWeights probe;  // only for FindSlot's shape table
  probe.layers.resize(base_config.num_layers);
  for (const std::string& name : base.Names()) {
    const TensorView* b = base.Find(name);
    const TensorView* f = ft.Find(name);
    if (b->shape != f->shape) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", name, " has shape [", absl::StrJoin(b->shape, ", "),
                       "] in the base and [", absl::StrJoin(f->shape, ", "), "] in the fine-tune"));
    }
    if (!IsFloat(b->dtype) || !IsFloat(f->dtype)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", name, ": only F32, BF16 and F16 weights can be compressed"));
    }
    ASSIGN_OR_RETURN(Slot slot, FindSlot(&probe, base_config, name));
    const std::vector<int64_t> want = slot.vector != nullptr
                                          ? std::vector<int64_t>{slot.rows}
                                          : std::vector<int64_t>{slot.rows, slot.cols};
    if (b->shape != want) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", name, " has shape [", absl::StrJoin(b->shape, ", "),
                       "]; config.json implies [", absl::StrJoin(want, ", "), "]"));
    }
    report.fine_tune_bytes += static_cast<int64_t>(f->data.size());
    const int64_t n = b->NumElements();
    bool changed = false;
    for (int64_t i = 0; i < n && !changed; ++i) {
      changed = ElementToFloat(*b, i) != ElementToFloat(*f, i);
    }
    if (!changed) {
      ++report.num_unchanged;
      continue;
    }
    DeltaCompressReport::Tensor entry;
    entry.name = name;
    entry.rows = slot.rows;
    if (slot.vector != nullptr) {
      std::vector<uint8_t> bytes(n * sizeof(float));
      for (int64_t i = 0; i < n; ++i) {
        const float v = ElementToFloat(*f, i);
        std::memcpy(bytes.data() + 4 * i, &v, 4);
      }
      entry.packed_bytes = static_cast<int64_t>(bytes.size());
      buffers.push_back(std::move(bytes));
      out.push_back({name, DType::kF32, {n}, buffers.back()});
      report.tensors.push_back(entry);
      continue;
    }
    const int64_t rows = slot.rows, cols = slot.cols;
    entry.cols = cols;
    if (cols % 8 != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", name, " has ", cols, " columns, not a multiple of 8"));
    }
    std::vector<float> delta(n);
    std::atomic<bool> finite{true};
    pool.ParallelFor(rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin * cols; i < end * cols; ++i) {
        delta[i] = ElementToFloat(*f, i) - ElementToFloat(*b, i);
        if (!std::isfinite(delta[i])) finite.store(false, std::memory_order_relaxed);
      }
    });
    if (!finite.load()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", name,
                       ": the fine-tune minus the base is not finite somewhere (NaN or inf "
                       "weights)"));
    }
    const float* importance = nullptr;
    if (auto it = options.column_importance.find(name);
        options.sparse_2_4 && it != options.column_importance.end()) {
      if (static_cast<int64_t>(it->second.size()) != cols) {
        return absl::InvalidArgumentError(absl::StrCat("column importance of ", name, " has ",
                                                       it->second.size(), " values for ", cols,
                                                       " columns"));
      }
      importance = it->second.data();
      ++report.num_calibrated;
    }
    PackedDelta shape;
    shape.rows = rows;
    shape.cols = cols;
    shape.bits = options.bits;
    shape.sparse_2_4 = options.sparse_2_4;
    std::vector<uint8_t> q(rows * shape.QBytesPerRow());
    std::vector<uint8_t> index(rows * shape.IndexBytesPerRow());
    std::vector<uint8_t> scale(rows * sizeof(float));
    RETURN_IF_ERROR(pool.ParallelForStatus(rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> workspace(DeltaPackWorkspaceBytes(cols) / sizeof(float));
      DeltaPackParams p;
      p.rows = rows;
      p.cols = cols;
      p.bits = options.bits;
      p.sparse_2_4 = options.sparse_2_4;
      p.delta = delta.data();
      p.column_importance = importance;
      p.q = q.data();
      p.index = options.sparse_2_4 ? index.data() : nullptr;
      p.scale = reinterpret_cast<float*>(scale.data());
      p.row_begin = begin;
      p.row_end = end;
      p.workspace = workspace.data();
      p.workspace_bytes = workspace.size() * sizeof(float);
      return PackDeltaCpu(p);
    }));
    // The error of the compressed delta against the true one, row by row.
    shape.q = q.data();
    shape.index = options.sparse_2_4 ? index.data() : nullptr;
    shape.scale = reinterpret_cast<const float*>(scale.data());
    std::vector<double> row_error(rows), row_norm(rows);
    RETURN_IF_ERROR(pool.ParallelForStatus(rows, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> back(cols);
      for (int64_t r = begin; r < end; ++r) {
        RETURN_IF_ERROR(UnpackDeltaCpu(shape, r, r + 1, back.data(), false));
        for (int64_t k = 0; k < cols; ++k) {
          const double t = delta[r * cols + k];
          row_error[r] += (back[k] - t) * (back[k] - t);
          row_norm[r] += t * t;
        }
      }
      return absl::OkStatus();
    }));
    double error = 0, norm = 0;
    for (int64_t r = 0; r < rows; ++r) {
      error += row_error[r];
      norm += row_norm[r];
    }
    entry.relative_error = norm > 0 ? std::sqrt(error / norm) : 0;
    entry.packed_bytes = shape.PackedBytes();
    buffers.push_back(std::move(q));
    out.push_back({name + ".q", DType::kU8, {rows, shape.QBytesPerRow()}, buffers.back()});
    if (options.sparse_2_4) {
      buffers.push_back(std::move(index));
      out.push_back(
          {name + ".index", DType::kU8, {rows, shape.IndexBytesPerRow()}, buffers.back()});
    }
    buffers.push_back(std::move(scale));
    out.push_back({name + ".scale", DType::kF32, {rows}, buffers.back()});
    report.tensors.push_back(entry);
  }
  std::string checksum_input;
  for (const TensorToWrite& t : out) {
    AppendTensorHash(t.data, &checksum_input);
    report.delta_bytes += static_cast<int64_t>(t.data.size());
  }
  std::map<std::string, std::string> metadata = {
      {"format", kDeltaFormat},
      {"format_version", kDeltaFormatVersion},
      {"base_model", options.base_model_name},
      {"base_fingerprint", report.base_fingerprint},
      {"bits", absl::StrCat(options.bits)},
      {"sparsity", options.sparse_2_4 ? "2:4" : "none"},
      {"data_xxh3", Hex64(Hash64(checksum_input))},
  };
  RETURN_IF_ERROR(WriteSafetensors(out_path, out, metadata));
  return report;
}

}  // namespace strata
