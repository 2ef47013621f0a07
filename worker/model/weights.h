// ModelWeights: one tensor-parallel rank's share of a model's weights, loaded from safetensors.
//
// Column-parallel projections (q, k, v, gate, up, lm_head) are split by output rows, which are
// contiguous, so they stay zero-copy views into the memory-mapped file. Row-parallel projections
// (o, down) are split by input columns and copied when world_size > 1. Norm weights and biases are
// converted to f32. The embedding is replicated on every rank.
#ifndef STRATA_WORKER_MODEL_WEIGHTS_H_
#define STRATA_WORKER_MODEL_WEIGHTS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/dtype.h"
#include "worker/model/config.h"
#include "worker/model/safetensors.h"

namespace strata {

// A weight matrix [rows, cols] (rows are output features), row-major, f32 / bf16 / f16.
struct Matrix {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
  // Holds the bytes when they are not a view into the file (a slice, or random weights).
  std::vector<uint8_t> owned;
};

struct LayerWeights {
  Matrix q, k, v, o, gate, up, down;
  // [q_dim / world], [kv_dim / world] each, f32; empty without biases.
  std::vector<float> q_bias, k_bias, v_bias;
  // [hidden], f32; only rank 0 holds it (the bias is added once after the all-reduce).
  std::vector<float> o_bias;
  std::vector<float> input_norm, post_attention_norm;  // [hidden]
  std::vector<float> q_norm, k_norm;                   // [head_dim] (Qwen3), else empty
};

struct ModelWeights {
  ModelConfig config;
  int rank = 0;
  int world_size = 1;
  // This rank's share.
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t intermediate_size = 0;
  int64_t vocab_begin = 0;  // lm_head rows [vocab_begin, vocab_begin + lm_head.rows)
  Matrix embed;             // [vocab, hidden], whole
  Matrix lm_head;           // [vocab share, hidden]
  std::vector<float> final_norm;
  std::vector<LayerWeights> layers;
  // Keeps the mapped files alive for the views.
  std::shared_ptr<const SafetensorsModel> files;
};

// OK when `world_size` ranks can split the model: INVALID_ARGUMENT naming the config field (heads,
// KV heads, intermediate size) that is not divisible by it.
absl::Status CheckTensorParallelSplit(const ModelConfig& config, int world_size);

// Loads rank `rank` of `world_size` from `dir` (config.json + safetensors). INVALID_ARGUMENT naming
// the tensor and file for a missing tensor, a wrong shape or an unsupported dtype, or naming the
// config field when the model cannot be split world_size ways.
absl::StatusOr<std::unique_ptr<ModelWeights>> LoadModelWeights(const std::string& dir,
                                                               const ModelConfig& config, int rank,
                                                               int world_size);

// Random weights for `config` (normal, std 0.02; norms 1, biases 0), for benchmarks of models that
// are not on disk; dtype: f32, bf16 or f16. Each element is a function of (seed, tensor, position)
// alone, so rank `rank` of `world_size` draws exactly its share of the whole model's weights (the
// split must be possible: CheckTensorParallelSplit).
std::unique_ptr<ModelWeights> RandomModelWeights(const ModelConfig& config, DType dtype,
                                                 uint64_t seed, int rank = 0, int world_size = 1);

}  // namespace strata

#endif  // STRATA_WORKER_MODEL_WEIGHTS_H_
