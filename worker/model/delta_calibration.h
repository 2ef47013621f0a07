// Calibration of delta compression: how much each input column of a base's projections matters,
// measured on text. Column j of a projection meets activation x_j; a delta value Δ[i, j] changes
// the output by Δ[i, j] x_j, so its weight is |Δ[i, j]| times the RMS of x_j over the text (Wanda's
// criterion). CompressDelta (DeltaCompressOptions::column_importance) then keeps, of every 2:4
// group, the two values that matter most by that measure rather than by |Δ| alone. Dense deltas
// are packed as without it.
#ifndef STRATA_WORKER_MODEL_DELTA_CALIBRATION_H_
#define STRATA_WORKER_MODEL_DELTA_CALIBRATION_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "worker/model/weights.h"

namespace strata {

struct CalibrationOptions {
  // Tokens per window: the text is cut into consecutive windows, each run from position 0 (as
  // `stratactl eval ppl --context` scores text).
  int64_t context = 512;
  // Compute threads (0: one per core).
  int threads = 0;
};

// Runs `tokens` (ids of the base's vocabulary, at least one) through `base` (one rank) and returns,
// per weight matrix of every decoder layer (keyed by its tensor name, as in the checkpoint:
// "model.layers.0.self_attn.q_proj.weight", ...), the RMS of each input column's activations.
// INVALID_ARGUMENT for an empty text, a token id outside the vocabulary or a bad context.
absl::StatusOr<std::map<std::string, std::vector<float>>> CalibrateColumnImportance(
    const ModelWeights& base, absl::Span<const int32_t> tokens, const CalibrationOptions& options);

}  // namespace strata

#endif  // STRATA_WORKER_MODEL_DELTA_CALIBRATION_H_
