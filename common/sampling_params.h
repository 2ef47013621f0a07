// The API's sampling parameters (strata.v1.SamplingParams) with defaults applied and every stated
// limit checked. Both sides of the cluster use it: the coordinator rejects a bad request before
// routing it, and the worker checks what it is sent. Errors are INVALID_ARGUMENT naming the field
// as "sampling.<field>".
#ifndef STRATA_COMMON_SAMPLING_PARAMS_H_
#define STRATA_COMMON_SAMPLING_PARAMS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/strata/v1/common.pb.h"

namespace strata {

struct ResolvedSampling {
  int64_t max_tokens = 16;
  int64_t min_tokens = 0;
  float temperature = 1.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  // Unset: the server picks one.
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  // -1: none; 0: the sampled token's only; N: also the top N.
  int32_t logprobs = -1;
  int32_t prompt_logprobs = -1;
  bool skip_special_tokens = false;
};

inline constexpr int64_t kMaxMaxTokens = 65536;
inline constexpr int kMaxStopStrings = 16;
inline constexpr size_t kMaxStopStringBytes = 256;
inline constexpr int kMaxStopTokenIds = 64;
inline constexpr int32_t kMaxLogprobs = 20;

absl::StatusOr<ResolvedSampling> ResolveSamplingParams(const v1::SamplingParams& params,
                                                       int64_t vocab_size);

}  // namespace strata

#endif  // STRATA_COMMON_SAMPLING_PARAMS_H_
