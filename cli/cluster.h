// Cluster commands of stratactl: they talk gRPC to a running coordinator (--coordinator HOST:PORT,
// default $STRATA_COORDINATOR or 127.0.0.1:50051), with the API key in $STRATA_API_KEY when the
// coordinator asks for keys (--api_keys_file; status and drain want a tenant with "admin").
// Human-readable output by default, one JSON object with --json.
#ifndef STRATA_CLI_CLUSTER_H_
#define STRATA_CLI_CLUSTER_H_

#include <cstdio>

#include "absl/status/status.h"
#include "cli/args.h"
#include "grpcpp/client_context.h"

namespace strata {

// stratactl generate [--model NAME] (--prompt TEXT | --prompt-ids 1,2,3) [--max-tokens N]
//   [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S] [--stop STR]...
//   [--ignore-eos] [--logprobs K] [--cache-salt S] [--fine-tune ID] [--timeout-s N]
//   [--json]
// Streams the text as it is generated; with --json prints one object at the end.
absl::Status GenerateCommand(const Args& args, std::FILE* out);

// Adds $STRATA_API_KEY, when set, to a call as "authorization: Bearer KEY" metadata.
void AddApiKey(grpc::ClientContext* ctx);

// stratactl status [--json]: workers, their state, load and KV blocks per tier; models.
absl::Status StatusCommand(const Args& args, std::FILE* out);

// stratactl drain WORKER [--resume] [--wait] [--timeout-s N] [--json]
absl::Status DrainCommand(const Args& args, std::FILE* out);

}  // namespace strata

#endif  // STRATA_CLI_CLUSTER_H_
