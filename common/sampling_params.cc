#include "common/sampling_params.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace strata {
namespace {

absl::Status Bad(absl::string_view field, absl::string_view rule) {
  return absl::InvalidArgumentError(absl::StrCat("sampling.", field, " ", rule));
}

}  // namespace

absl::StatusOr<ResolvedSampling> ResolveSamplingParams(const v1::SamplingParams& p,
                                                       int64_t vocab_size) {
  ResolvedSampling r;
  r.max_tokens = p.max_tokens() == 0 ? 16 : p.max_tokens();
  if (r.max_tokens > kMaxMaxTokens) return Bad("max_tokens", "must be in [1, 65536]");
  r.min_tokens = p.min_tokens();
  if (r.min_tokens > r.max_tokens) return Bad("min_tokens", "must be in [0, max_tokens]");
  if (p.has_temperature()) r.temperature = p.temperature();
  // Unsigned API values past int32 range wrap to negatives, which the range check refuses.
  r.top_k = static_cast<int32_t>(p.top_k());
  if (p.has_top_p()) r.top_p = p.top_p();
  r.min_p = p.min_p();
  if (p.has_repetition_penalty()) r.repetition_penalty = p.repetition_penalty();
  r.presence_penalty = p.presence_penalty();
  r.frequency_penalty = p.frequency_penalty();
  if (p.has_logprobs()) r.logprobs = static_cast<int32_t>(std::min<uint32_t>(p.logprobs(), 1000));
  for (const v1::TokenBias& b : p.logit_bias()) r.logit_bias.emplace_back(b.token_id(), b.bias());
  if (absl::Status s = ValidateSamplingKnobs(r, vocab_size); !s.ok()) return s;
  if (p.has_seed()) r.seed = p.seed();
  if (p.stop_size() > kMaxStopStrings) return Bad("stop", "holds more than 16 strings");
  // Protobuf rejects proto3 strings that are not valid UTF-8 while parsing, so stop strings are
  // valid UTF-8 here.
  for (int i = 0; i < p.stop_size(); ++i) {
    const std::string& s = p.stop(i);
    if (s.empty() || s.size() > kMaxStopStringBytes) {
      return Bad(absl::StrCat("stop[", i, "]"), "must be 1 to 256 bytes");
    }
    r.stop.push_back(s);
  }
  if (p.stop_token_ids_size() > kMaxStopTokenIds) {
    return Bad("stop_token_ids", "holds more than 64 ids");
  }
  for (int i = 0; i < p.stop_token_ids_size(); ++i) {
    const int32_t id = p.stop_token_ids(i);
    if (id < 0 || id >= vocab_size) {
      return Bad(absl::StrCat("stop_token_ids[", i, "]"),
                 absl::StrCat("= ", id, " is outside the vocabulary [0, ", vocab_size, ")"));
    }
    r.stop_token_ids.push_back(id);
  }
  r.ignore_eos = p.ignore_eos();
  if (p.has_prompt_logprobs()) {
    if (p.prompt_logprobs() > static_cast<uint32_t>(kMaxLogprobs)) {
      return Bad("prompt_logprobs", "must be in [0, 20]");
    }
    r.prompt_logprobs = static_cast<int32_t>(p.prompt_logprobs());
  }
  r.skip_special_tokens = p.skip_special_tokens();
  return r;
}

}  // namespace strata
