#include "worker/model/config.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/mapped_file.h"
#include "common/status_macros.h"

namespace strata {
namespace {

// Adds an eos id, or each of a list of them, from `field` of `obj` when present.
absl::Status AddEosIds(const JsonValue& obj, std::vector<int32_t>* out) {
  std::optional<JsonValue> v = obj.FindField("eos_token_id");
  if (!v) return absl::OkStatus();
  std::vector<JsonValue> items;
  if (v->IsArray()) {
    ASSIGN_OR_RETURN(items, v->AsArray());
  } else {
    items.push_back(*v);
  }
  for (const JsonValue& item : items) {
    ASSIGN_OR_RETURN(int64_t id, item.AsInt());
    if (id < 0) return item.Error("must not be negative");
    if (std::find(out->begin(), out->end(), id) == out->end()) {
      out->push_back(static_cast<int32_t>(id));
    }
  }
  return absl::OkStatus();
}

}  // namespace

int64_t ModelConfig::NumParameters() const {
  const int64_t attn = hidden_size * q_dim() * 2 + hidden_size * kv_dim() * 2 +
                       (qkv_bias ? q_dim() + 2 * kv_dim() : 0) + (o_bias ? hidden_size : 0) +
                       (qk_norm ? 2 * head_dim : 0);
  const int64_t mlp = 3 * hidden_size * intermediate_size;
  const int64_t layer = attn + mlp + 2 * hidden_size;
  const int64_t embed = vocab_size * hidden_size;
  return num_layers * layer + hidden_size + embed * (tie_word_embeddings ? 1 : 2);
}

absl::StatusOr<ModelConfig> ParseModelConfig(const JsonValue& root) {
  ModelConfig c;
  ASSIGN_OR_RETURN(JsonValue archs, root.Field("architectures"));
  ASSIGN_OR_RETURN(auto arch_list, archs.AsArray());
  if (arch_list.size() != 1) return archs.Error("must name exactly one architecture");
  ASSIGN_OR_RETURN(absl::string_view arch, arch_list[0].AsString());
  c.architecture_name = std::string(arch);
  if (arch == "LlamaForCausalLM") {
    c.architecture = Architecture::kLlama;
  } else if (arch == "MistralForCausalLM") {
    c.architecture = Architecture::kMistral;
  } else if (arch == "Qwen2ForCausalLM") {
    c.architecture = Architecture::kQwen2;
  } else if (arch == "Qwen3ForCausalLM") {
    c.architecture = Architecture::kQwen3;
  } else {
    return arch_list[0].Error(absl::StrCat("names unsupported architecture \"", arch,
                                           "\" (supported: LlamaForCausalLM, MistralForCausalLM, "
                                           "Qwen2ForCausalLM, Qwen3ForCausalLM)"));
  }

  ASSIGN_OR_RETURN(c.hidden_size, root.IntField("hidden_size"));
  ASSIGN_OR_RETURN(c.intermediate_size, root.IntField("intermediate_size"));
  ASSIGN_OR_RETURN(c.num_layers, root.IntField("num_hidden_layers"));
  ASSIGN_OR_RETURN(c.num_heads, root.IntField("num_attention_heads"));
  ASSIGN_OR_RETURN(c.num_kv_heads, root.IntFieldOr("num_key_value_heads", c.num_heads));
  ASSIGN_OR_RETURN(c.vocab_size, root.IntField("vocab_size"));
  ASSIGN_OR_RETURN(c.max_position_embeddings, root.IntFieldOr("max_position_embeddings", 2048));
  for (const auto& [name, value] : {std::pair<const char*, int64_t>{"hidden_size", c.hidden_size},
                                    {"intermediate_size", c.intermediate_size},
                                    {"num_hidden_layers", c.num_layers},
                                    {"num_attention_heads", c.num_heads},
                                    {"num_key_value_heads", c.num_kv_heads},
                                    {"vocab_size", c.vocab_size},
                                    {"max_position_embeddings", c.max_position_embeddings}}) {
    if (value <= 0) return root.Field(name)->Error("must be positive");
  }
  if (c.num_heads % c.num_kv_heads != 0) {
    return root.Field("num_key_value_heads")
        ->Error(absl::StrCat("(", c.num_kv_heads, ") must divide num_attention_heads (",
                             c.num_heads, ")"));
  }
  if (root.FindField("head_dim")) {
    ASSIGN_OR_RETURN(c.head_dim, root.IntField("head_dim"));
    if (c.head_dim <= 0) return root.Field("head_dim")->Error("must be positive");
  } else {
    if (c.hidden_size % c.num_heads != 0) {
      return root.Field("num_attention_heads")
          ->Error(absl::StrCat("(", c.num_heads, ") must divide hidden_size (", c.hidden_size,
                               ") when head_dim is not given"));
    }
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim % 2 != 0) {
    return root.Error(
        absl::StrCat("head dimension ", c.head_dim, " must be even for rotary embeddings"));
  }
  if (c.vocab_size > (int64_t{1} << 31) - 1) return root.Field("vocab_size")->Error("is too large");

  ASSIGN_OR_RETURN(std::string act, root.StringFieldOr("hidden_act", "silu"));
  if (act != "silu") {
    return root.Field("hidden_act")
        ->Error(absl::StrCat("is \"", act, "\"; only \"silu\" is supported"));
  }
  ASSIGN_OR_RETURN(c.rms_norm_eps, root.DoubleFieldOr("rms_norm_eps", 1e-6));
  if (!(c.rms_norm_eps > 0)) return root.Field("rms_norm_eps")->Error("must be positive");
  ASSIGN_OR_RETURN(c.rope_theta, root.DoubleFieldOr("rope_theta", 10000.0));
  if (!(c.rope_theta > 0)) return root.Field("rope_theta")->Error("must be positive");
  ASSIGN_OR_RETURN(c.tie_word_embeddings, root.BoolFieldOr("tie_word_embeddings", false));
  ASSIGN_OR_RETURN(c.torch_dtype, root.StringFieldOr("torch_dtype", ""));

  if (std::optional<JsonValue> rs = root.FindField("rope_scaling")) {
    std::string type;
    if (rs->FindField("rope_type")) {
      ASSIGN_OR_RETURN(type, rs->StringFieldOr("rope_type", ""));
    } else {
      ASSIGN_OR_RETURN(type, rs->StringFieldOr("type", ""));
    }
    if (type == "default" || type.empty()) {
      c.rope_scaling.type = RopeScaling::Type::kNone;
    } else if (type == "linear") {
      c.rope_scaling.type = RopeScaling::Type::kLinear;
      ASSIGN_OR_RETURN(c.rope_scaling.factor, rs->DoubleField("factor"));
    } else if (type == "llama3") {
      c.rope_scaling.type = RopeScaling::Type::kLlama3;
      ASSIGN_OR_RETURN(c.rope_scaling.factor, rs->DoubleField("factor"));
      ASSIGN_OR_RETURN(c.rope_scaling.low_freq_factor, rs->DoubleField("low_freq_factor"));
      ASSIGN_OR_RETURN(c.rope_scaling.high_freq_factor, rs->DoubleField("high_freq_factor"));
      ASSIGN_OR_RETURN(c.rope_scaling.original_max_position_embeddings,
                       rs->IntField("original_max_position_embeddings"));
      if (!(c.rope_scaling.high_freq_factor > c.rope_scaling.low_freq_factor)) {
        return rs->Error("needs high_freq_factor > low_freq_factor");
      }
    } else {
      return rs->Error(
          absl::StrCat("has unsupported type \"", type, "\" (supported: default, linear, llama3)"));
    }
    if (c.rope_scaling.type != RopeScaling::Type::kNone && !(c.rope_scaling.factor > 0)) {
      return rs->Error("needs a positive factor");
    }
  }

  switch (c.architecture) {
    case Architecture::kLlama: {
      ASSIGN_OR_RETURN(bool bias, root.BoolFieldOr("attention_bias", false));
      c.qkv_bias = c.o_bias = bias;
      ASSIGN_OR_RETURN(c.mlp_bias, root.BoolFieldOr("mlp_bias", false));
      break;
    }
    case Architecture::kMistral: {
      ASSIGN_OR_RETURN(c.sliding_window, root.IntFieldOr("sliding_window", 0));
      break;
    }
    case Architecture::kQwen2: {
      c.qkv_bias = true;
      ASSIGN_OR_RETURN(bool use_sw, root.BoolFieldOr("use_sliding_window", false));
      if (use_sw) {
        ASSIGN_OR_RETURN(c.sliding_window, root.IntFieldOr("sliding_window", 0));
        ASSIGN_OR_RETURN(int64_t max_window_layers, root.IntFieldOr("max_window_layers", 0));
        if (max_window_layers < c.num_layers) {
          return root.Field("max_window_layers")
              ->Error("below num_hidden_layers (per-layer sliding windows) is not supported");
        }
      }
      break;
    }
    case Architecture::kQwen3: {
      c.qk_norm = true;
      ASSIGN_OR_RETURN(bool bias, root.BoolFieldOr("attention_bias", false));
      c.qkv_bias = c.o_bias = bias;
      ASSIGN_OR_RETURN(bool use_sw, root.BoolFieldOr("use_sliding_window", false));
      if (use_sw) {
        ASSIGN_OR_RETURN(c.sliding_window, root.IntFieldOr("sliding_window", 0));
      }
      break;
    }
  }
  if (c.sliding_window < 0) return root.Field("sliding_window")->Error("must not be negative");

  ASSIGN_OR_RETURN(int64_t bos, root.IntFieldOr("bos_token_id", -1));
  c.bos_token_id = static_cast<int32_t>(bos);
  RETURN_IF_ERROR(AddEosIds(root, &c.eos_token_ids));
  for (int32_t id : c.eos_token_ids) {
    if (id >= c.vocab_size) return root.Field("eos_token_id")->Error("is outside the vocabulary");
  }
  if (c.bos_token_id >= c.vocab_size) {
    return root.Field("bos_token_id")->Error("is outside the vocabulary");
  }
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir) {
  const std::string path = dir + "/config.json";
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  ASSIGN_OR_RETURN(JsonDocument doc, JsonDocument::Parse(text, path));
  ASSIGN_OR_RETURN(ModelConfig config, ParseModelConfig(doc.root()));
  const std::string gen_path = dir + "/generation_config.json";
  absl::StatusOr<std::string> gen_text = ReadFileToString(gen_path);
  if (gen_text.ok()) {
    ASSIGN_OR_RETURN(JsonDocument gen, JsonDocument::Parse(*gen_text, gen_path));
    RETURN_IF_ERROR(AddEosIds(gen.root(), &config.eos_token_ids));
    for (int32_t id : config.eos_token_ids) {
      if (id >= config.vocab_size) {
        return gen.root().Field("eos_token_id")->Error("is outside the vocabulary");
      }
    }
  } else if (gen_text.status().code() != absl::StatusCode::kNotFound) {
    return gen_text.status();
  }
  return config;
}

}  // namespace strata
