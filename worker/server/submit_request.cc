#include "worker/server/submit_request.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/sampling_params.h"
#include "common/status_macros.h"

namespace strata {

absl::StatusOr<RequestOptions> ParseSamplingParams(const v1::SamplingParams& sampling,
                                                   int64_t vocab_size) {
  ASSIGN_OR_RETURN(ResolvedSampling r, ResolveSamplingParams(sampling, vocab_size));
  RequestOptions o;
  o.max_tokens = r.max_tokens;
  o.min_tokens = r.min_tokens;
  o.ignore_eos = r.ignore_eos;
  o.stop_token_ids = std::move(r.stop_token_ids);
  o.prompt_logprobs = r.prompt_logprobs;
  static_cast<SamplingKnobs&>(o.sampling) = r;
  o.sampling.seed = r.seed.value_or(0);
  return o;
}

absl::StatusOr<ParsedSubmit> ParseSubmitRequest(const v1::SubmitRequest& request,
                                                const SubmitLimits& limits) {
  ParsedSubmit out;
  if (request.request_id().empty() || request.request_id().size() > 128) {
    return absl::InvalidArgumentError("request_id must be 1 to 128 bytes");
  }
  out.request_id = request.request_id();
  if (request.model() != limits.model_name) {
    return absl::NotFoundError(absl::StrCat("model \"", request.model(),
                                            "\" is not served by this worker (it serves \"",
                                            limits.model_name, "\")"));
  }
  if (!request.fine_tune_id().empty() &&
      (limits.fine_tunes == nullptr || !limits.fine_tunes->HasFineTune(request.fine_tune_id()))) {
    return absl::NotFoundError(
        absl::StrCat("fine_tune_id \"", request.fine_tune_id(), "\" is not served by this worker"));
  }
  if (request.cache_salt().size() > 256) {
    return absl::InvalidArgumentError("cache_salt must be at most 256 bytes");
  }
  if (request.priority() < -100 || request.priority() > 100) {
    return absl::InvalidArgumentError("priority must be in [-100, 100]");
  }
  out.priority = request.priority();
  if (request.tenant().size() > 128) {
    return absl::InvalidArgumentError("tenant must be at most 128 bytes");
  }
  if (request.kv_source_address().size() > 255) {
    return absl::InvalidArgumentError("kv_source_address must be at most 255 bytes");
  }
  out.kv_source_address = request.kv_source_address();
  const double weight = request.tenant_weight() == 0 ? 1 : request.tenant_weight();
  if (!(weight > 0 && weight <= 1000)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tenant_weight must be in (0, 1000] (0: 1), not ", request.tenant_weight()));
  }
  const int64_t num_prompt = request.prompt_token_ids_size();
  const int64_t num_resume = request.resume_token_ids_size();
  if (num_prompt == 0) return absl::InvalidArgumentError("prompt_token_ids must not be empty");
  if (num_prompt + num_resume >= limits.max_context_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt_token_ids plus resume_token_ids hold ", num_prompt + num_resume,
                     " tokens; the context served is ", limits.max_context_tokens, " (at most ",
                     limits.max_context_tokens - 1, " may be given)"));
  }
  auto check_ids = [&](const auto& ids, const char* field) -> absl::Status {
    for (int i = 0; i < ids.size(); ++i) {
      if (ids[i] < 0 || ids[i] >= limits.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(field, "[", i, "] = ", ids[i],
                                                       " is outside the vocabulary [0, ",
                                                       limits.vocab_size, ")"));
      }
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(check_ids(request.prompt_token_ids(), "prompt_token_ids"));
  RETURN_IF_ERROR(check_ids(request.resume_token_ids(), "resume_token_ids"));
  ASSIGN_OR_RETURN(out.options, ParseSamplingParams(request.sampling(), limits.vocab_size));
  if (!request.sampling().stop().empty()) {
    return absl::InvalidArgumentError(
        "sampling.stop must be empty: stop strings are matched by the coordinator");
  }
  if (num_resume >= out.options.max_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "resume_token_ids holds ", num_resume,
        " tokens, which already reach sampling.max_tokens = ", out.options.max_tokens));
  }
  out.prompt.assign(request.prompt_token_ids().begin(), request.prompt_token_ids().end());
  out.options.resume_tokens.assign(request.resume_token_ids().begin(),
                                   request.resume_token_ids().end());
  out.options.fine_tune_id = request.fine_tune_id();
  out.options.priority = request.priority();
  out.options.cache_salt = request.cache_salt();
  out.options.tenant = request.tenant();
  out.options.tenant_weight = weight;
  const v1::StructuredOutput& so = request.sampling().structured_output();
  constexpr absl::string_view kField = "sampling.structured_output";
  ASSIGN_OR_RETURN(out.options.grammar, limits.grammars != nullptr
                                            ? limits.grammars->Get(so, kField)
                                            : CompileStructuredOutput(so, kField));
  if (out.options.grammar != nullptr) out.options.grammar_prefix = so.prefix();
  return out;
}

v1::FinishReason ToProtoFinishReason(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case FinishReason::kStopToken:
      return v1::FINISH_REASON_STOP_TOKEN;
    case FinishReason::kContextLength:
      return v1::FINISH_REASON_CONTEXT_LENGTH;
    case FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    case FinishReason::kGrammarEnd:
      return v1::FINISH_REASON_GRAMMAR_END;
    case FinishReason::kNone:
    case FinishReason::kError:  // sent as the stream's status, never as a finish reason
      break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

std::string FinishReasonLabel(FinishReason reason) {
  return reason == FinishReason::kError ? "ERROR"
                                        : v1::FinishReason_Name(ToProtoFinishReason(reason));
}

}  // namespace strata
