// Cluster commands of stratactl: they talk gRPC to a running coordinator (--coordinator HOST:PORT,
// default $STRATA_COORDINATOR or 127.0.0.1:50051), with the API key in $STRATA_API_KEY when the
// coordinator asks for keys (--api_keys_file; status and drain want a tenant with "admin").
// Human-readable output by default, one JSON object with --json.
//
// TLS: --tls-ca FILE (the CA bundle that verifies the coordinator; "system" for the system's),
// --tls-cert FILE and --tls-key FILE (a client certificate, for a coordinator that asks for one),
// --tls-server-name NAME (the name its certificate carries, when not the host dialled); each also
// from $STRATA_TLS_CA, $STRATA_TLS_CERT, $STRATA_TLS_KEY, $STRATA_TLS_SERVER_NAME.
#ifndef STRATA_CLI_CLUSTER_H_
#define STRATA_CLI_CLUSTER_H_

#include <cstdio>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cli/args.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"

namespace strata {

// stratactl generate [--model NAME] (--prompt TEXT | --prompt-ids 1,2,3) [--max-tokens N]
//   [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S] [--stop STR]...
//   [--ignore-eos] [--logprobs K] [--cache-salt S] [--fine-tune ID] [--timeout-s N]
//   [--json]
// Streams the text as it is generated; with --json prints one object at the end.
absl::Status GenerateCommand(const Args& args, std::FILE* out);

// A channel to the coordinator at `target` with the TLS flags (or environment) of `args`.
// INVALID_ARGUMENT naming the flag for unusable TLS files.
absl::StatusOr<std::shared_ptr<grpc::Channel>> CoordinatorChannel(const Args& args,
                                                                  const std::string& target);

// Adds $STRATA_API_KEY, when set, to a call as "authorization: Bearer KEY" metadata.
void AddApiKey(grpc::ClientContext* ctx);

// stratactl status [--json]: workers, their state, load and KV blocks per tier; models.
absl::Status StatusCommand(const Args& args, std::FILE* out);

// stratactl drain WORKER [--resume] [--wait] [--timeout-s N] [--json]
absl::Status DrainCommand(const Args& args, std::FILE* out);

}  // namespace strata

#endif  // STRATA_CLI_CLUSTER_H_
