// The sampling knobs, with their defaults and limits, shared by the API layer
// (common/sampling_params.h) and the engine's sampler (worker/engine/sampler.h), so that the limits
// stated in proto/strata/v1/common.proto are written down once.
#ifndef STRATA_COMMON_SAMPLING_KNOBS_H_
#define STRATA_COMMON_SAMPLING_KNOBS_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace strata {

inline constexpr int kMaxLogitBias = 300;

struct SamplingKnobs {
  float temperature = 1.0f;         // [0, 100]; 0: greedy
  int32_t top_k = 0;                // [0, vocab_size]; 0: all
  float top_p = 1.0f;               // (0, 1]
  float min_p = 0.0f;               // [0, 1]
  float repetition_penalty = 1.0f;  // (0, 10]
  float presence_penalty = 0.0f;    // [-2, 2]
  float frequency_penalty = 0.0f;   // [-2, 2]
  // Top-N log-probabilities to report per generated token; -1: none, 0: the sampled token's only;
  // at most 20.
  int32_t logprobs = -1;
  // (token, bias) pairs: each token in the vocabulary and at most once, each bias in [-100, 100],
  // at most kMaxLogitBias of them. Added to those tokens' logits after penalties and bans, before
  // temperature (a banned token stays banned).
  std::vector<std::pair<int32_t, float>> logit_bias;
};

// INVALID_ARGUMENT naming the field ("sampling.<field> must be in <range>"; a logit_bias entry as
// "sampling.logit_bias[i] ...") when a knob is outside its range.
absl::Status ValidateSamplingKnobs(const SamplingKnobs& knobs, int64_t vocab_size);

}  // namespace strata

#endif  // STRATA_COMMON_SAMPLING_KNOBS_H_
