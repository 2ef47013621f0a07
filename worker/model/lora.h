// LoRA adapters, as PEFT saves them, served as fine-tunes beside compressed deltas (worker/model/
// delta.h): loaded into a DeltaWeights whose layers hold low-rank parts (LowRankDelta), so the
// engine, the delta cache, the KV namespaces and the coordinator's routing treat both kinds alike.
//
// An adapter is a directory with adapter_config.json and adapter_model.safetensors. For each
// adapted projection W [out, in] of decoder layer l the file holds
//   base_model.model.model.layers.<l>.self_attn.{q,k,v,o}_proj.lora_A.weight   [r, in]
//   base_model.model.model.layers.<l>.mlp.{gate,up,down}_proj.lora_A.weight    [r, in]
// and the matching lora_B.weight [out, r] (F32, BF16 or F16; the "base_model.model." prefix and
// the ".weight" suffix may be absent); optionally base_model.model.model.embed_tokens.
// lora_embedding_A [r, vocab] and lora_embedding_B [hidden, r] (token v's embedding gains
// s · B · A[:, v]; the input side only, even with tied embeddings) and base_model.model.lm_head.
// lora_A.weight [r, hidden] and lora_B.weight [vocab, r] (the output side only). The fine-tune's
// projection is W + s · B · A with
//   s = alpha / r, or alpha / √r with "use_rslora": true,
// where r is the module's rank (its tensors' shape, which is rank_pattern's in effect) and alpha
// is "lora_alpha" (PEFT's default 8), or the value of the first "alpha_pattern" key that matches
// the module's name as PEFT matches them (the key, a module name, matching the whole name
// or a dot-separated tail of it, e.g. "q_proj" or "layers.0.self_attn.q_proj").
//
// Refused, with INVALID_ARGUMENT naming the field or tensor: another "peft_type", DoRA ("use_dora"
// or lora_magnitude_vector tensors), trained biases ("bias" other than "none"),
// "modules_to_save", "layer_replication", "fan_in_fan_out", other tensors of the embedding or LM
// head (whole weights, as modules_to_save stores them), a
// module with only one of its two factors, shapes that do not fit the base, a factor value beyond
// ±1e4 once scaled (or a NaN), alpha_pattern keys
// written as regular expressions beyond a plain module name, adapter_model.bin
// (pickles are not read).
#ifndef STRATA_WORKER_MODEL_LORA_H_
#define STRATA_WORKER_MODEL_LORA_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/config.h"
#include "worker/model/delta.h"
#include "worker/model/weights.h"

namespace strata {

inline constexpr char kLoraConfigFile[] = "adapter_config.json";
inline constexpr char kLoraWeightsFile[] = "adapter_model.safetensors";

// True when `path` is a directory holding adapter_config.json: a LoRA adapter rather than a delta
// file.
bool IsLoraAdapter(const std::string& path);

// An adapter's configuration and header, checked against a base without reading its weights.
struct LoraAdapterInfo {
  std::string base_model_name_or_path;  // as the config names it (for people)
  int64_t num_modules = 0;              // adapted projections
  int64_t max_rank = 0;
  // Bytes DeltaWeights holds once loaded (A and B in the factor type, each 256-byte aligned).
  int64_t resident_bytes = 0;
  // XXH3-64 over adapter_config.json, the tensors' names, dtypes and shapes, and 16 evenly spaced
  // 4 KiB samples of each tensor's data, as 16 hex digits: the adapter's revision in the KV
  // cache's namespace. Adapters retrained under the same name differ in every sample; an edit that
  // falls between all of them would go unnoticed.
  std::string revision;
};

// The type an adapter's factors are held in over `base`, whatever the file's: bf16 over a base
// with 16-bit weights (the adapter then takes half the memory of f32 factors, and a bf16 factor
// from the file is kept exactly), f32 over an f32 base.
DType LoraFactorType(const ModelWeights& base);

// Reads and checks `dir`'s adapter_config.json and the safetensors header against `base`, whose
// adapters hold their factors as `factor_type` (LoraFactorType). NOT_FOUND when the directory or
// a file is missing; INVALID_ARGUMENT as listed above.
absl::StatusOr<LoraAdapterInfo> ReadLoraAdapterInfo(const std::string& dir, const ModelConfig& base,
                                                    DType factor_type);

// Loads the adapter for `base` (one rank of one): A and B in LoraFactorType(base), rounded once
// from the file's values where the types differ, and the scale apart. Errors as
// ReadLoraAdapterInfo, and FAILED_PRECONDITION for a tensor-parallel base.
absl::StatusOr<std::unique_ptr<DeltaWeights>> LoadLoraAdapter(const std::string& dir,
                                                              const ModelWeights& base);

// A LoRA adapter of rank `rank` on every projection of every layer of a model shaped by `config`,
// with random factors of type `factor_type` (B · A about 1% of a weight of 0.02, as
// RandomDeltaWeights), for benchmarks of serving speed on models whose adapters are not at hand.
// Deterministic in `seed`.
std::unique_ptr<DeltaWeights> RandomLoraWeights(const ModelConfig& config, int64_t rank,
                                                uint64_t seed, DType factor_type = DType::kBF16);

// Either kind of fine-tune at `path`: a LoRA adapter directory, else a delta file (LoadDelta,
// which checks `base_fingerprint`).
absl::StatusOr<std::unique_ptr<DeltaWeights>> LoadFineTune(const std::string& path,
                                                           const ModelWeights& base,
                                                           const std::string& base_fingerprint);

}  // namespace strata

#endif  // STRATA_WORKER_MODEL_LORA_H_
