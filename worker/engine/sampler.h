// Sampling the next token from logits: penalties, temperature, top-k / top-p / min-p truncation,
// and log-probabilities.
//
// Determinism: the random draw for the token at output position p is XXH3(seed, p) mapped to [0,
// 1), and candidates are visited in a fixed order (probability descending, token id ascending), so
// the sampled token is a pure function of (seed, position, logits). A sequence resumed on another
// worker at position p therefore continues exactly as it would have.
#ifndef STRATA_WORKER_ENGINE_SAMPLER_H_
#define STRATA_WORKER_ENGINE_SAMPLER_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/sampling_knobs.h"
#include "kernels/cuda/sample_row.h"

namespace strata {

// The knobs (logit_bias among them) and their limits live in common/sampling_knobs.h, shared with
// the API layer; ValidateSamplingKnobs checks them.
struct SamplingOptions : SamplingKnobs {
  uint64_t seed = 0;
};

// Tokens a sequence has seen, for penalties: which appeared in the prompt or output (repetition)
// and how often each appeared in the output (presence, frequency).
class PenaltyState {
 public:
  void AddPrompt(absl::Span<const int32_t> tokens);
  void AddOutput(int32_t token);

  // Kept up to date as tokens arrive, in order of first appearance, as parallel arrays (the form
  // the GPU sampler takes them in, gpu::SampleArgs): each distinct token of the prompt or the
  // output once, with its count in the output (repetition penalty; 0 for prompt-only tokens), and
  // each distinct output token with its count (presence and frequency penalties).
  const std::vector<int32_t>& seen_tokens() const { return seen_tokens_; }
  const std::vector<int32_t>& seen_counts() const { return seen_counts_; }
  const std::vector<int32_t>& output_tokens() const { return output_tokens_; }
  const std::vector<int32_t>& output_token_counts() const { return output_token_counts_; }

 private:
  // Token -> index in seen_tokens_ / output_tokens_.
  absl::flat_hash_map<int32_t, int32_t> seen_index_, output_index_;
  std::vector<int32_t> seen_tokens_, seen_counts_, output_tokens_, output_token_counts_;
};

struct SampledToken {
  int32_t token = -1;
  // Log-probability of `token` under the distribution after penalties and temperature (for greedy,
  // temperature 1), before truncation.
  float logprob = 0.0f;
  // Its 1-based rank in that distribution.
  int32_t rank = 0;
  // The most likely tokens with their log-probabilities, most likely first (when requested).
  std::vector<std::pair<int32_t, float>> top;
};

// The uniform draw in [0, 1) for output position `position` of a sequence seeded with `seed` (for
// draws from candidates in probability order: top-k below the vocabulary, top-p below 1).
double SampleUniform(uint64_t seed, int64_t position);

// The key of the exponential race at that position (the other draws: gpu::DrawsByRace).
uint64_t SampleRaceKey(uint64_t seed, int64_t position);

// Samples from `logits` (modified in place: penalties, temperature, banned tokens). `banned` tokens
// get probability zero (used to hold back EOS before min_tokens). `scratch` is reused between
// calls.
SampledToken Sample(absl::Span<float> logits, const SamplingOptions& options,
                    const PenaltyState& penalties, int64_t position,
                    absl::Span<const int32_t> banned,
                    std::vector<std::pair<float, int32_t>>* scratch);

// The GPU sampler's row for these options at output position `position` (the draw included), so
// that it picks the token Sample would.
gpu::SampleRow SampleRowOf(const SamplingOptions& options, int64_t position);

// Log-probability of `token` and the top-n tokens of raw `logits` (log-softmax, temperature 1): for
// prompt log-probabilities.
SampledToken LogprobsOf(absl::Span<const float> logits, int32_t token, int32_t top_n);

// Sorts (logit, token) candidates by logit descending, token ascending on equal logits (0 and -0
// equal), as Sample orders them: exactly std::sort's order under that comparison, in linear time
// (a stable radix sort on the logits' bits, for candidates given in ascending token order, as
// Sample builds them). NaN logits are not allowed.
void SortByProbability(std::vector<std::pair<float, int32_t>>* candidates);

}  // namespace strata

#endif  // STRATA_WORKER_ENGINE_SAMPLER_H_
