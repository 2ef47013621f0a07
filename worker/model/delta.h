// Fine-tunes as compressed deltas over a base model: the delta file format, the compressor that
// writes it from a base and a fine-tuned checkpoint, and the loader that reads it for serving.
//
// Delta file format (version 1): a safetensors file.
//   __metadata__: "format" = "strata-delta", "format_version" = "1", "base_model" (a name, for
//     people), "base_fingerprint" (BaseFingerprint of the base's weights: a delta only loads over
//     the base it was made from), "bits" ("2", "4" or "8"), "sparsity" ("2:4" or "none"),
//     "data_xxh3" (16 hex digits: XXH3-64 of the concatenated little-endian XXH3-64s of every
//     tensor's bytes, in file order; a mismatch at load is DATA_LOSS, never wrong output).
//   For each weight matrix N of the base that the fine-tune changed, a packed delta
//   (kernels/delta.h) as three tensors: "N.q" U8 [rows, kept * bits / 8], "N.index" U8 [rows, cols
//   / 8] (2:4 only) and "N.scale" F32 [rows]. For each vector N (norm weights, biases) that the
//   fine-tune changed, the fine-tune's values: "N" F32 [size].
// Tensors the fine-tune left unchanged are absent and cost nothing. With tied embeddings the delta
// of model.embed_tokens.weight applies to the LM head too.
#ifndef STRATA_WORKER_MODEL_DELTA_H_
#define STRATA_WORKER_MODEL_DELTA_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/delta.h"
#include "kernels/dtype.h"
#include "worker/model/safetensors.h"
#include "worker/model/weights.h"

namespace strata {

inline constexpr char kDeltaFormat[] = "strata-delta";
inline constexpr char kDeltaFormatVersion[] = "1";

// A low-rank update of one projection W [rows, cols], as a LoRA adapter trains it (worker/model/
// lora.h): the fine-tune's projection is W + scale · B · A, so y += scale · (x · Aᵀ) · Bᵀ. Views
// into the owning DeltaWeights' arena; rank == 0 means none.
struct LowRankDelta {
  int64_t rank = 0;
  int64_t rows = 0;  // out_features
  int64_t cols = 0;  // in_features
  // The factors' type: bf16 over a 16-bit base (half of f32's memory, as the base's own weights
  // are held), f32 over an f32 one.
  DType dtype = DType::kF32;
  const void* a = nullptr;  // [rank, cols]
  const void* b = nullptr;  // [rows, rank]
  float scale = 1.0f;       // PEFT's alpha / r (or / sqrt(r))

  // A[r, c] and scale · B[i, r] as f32.
  float A(int64_t r, int64_t c) const { return ElementAsFloat(a, dtype, r * cols + c); }
  float ScaledB(int64_t i, int64_t r) const {
    return scale * ElementAsFloat(b, dtype, i * rank + r);
  }
};

// What a delta changes in one decoder layer. A PackedDelta with rows == 0 means "unchanged"; an
// empty vector means "the base's". A projection may have a packed delta, a low-rank one, or both.
struct LayerDelta {
  PackedDelta q, k, v, o, gate, up, down;
  LowRankDelta lora_q, lora_k, lora_v, lora_o, lora_gate, lora_up, lora_down;
  // The fine-tune's values, [hidden] / [head_dim], f32.
  std::vector<float> input_norm, post_attention_norm, q_norm, k_norm;
  // Fine-tune minus base, added to the projection's output: [q_dim], [kv_dim], [kv_dim], [hidden].
  std::vector<float> q_bias, k_bias, v_bias, o_bias;
};

// One fine-tune, loaded: views into its own memory, read whole from the delta file (or a LoRA
// adapter's directory, worker/model/lora.h). Immutable once loaded, so any thread may read it. Only
// for a base run as one tensor-parallel rank.
struct DeltaWeights {
  DeltaWeights();
  // The PackedDelta views point into `arena`: a copy would point into the original.
  DeltaWeights(const DeltaWeights&) = delete;
  DeltaWeights& operator=(const DeltaWeights&) = delete;

  // Unique in the process (drawn at construction, never reused): what caches of derived copies
  // (the GPU runner's device copies) key on, where an address could be reused after a free.
  const uint64_t serial;

  std::string path;
  // The revision of what was loaded (a delta's data checksum; an adapter's, as
  // ReadLoraAdapterInfo gives it): a file replaced since its registration loads as another one.
  std::string revision;
  // A LoRA adapter: only the lora_* parts are set (bits and sparse_2_4 mean nothing).
  bool lora = false;
  // LoRA on the input embedding, as PEFT adapts an nn.Embedding: token v's row gains B · A[:, v]
  // (rows = hidden, cols = vocab: A [rank, vocab], B [hidden, rank]). It changes the input
  // embedding only, even with tied embeddings.
  LowRankDelta lora_embed;
  // LoRA on the LM head (rows = vocab, cols = hidden), the output side only.
  LowRankDelta lora_head;
  // The largest rank of its low-rank parts (0 for a packed delta).
  int64_t lora_max_rank = 0;
  int bits = 4;
  bool sparse_2_4 = true;
  PackedDelta embed;    // [vocab, hidden]
  PackedDelta lm_head;  // [vocab, hidden]; rows == 0 with tied embeddings (embed's applies)
  std::vector<float> final_norm;
  std::vector<LayerDelta> layers;
  // Bytes of memory the loaded delta holds (its arena and its vectors).
  int64_t resident_bytes = 0;
  // The packed tensors' bytes, 64-byte aligned each.
  std::vector<uint8_t> arena;
};

// The identity of a base model's weights: XXH3-64 over every tensor's name, dtype, shape, size and
// 16 evenly spaced 4 KiB samples of its data (first and last page included), as 16 hex digits.
// Cheap (16 pages a tensor), and it tells apart different checkpoints of one architecture; two
// bases that differ only between the samples of every tensor would pass for one.
std::string BaseFingerprint(const SafetensorsModel& model);

// A delta file's header, read without loading its tensors.
struct DeltaFileInfo {
  std::string base_model;
  std::string base_fingerprint;
  int bits = 0;
  bool sparse_2_4 = false;
  int64_t num_tensors = 0;
  // Bytes of tensor data in the file.
  int64_t data_bytes = 0;
  // The metadata's checksum of the data (16 hex digits).
  std::string data_xxh3;
};

// INVALID_ARGUMENT naming the file and the metadata field when it is not a version-1 delta file;
// NOT_FOUND when it does not exist.
absl::StatusOr<DeltaFileInfo> ReadDeltaFileInfo(const std::string& path);

// Reads a delta for `base` (one rank of one: world_size must be 1). FAILED_PRECONDITION when the
// file was made from another base (its base_fingerprint differs from `base_fingerprint`),
// INVALID_ARGUMENT naming the tensor for an unknown name, a wrong shape or dtype, DATA_LOSS when
// the data does not match its checksum.
absl::StatusOr<std::unique_ptr<DeltaWeights>> LoadDelta(const std::string& path,
                                                        const ModelWeights& base,
                                                        const std::string& base_fingerprint);

// The fine-tune as plain weights: every matrix the delta changes becomes f32 base + unpacked Δ (+ B
// · A for a low-rank part), vectors take the fine-tune's values. The reference that delta serving
// is tested against (and a way to export a compressed fine-tune). `base` must be one rank of one.
absl::StatusOr<std::unique_ptr<ModelWeights>> MaterializeDelta(const ModelWeights& base,
                                                               const DeltaWeights& delta);

// A delta of random codes and scales (about 1% of a weight of 0.02) for every matrix of a model
// shaped by `config` (embedding and, when untied, LM head included; norms and biases kept), packed
// in its arena as LoadDelta packs a file's: for benchmarks of serving speed, where the values do
// not matter, on models whose files are not at hand. Deterministic in `seed`.
std::unique_ptr<DeltaWeights> RandomDeltaWeights(const ModelConfig& config, int bits,
                                                 bool sparse_2_4, uint64_t seed);

// The defaults are what measured best on the bundled fine-tunes (docs/PERFORMANCE.md): 4-bit
// without sparsity kept held-out perplexity within 0.3% of the full fine-tune at 3.9x less memory,
// where 2:4 sparsity (chosen by magnitude, without calibration data) lost 16%.
struct DeltaCompressOptions {
  int bits = 4;
  bool sparse_2_4 = false;
  // Written into the file's metadata.
  std::string base_model_name;
  // Threads packing rows (0: one per core).
  int threads = 0;
  // Importance of each input column per weight matrix, by tensor name (for example from
  // CalibrateColumnImportance, worker/model/delta_calibration.h): DeltaPackParams::
  // column_importance for that matrix. Matrices without an entry weigh columns equally; only 2:4
  // selection uses it, so dense deltas ignore it.
  std::map<std::string, std::vector<float>> column_importance;
};

struct DeltaCompressReport {
  struct Tensor {
    std::string name;
    int64_t rows = 0;
    int64_t cols = 0;  // 0 for a vector
    // ||Δ̂ - Δ|| / ||Δ|| over the whole matrix (pruned values count as error); 0 for vectors.
    double relative_error = 0;
    int64_t packed_bytes = 0;
  };
  std::vector<Tensor> tensors;
  // Tensors equal in base and fine-tune, left out.
  int64_t num_unchanged = 0;
  // Matrices packed with a column importance (DeltaCompressOptions::column_importance).
  int64_t num_calibrated = 0;
  // Bytes of the fine-tune's weights, and of the delta file's tensor data.
  int64_t fine_tune_bytes = 0;
  int64_t delta_bytes = 0;
  std::string base_fingerprint;
};

// Compresses the fine-tune in `fine_tune_dir` against the base in `base_dir` (both Hugging Face
// directories: config.json plus safetensors) and writes the delta file `out_path`.
// INVALID_ARGUMENT naming the field or tensor when the two are not the same architecture (config
// fields, tensor names, shapes), or a matrix's columns are not a multiple of 8.
absl::StatusOr<DeltaCompressReport> CompressDelta(const std::string& base_dir,
                                                  const std::string& fine_tune_dir,
                                                  const std::string& out_path,
                                                  const DeltaCompressOptions& options);

}  // namespace strata

#endif  // STRATA_WORKER_MODEL_DELTA_H_
