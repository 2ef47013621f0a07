#include "common/sampling_knobs.h"

#include <string>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace strata {

absl::Status ValidateSamplingKnobs(const SamplingKnobs& o, int64_t vocab_size) {
  auto bad = [](absl::string_view field, absl::string_view range) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.", field, " must be in ", range));
  };
  if (!(o.temperature >= 0 && o.temperature <= 100)) return bad("temperature", "[0, 100]");
  if (o.top_k < 0 || o.top_k > vocab_size) return bad("top_k", "[0, vocab_size]");
  if (!(o.top_p > 0 && o.top_p <= 1)) return bad("top_p", "(0, 1]");
  if (!(o.min_p >= 0 && o.min_p <= 1)) return bad("min_p", "[0, 1]");
  if (!(o.repetition_penalty > 0 && o.repetition_penalty <= 10)) {
    return bad("repetition_penalty", "(0, 10]");
  }
  if (!(o.presence_penalty >= -2 && o.presence_penalty <= 2)) {
    return bad("presence_penalty", "[-2, 2]");
  }
  if (!(o.frequency_penalty >= -2 && o.frequency_penalty <= 2)) {
    return bad("frequency_penalty", "[-2, 2]");
  }
  if (o.logprobs < -1 || o.logprobs > 20) return bad("logprobs", "[0, 20]");
  if (o.logit_bias.size() > static_cast<size_t>(kMaxLogitBias)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.logit_bias holds more than ", kMaxLogitBias, " tokens"));
  }
  absl::flat_hash_set<int32_t> seen;
  for (size_t i = 0; i < o.logit_bias.size(); ++i) {
    const auto [token, bias] = o.logit_bias[i];
    auto field = [i] { return absl::StrCat("sampling.logit_bias[", i, "] "); };  // errors only
    if (token < 0 || token >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          field(), "token ", token, " is outside the vocabulary [0, ", vocab_size, ")"));
    }
    if (!(bias >= -100.0f && bias <= 100.0f)) {
      return absl::InvalidArgumentError(absl::StrCat(field(), "bias must be in [-100, 100]"));
    }
    if (!seen.insert(token).second) {
      return absl::InvalidArgumentError(absl::StrCat(field(), "repeats token ", token));
    }
  }
  return absl::OkStatus();
}

}  // namespace strata
