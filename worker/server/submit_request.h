// Turning a strata.v1.SubmitRequest into an engine request, enforcing every limit that the API
// states (proto/strata/v1/worker.proto, common.proto). Errors are INVALID_ARGUMENT with a message
// that names the offending field as it is spelled in the proto, or NOT_FOUND for a model or
// fine-tune this worker does not serve.
#ifndef STRATA_WORKER_SERVER_SUBMIT_REQUEST_H_
#define STRATA_WORKER_SERVER_SUBMIT_REQUEST_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "grammar/structured_output.h"
#include "proto/strata/v1/common.pb.h"
#include "proto/strata/v1/worker.pb.h"
#include "worker/engine/engine.h"

namespace strata {

// What the worker serves, for validation.
struct SubmitLimits {
  std::string model_name;
  // The fine-tunes served (they may change while serving; null: none).
  const Engine* fine_tunes = nullptr;
  int64_t vocab_size = 0;
  // Prompt plus output, in tokens.
  int64_t max_context_tokens = 0;
  // Compiled structured-output grammars to reuse (null: compile each request's).
  GrammarCache* grammars = nullptr;
};

struct ParsedSubmit {
  std::string request_id;
  std::vector<int32_t> prompt;
  RequestOptions options;
  int32_t priority = 0;
  // SubmitRequest.kv_source_address: a worker to copy the prompt's missing KV blocks from.
  std::string kv_source_address;
};

absl::StatusOr<ParsedSubmit> ParseSubmitRequest(const v1::SubmitRequest& request,
                                                const SubmitLimits& limits);

// Engine request options from API sampling parameters (shared with the coordinator's validation).
// Field names in errors are prefixed with "sampling.".
absl::StatusOr<RequestOptions> ParseSamplingParams(const v1::SamplingParams& sampling,
                                                   int64_t vocab_size);

v1::FinishReason ToProtoFinishReason(FinishReason reason);
// The reason as metrics label it: the proto enum's name ("FINISH_REASON_EOS", ...), and "ERROR"
// for kError (which has none: it reaches the client as the stream's status).
std::string FinishReasonLabel(FinishReason reason);

}  // namespace strata

#endif  // STRATA_WORKER_SERVER_SUBMIT_REQUEST_H_
