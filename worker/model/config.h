// ModelConfig: the architecture of a Hugging Face Llama-family model, read from its config.json
// (and generation_config.json for end-of-sequence ids), validated so that the model runner never
// meets an inconsistent shape. Supported: LlamaForCausalLM (Llama 2 and 3, rope scaling "linear"
// and "llama3"), MistralForCausalLM (sliding-window attention), Qwen2ForCausalLM (q/k/v bias,
// optional sliding window), Qwen3ForCausalLM (per-head RMSNorm of q and k).
#ifndef STRATA_WORKER_MODEL_CONFIG_H_
#define STRATA_WORKER_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/json.h"
#include "kernels/dtype.h"
#include "kernels/elementwise.h"

namespace strata {

enum class Architecture { kLlama, kMistral, kQwen2, kQwen3 };

// Rope scaling as config.json's "rope_scaling" describes it; the kernels compute frequencies from
// it.
using RopeScaling = RopeScalingParams;

struct ModelConfig {
  Architecture architecture = Architecture::kLlama;
  // As spelled in config.json, e.g. "LlamaForCausalLM".
  std::string architecture_name;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  // Per-head dimension; may differ from hidden_size / num_heads (Qwen3). Even, for rotary
  // embeddings.
  int64_t head_dim = 0;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  // Bias on the q, k and v projections (Qwen2; Llama's attention_bias also puts one on o_proj).
  bool qkv_bias = false;
  bool o_bias = false;
  bool mlp_bias = false;
  // RMSNorm over each head of q and k before the rotary embedding (Qwen3).
  bool qk_norm = false;
  // Attend to at most this many most recent positions; 0 for full attention.
  int64_t sliding_window = 0;
  // The dtype the weights were saved in (torch_dtype), informational.
  std::string torch_dtype;
  int32_t bos_token_id = -1;
  // Every id that ends a sequence (config.json and generation_config.json together).
  std::vector<int32_t> eos_token_ids;

  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  // Query heads per KV head.
  int64_t group_size() const { return num_heads / num_kv_heads; }
  // Parameters, counting tied embeddings once.
  int64_t NumParameters() const;
};

// Speculative decoding drafts only while at most this many sequences decode, unless
// --speculative_max_batch says otherwise: on the gpu device, and on the cpu (whose GEMV is
// load-bound past a few rows). Here for stratactl plan, which sizes a draft's cache by it.
inline constexpr int kGpuSpeculativeMaxBatch = 16;
inline constexpr int kCpuSpeculativeMaxBatch = 2;
// A draft model's KV cache (speculative decoding) when its size is not given: room for this many
// tokens for each sequence that may draft at once (strata-worker's --draft_kv_cache_mb=0;
// stratactl plan reserves the same).
inline constexpr int64_t kDraftKvTokensPerSequence = 4096;

// Parses and validates a config.json document (`root` is its top-level object). Errors name the
// file and the field.
absl::StatusOr<ModelConfig> ParseModelConfig(const JsonValue& root);

// Reads `dir`/config.json and, when present, `dir`/generation_config.json.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir);

}  // namespace strata

#endif  // STRATA_WORKER_MODEL_CONFIG_H_
