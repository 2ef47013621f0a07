#include "worker/model/delta_calibration.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/comm/collectives.h"
#include "worker/model/model_runner.h"

namespace strata {

absl::StatusOr<std::map<std::string, std::vector<float>>> CalibrateColumnImportance(
    const ModelWeights& base, absl::Span<const int32_t> tokens, const CalibrationOptions& options) {
  const ModelConfig& c = base.config;
  if (base.world_size != 1) {
    return absl::InvalidArgumentError("calibration: the base must be one rank of one");
  }
  if (tokens.empty()) return absl::InvalidArgumentError("calibration: the text has no tokens");
  if (options.context <= 0 || options.context > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("calibration: context ", options.context,
                                                   " outside [1, max_position_embeddings ",
                                                   c.max_position_embeddings, "]"));
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("calibration: token ", i, " (id ", tokens[i],
                                                     ") is outside the vocabulary"));
    }
  }
  // Per layer and projection input: the sum of squares of each column, and the rows seen.
  constexpr int kInputs = 4;
  std::vector<std::vector<double>> sums(c.num_layers * kInputs);
  std::vector<int64_t> rows(c.num_layers * kInputs, 0);
  SingleRankCollectives comm;
  ModelRunner runner(&base, &comm, options.threads);
  runner.set_activation_observer(
      [&](int64_t layer, ProjectionInput input, const float* x, int64_t n, int64_t cols) {
        const int64_t k = layer * kInputs + static_cast<int>(input);
        std::vector<double>& s = sums[k];
        s.resize(cols, 0.0);
        for (int64_t r = 0; r < n; ++r) {
          for (int64_t j = 0; j < cols; ++j) s[j] += double{x[r * cols + j]} * x[r * cols + j];
        }
        rows[k] += n;
      });
  constexpr int64_t kBlockTokens = 16;
  const int64_t blocks = (options.context + kBlockTokens - 1) / kBlockTokens;
  KvCacheStorage cache(base, blocks, kBlockTokens);
  std::vector<int32_t> table(blocks);
  std::iota(table.begin(), table.end(), 0);
  for (size_t start = 0; start < tokens.size(); start += options.context) {
    const int64_t n = std::min<int64_t>(options.context, tokens.size() - start);
    std::vector<int32_t> positions(n), seq(n, 0);
    std::vector<int64_t> slots(n);
    std::iota(positions.begin(), positions.end(), 0);
    std::iota(slots.begin(), slots.end(), 0);  // block j holds positions [16 j, 16 j + 16)
    ForwardBatch b;
    b.tokens = tokens.subspan(start, n);
    b.positions = positions;
    b.token_seq = seq;
    b.slots = slots;
    b.block_tables = table;
    b.num_seqs = 1;
    b.max_blocks_per_seq = blocks;
    RETURN_IF_ERROR(runner.Forward(b, cache.layers(), {}));
  }
  std::map<std::string, std::vector<float>> out;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const auto rms = [&](ProjectionInput input) {
      const int64_t k = l * kInputs + static_cast<int>(input);
      std::vector<float> v(sums[k].size());
      for (size_t j = 0; j < v.size(); ++j) {
        v[j] = static_cast<float>(std::sqrt(sums[k][j] / std::max<int64_t>(rows[k], 1)));
      }
      return v;
    };
    const std::string layer = absl::StrCat("model.layers.", l, ".");
    const std::vector<float> qkv = rms(ProjectionInput::kQkv),
                             gate_up = rms(ProjectionInput::kGateUp);
    for (const char* p : {"q_proj", "k_proj", "v_proj"}) {
      out[absl::StrCat(layer, "self_attn.", p, ".weight")] = qkv;
    }
    out[layer + "self_attn.o_proj.weight"] = rms(ProjectionInput::kO);
    out[layer + "mlp.gate_proj.weight"] = gate_up;
    out[layer + "mlp.up_proj.weight"] = gate_up;
    out[layer + "mlp.down_proj.weight"] = rms(ProjectionInput::kDown);
  }
  return out;
}

}  // namespace strata
