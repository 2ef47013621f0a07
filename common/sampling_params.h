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
#include "common/sampling_knobs.h"
#include "proto/strata/v1/common.pb.h"

namespace strata {

struct ResolvedSampling : SamplingKnobs {
  int64_t max_tokens = 16;
  int64_t min_tokens = 0;
  // Unset: the server picks one.
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
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
