#include "worker/model/lora.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "common/hash.h"
#include "common/json.h"
#include "common/mapped_file.h"
#include "common/status_macros.h"
#include "kernels/dtype.h"
#include "worker/model/safetensors.h"

namespace strata {
namespace {

// Each factor starts on a 256-byte boundary: the alignment the GPU runner gives its copies
// (cuBLASLt operands), so that they never need more room than the host copy reserved.
constexpr int64_t kArenaAlign = 256;
constexpr int64_t kRevisionSamples = 16;
constexpr int64_t kRevisionSampleBytes = 4096;

int64_t Aligned(int64_t n) { return (n + kArenaAlign - 1) / kArenaAlign * kArenaAlign; }

// The parts of adapter_config.json that decide what the adapter computes.
struct LoraConfig {
  std::string text;  // the file, for the revision
  std::string base_model_name_or_path;
  double alpha = 8;
  bool rslora = false;
  // alpha_pattern, in file order: (a module name or a dot-separated tail of one, alpha).
  std::vector<std::pair<std::string, double>> alpha_pattern;
};

absl::StatusOr<LoraConfig> ParseLoraConfig(const std::string& dir) {
  const std::string path = dir + "/" + kLoraConfigFile;
  LoraConfig c;
  ASSIGN_OR_RETURN(c.text, ReadFileToString(path));
  ASSIGN_OR_RETURN(JsonDocument doc, JsonDocument::Parse(c.text, path));
  const JsonValue root = doc.root();
  if (!root.IsObject()) return root.Error("must be an object");
  ASSIGN_OR_RETURN(const std::string type, root.StringFieldOr("peft_type", ""));
  if (type != "LORA") {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": field \"peft_type\" must be \"LORA\", not \"", type,
                     "\" (Strata serves LoRA adapters and its own compressed deltas)"));
  }
  ASSIGN_OR_RETURN(c.base_model_name_or_path, root.StringFieldOr("base_model_name_or_path", ""));
  ASSIGN_OR_RETURN(c.alpha, root.DoubleFieldOr("lora_alpha", 8));
  if (!(c.alpha > 0) || !std::isfinite(c.alpha)) {
    return root.Field("lora_alpha")->Error("must be a positive number");
  }
  ASSIGN_OR_RETURN(c.rslora, root.BoolFieldOr("use_rslora", false));
  ASSIGN_OR_RETURN(const bool dora, root.BoolFieldOr("use_dora", false));
  if (dora) return root.Field("use_dora")->Error("is true: DoRA adapters are not supported");
  ASSIGN_OR_RETURN(const bool fan_in_fan_out, root.BoolFieldOr("fan_in_fan_out", false));
  if (fan_in_fan_out) {
    return root.Field("fan_in_fan_out")
        ->Error(
            "is true: only adapters of nn.Linear projections (fan_in_fan_out false) are "
            "supported");
  }
  ASSIGN_OR_RETURN(const std::string bias, root.StringFieldOr("bias", "none"));
  if (bias != "none") {
    return root.Field("bias")->Error(
        absl::StrCat("is \"", bias, "\": adapters that train biases are not supported"));
  }
  for (const char* field : {"modules_to_save", "layer_replication"}) {
    std::optional<JsonValue> v = root.FindField(field);
    if (!v.has_value()) continue;
    if (v->IsArray()) {
      ASSIGN_OR_RETURN(std::vector<JsonValue> items, v->AsArray());
      if (items.empty()) continue;
    }
    return v->Error(absl::StrCat("is set: adapters with ", field, " are not supported"));
  }
  if (std::optional<JsonValue> patterns = root.FindField("alpha_pattern"); patterns.has_value()) {
    ASSIGN_OR_RETURN(auto members, patterns->AsObject());
    for (const auto& [key, value] : members) {
      ASSIGN_OR_RETURN(const double alpha, value.AsDouble());
      if (!(alpha > 0) || !std::isfinite(alpha)) return value.Error("must be a positive number");
      // PEFT reads keys as regular expressions; in practice they are module names or their
      // tails ("q_proj", "layers.0.self_attn.q_proj"), which match themselves. Others are refused
      // rather than read differently.
      if (key.empty() ||
          key.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                "0123456789_.") != absl::string_view::npos) {
        return value.Error(absl::StrCat(
            "has a key, \"", key,
            "\", that is a regular expression beyond a module name: give module names or their "
            "dot-separated tails"));
      }
      c.alpha_pattern.emplace_back(std::string(key), alpha);
    }
  }
  return c;
}

// Where an adapter tensor belongs: layer, projection slot, and A or B.
struct LoraTensorName {
  int64_t layer = 0;
  int projection = 0;  // index into kProjections
  bool is_a = true;
  std::string module;  // "model.layers.<l>.self_attn.q_proj", as PEFT names modules
};

struct Projection {
  const char* suffix;  // after "model.layers.<l>."
  LowRankDelta LayerDelta::*slot;
};
constexpr Projection kProjections[] = {
    {"self_attn.q_proj", &LayerDelta::lora_q}, {"self_attn.k_proj", &LayerDelta::lora_k},
    {"self_attn.v_proj", &LayerDelta::lora_v}, {"self_attn.o_proj", &LayerDelta::lora_o},
    {"mlp.gate_proj", &LayerDelta::lora_gate}, {"mlp.up_proj", &LayerDelta::lora_up},
    {"mlp.down_proj", &LayerDelta::lora_down},
};

// Projection ids past kProjections: the input embedding and the LM head.
constexpr int kEmbedProjection = static_cast<int>(std::size(kProjections));
constexpr int kHeadProjection = kEmbedProjection + 1;

// [out, in] of a projection of `c` (the embedding's: [hidden, vocab], as its LoRA factors are).
std::pair<int64_t, int64_t> ProjectionShape(const ModelConfig& c, int projection) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  switch (projection) {
    case kEmbedProjection:
      return {H, c.vocab_size};
    case kHeadProjection:
      return {c.vocab_size, H};
    case 0:
      return {c.q_dim(), H};
    case 1:
    case 2:
      return {c.kv_dim(), H};
    case 3:
      return {H, c.q_dim()};
    case 4:
    case 5:
      return {I, H};
    default:
      return {H, I};
  }
}

absl::StatusOr<LoraTensorName> ParseTensorName(absl::string_view name, const ModelConfig& c,
                                               const std::string& file) {
  const auto refuse = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": tensor ", name, " ", why));
  };
  if (absl::StrContains(name, "lora_magnitude_vector")) {
    return refuse("is a DoRA magnitude: DoRA adapters are not supported");
  }
  absl::string_view rest = name;
  absl::ConsumePrefix(&rest, "base_model.model.");
  absl::ConsumeSuffix(&rest, ".weight");
  LoraTensorName out;
  // The embedding (PEFT's lora_embedding_A [r, vocab] and lora_embedding_B [hidden, r]) and the
  // LM head (a Linear's lora_A and lora_B).
  if (rest == "model.embed_tokens.lora_embedding_A" ||
      rest == "model.embed_tokens.lora_embedding_B") {
    out.layer = -1;
    out.projection = kEmbedProjection;
    out.is_a = absl::EndsWith(rest, "_A");
    out.module = "model.embed_tokens";
    return out;
  }
  if (rest == "lm_head.lora_A" || rest == "lm_head.lora_B") {
    out.layer = -1;
    out.projection = kHeadProjection;
    out.is_a = absl::EndsWith(rest, "_A");
    out.module = "lm_head";
    return out;
  }
  if (absl::StrContains(name, "embed_tokens") || absl::StrContains(name, "lm_head")) {
    return refuse(
        "is not a LoRA factor of the embedding (lora_embedding_A, lora_embedding_B) or the LM "
        "head (lora_A, lora_B)");
  }
  if (absl::ConsumeSuffix(&rest, ".lora_A")) {
    out.is_a = true;
  } else if (absl::ConsumeSuffix(&rest, ".lora_B")) {
    out.is_a = false;
  } else {
    return refuse("is not a LoRA factor (lora_A or lora_B of a projection)");
  }
  out.module = std::string(rest);
  if (!absl::ConsumePrefix(&rest, "model.layers.")) {
    return refuse(absl::StrCat("is not in a decoder layer of a ", c.architecture_name));
  }
  const size_t dot = rest.find('.');
  if (dot == absl::string_view::npos || !absl::SimpleAtoi(rest.substr(0, dot), &out.layer) ||
      absl::StrCat(out.layer) != rest.substr(0, dot) || out.layer < 0 ||
      out.layer >= c.num_layers) {
    return refuse(absl::StrCat("names a layer outside the base's ", c.num_layers));
  }
  rest.remove_prefix(dot + 1);
  for (int p = 0; p < static_cast<int>(std::size(kProjections)); ++p) {
    if (rest == kProjections[p].suffix) {
      out.projection = p;
      return out;
    }
  }
  return refuse(absl::StrCat("adapts ", rest, ", not a projection of a ", c.architecture_name,
                             " decoder layer (q/k/v/o_proj, gate/up/down_proj)"));
}

// One adapted projection: its two tensors, checked.
struct Module {
  const TensorView* a = nullptr;
  const TensorView* b = nullptr;
  LoraTensorName name;
  int64_t rank = 0;
  double scale = 0;
};

bool IsFloat(DType t) { return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16; }

// Pairs up and checks the file's tensors against the base. Modules in file order of their A.
absl::StatusOr<std::vector<Module>> CheckModules(const SafetensorsFile& file, const ModelConfig& c,
                                                 const LoraConfig& config) {
  std::map<std::pair<int64_t, int>, size_t> index;
  std::vector<Module> modules;
  const std::string& path = file.path();
  for (const TensorView& t : file.tensors()) {
    ASSIGN_OR_RETURN(LoraTensorName n, ParseTensorName(t.name, c, path));
    if (!IsFloat(t.dtype) || t.shape.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", t.DebugString(),
                                                     " must be a matrix of F32, BF16 or F16"));
    }
    auto [it, fresh] = index.emplace(std::make_pair(n.layer, n.projection), modules.size());
    if (fresh) modules.push_back({nullptr, nullptr, n, 0, 0});
    Module& m = modules[it->second];
    const TensorView*& slot = n.is_a ? m.a : m.b;
    if (slot != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensors ", slot->name, " and ", t.name, " are the same factor"));
    }
    slot = &t;
  }
  for (Module& m : modules) {
    if (m.a == nullptr || m.b == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": module ", m.name.module, " has lora_",
                                                     m.a == nullptr ? "B" : "A", " but no lora_",
                                                     m.a == nullptr ? "A" : "B"));
    }
    const auto [out, in] = ProjectionShape(c, m.name.projection);
    m.rank = m.a->shape[0];
    if (m.rank < 1 || m.a->shape[1] != in || m.b->shape[0] != out || m.b->shape[1] != m.rank) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: module %s has lora_A %s and lora_B %s; the base's projection is [%d, %d] (out, "
          "in), so they must be [r, %d] and [%d, r]",
          path, m.name.module, m.a->DebugString(), m.b->DebugString(), out, in, in, out));
    }
    double alpha = config.alpha;
    for (const auto& [pattern, value] : config.alpha_pattern) {
      // PEFT's test: the key matches the whole name or a tail after a dot.
      if (m.name.module == pattern || absl::EndsWith(m.name.module, absl::StrCat(".", pattern))) {
        alpha = value;
        break;
      }
    }
    const double r = static_cast<double>(m.rank);
    m.scale = alpha / (config.rslora ? std::sqrt(r) : r);
  }
  return modules;
}

std::string Revision(const LoraConfig& config, const SafetensorsFile& file) {
  std::string in = config.text;
  for (const TensorView& t : file.tensors()) {
    absl::StrAppend(&in, "\n", t.DebugString(), "\n");
    const int64_t size = static_cast<int64_t>(t.data.size());
    if (size <= kRevisionSamples * kRevisionSampleBytes) {
      in.append(reinterpret_cast<const char*>(t.data.data()), t.data.size());
      continue;
    }
    for (int64_t s = 0; s < kRevisionSamples; ++s) {
      const int64_t at = (size - kRevisionSampleBytes) * s / (kRevisionSamples - 1);
      in.append(reinterpret_cast<const char*>(t.data.data() + at), kRevisionSampleBytes);
    }
  }
  return absl::StrFormat("%016x", Hash64(in));
}

struct Opened {
  LoraConfig config;
  SafetensorsFile file;
  std::vector<Module> modules;
};

// Bytes of the arena that holds `modules`' factors as `type`, each 256-byte aligned, with room to
// align the first.
int64_t ArenaBytes(const std::vector<Module>& modules, DType type) {
  const int64_t eb = DTypeBytes(type);
  int64_t bytes = kArenaAlign;
  for (const Module& m : modules) {
    bytes += Aligned(m.a->NumElements() * eb) + Aligned(m.b->NumElements() * eb);
  }
  return bytes;
}

// Element i of a factor held as `type` (f32 or bf16) at `out`.
void StoreFactorValue(DType type, void* out, int64_t i, float v) {
  if (type == DType::kF32) {
    static_cast<float*>(out)[i] = v;
  } else {
    static_cast<uint16_t*>(out)[i] = FloatToBf16(v);
  }
}

// A factor's values into `out` as `type` (f32 or bf16). Like a delta's values
// (worker/model/delta.cc), each times `scale` must lie within ±kMaxFactorValue: a hostile file
// could otherwise make activations infinite.
constexpr float kMaxFactorValue = 1e4f;
absl::Status CopyFactor(const TensorView& t, double scale, DType type, void* out) {
  for (int64_t i = 0; i < t.NumElements(); ++i) {
    const float v = ElementAsFloat(t.data.data(), t.dtype, i);
    if (!(std::abs(v * scale) <= kMaxFactorValue)) {
      return absl::InvalidArgumentError(
          absl::StrCat(t.file != nullptr ? *t.file : "", ": tensor ", t.name,
                       " holds a NaN or infinity, or a value (after the scale ", scale, ") beyond ",
                       kMaxFactorValue, " in magnitude"));
    }
    StoreFactorValue(type, out, i, v);
  }
  return absl::OkStatus();
}

absl::StatusOr<Opened> Open(const std::string& dir, const ModelConfig& c) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("LoRA adapter ", dir, " is not a directory"));
  }
  ASSIGN_OR_RETURN(LoraConfig config, ParseLoraConfig(dir));
  const std::string weights = absl::StrCat(dir, "/", kLoraWeightsFile);
  if (!std::filesystem::exists(weights, ec) &&
      std::filesystem::exists(absl::StrCat(dir, "/adapter_model.bin"), ec)) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, ": has adapter_model.bin but no ", kLoraWeightsFile,
        "; pickled weights are not read (PEFT writes safetensors by default; convert with "
        "safe_serialization=True)"));
  }
  // Read, not mapped (adapters are small): one rewritten in place while it is read must not kill
  // the worker.
  ASSIGN_OR_RETURN(SafetensorsFile file,
                   SafetensorsFile::Open(weights, SafetensorsFile::Access::kRead));
  ASSIGN_OR_RETURN(std::vector<Module> modules, CheckModules(file, c, config));
  if (modules.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(weights, ": holds no LoRA factors"));
  }
  // `modules` points into `file`'s tensor list, which lives on the heap: moving the file keeps it.
  return Opened{std::move(config), std::move(file), std::move(modules)};
}

}  // namespace

bool IsLoraAdapter(const std::string& path) {
  std::error_code ec;
  return std::filesystem::is_directory(path, ec) &&
         std::filesystem::exists(absl::StrCat(path, "/", kLoraConfigFile), ec);
}

DType LoraFactorType(const ModelWeights& base) {
  return base.layers.empty() || base.layers[0].q.dtype == DType::kF32 ? DType::kF32 : DType::kBF16;
}

absl::StatusOr<LoraAdapterInfo> ReadLoraAdapterInfo(const std::string& dir, const ModelConfig& base,
                                                    DType factor_type) {
  ASSIGN_OR_RETURN(Opened o, Open(dir, base));
  LoraAdapterInfo info;
  info.base_model_name_or_path = o.config.base_model_name_or_path;
  info.num_modules = static_cast<int64_t>(o.modules.size());
  info.resident_bytes = ArenaBytes(o.modules, factor_type);
  for (const Module& m : o.modules) info.max_rank = std::max(info.max_rank, m.rank);
  info.revision = Revision(o.config, o.file);
  return info;
}

absl::StatusOr<std::unique_ptr<DeltaWeights>> LoadLoraAdapter(const std::string& dir,
                                                              const ModelWeights& base) {
  if (base.world_size != 1) {
    return absl::FailedPreconditionError(
        "LoRA adapters are served by workers of one tensor-parallel rank only");
  }
  const ModelConfig& c = base.config;
  ASSIGN_OR_RETURN(Opened o, Open(dir, c));
  auto d = std::make_unique<DeltaWeights>();
  d->path = dir;
  d->revision = Revision(o.config, o.file);
  d->lora = true;
  d->layers.resize(c.num_layers);
  const DType type = LoraFactorType(base);
  const int64_t eb = DTypeBytes(type);
  d->arena.resize(static_cast<size_t>(ArenaBytes(o.modules, type)));
  uint8_t* next = d->arena.data();
  next += (kArenaAlign - reinterpret_cast<uintptr_t>(next) % kArenaAlign) % kArenaAlign;
  for (const Module& m : o.modules) {
    const auto [out, in] = ProjectionShape(c, m.name.projection);
    uint8_t* a = next;
    next += Aligned(m.a->NumElements() * eb);
    uint8_t* b = next;
    next += Aligned(m.b->NumElements() * eb);
    RETURN_IF_ERROR(CopyFactor(*m.a, 1.0, type, a));
    RETURN_IF_ERROR(CopyFactor(*m.b, m.scale, type, b));
    LowRankDelta& lr = m.name.projection == kEmbedProjection ? d->lora_embed
                       : m.name.projection == kHeadProjection
                           ? d->lora_head
                           : d->layers[m.name.layer].*(kProjections[m.name.projection].slot);
    lr.rank = m.rank;
    lr.rows = out;
    lr.cols = in;
    lr.dtype = type;
    lr.a = a;
    lr.b = b;
    lr.scale = static_cast<float>(m.scale);
    d->lora_max_rank = std::max(d->lora_max_rank, m.rank);
  }
  d->resident_bytes = static_cast<int64_t>(d->arena.size());
  return d;
}

std::unique_ptr<DeltaWeights> RandomLoraWeights(const ModelConfig& c, int64_t rank, uint64_t seed,
                                                DType type) {
  auto d = std::make_unique<DeltaWeights>();
  d->lora = true;
  d->lora_max_rank = rank;
  d->layers.resize(c.num_layers);
  const int64_t eb = DTypeBytes(type);
  int64_t bytes = kArenaAlign;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    for (int p = 0; p < static_cast<int>(std::size(kProjections)); ++p) {
      const auto [out, in] = ProjectionShape(c, p);
      bytes += Aligned(rank * in * eb) + Aligned(out * rank * eb);
    }
  }
  d->arena.resize(static_cast<size_t>(bytes));
  uint8_t* next = d->arena.data();
  next += (kArenaAlign - reinterpret_cast<uintptr_t>(next) % kArenaAlign) % kArenaAlign;
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  const auto uniform = [&state] {  // xorshift64*, in [-1, 1)
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return static_cast<float>(static_cast<double>(state * 0x2545F4914F6CDD1Dull >> 11) /
                                  static_cast<double>(uint64_t{1} << 52) -
                              1.0);
  };
  for (LayerDelta& L : d->layers) {
    for (int p = 0; p < static_cast<int>(std::size(kProjections)); ++p) {
      const auto [out, in] = ProjectionShape(c, p);
      uint8_t* a = next;
      next += Aligned(rank * in * eb);
      uint8_t* b = next;
      next += Aligned(out * rank * eb);
      // Entries of B · A about 2e-4 (the sum of `rank` products of uniform values).
      const float sb = 2e-4f * std::sqrt(3.0f) * std::sqrt(3.0f / rank);
      const auto fill = [&](uint8_t* out, int64_t count, float s) {
        for (int64_t i = 0; i < count; ++i) StoreFactorValue(type, out, i, s * uniform());
      };
      fill(a, rank * in, 1.0f);
      fill(b, out * rank, sb);
      LowRankDelta& lr = L.*(kProjections[p].slot);
      lr = {.rank = rank, .rows = out, .cols = in, .dtype = type, .a = a, .b = b};
    }
  }
  d->resident_bytes = static_cast<int64_t>(d->arena.size());
  return d;
}

absl::StatusOr<std::unique_ptr<DeltaWeights>> LoadFineTune(const std::string& path,
                                                           const ModelWeights& base,
                                                           const std::string& base_fingerprint) {
  if (IsLoraAdapter(path)) return LoadLoraAdapter(path, base);
  return LoadDelta(path, base, base_fingerprint);
}

}  // namespace strata
