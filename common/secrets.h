// Shared secrets between Strata's processes: compared in constant time, drawn from the kernel's
// random source, and read from files (a mounted Kubernetes Secret).
//
// The cluster secret (--cluster_secret_file on workers and coordinators): a worker given one
// answers its Worker service only to calls that carry it as the gRPC metadata
// kClusterSecretMetadata, so that nothing but the cluster's own coordinators can submit work to it
// around their API keys and limits. Its health service stays open (for probes).
#ifndef STRATA_COMMON_SECRETS_H_
#define STRATA_COMMON_SECRETS_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace strata {

inline constexpr char kClusterSecretMetadata[] = "x-strata-cluster-secret";

// known == given, in time that depends on known's length only (and given's, which its sender
// knows): neither where they differ nor the secret's length shows.
bool SecretsEqual(absl::string_view known, absl::string_view given);

// 64 hex digits from the kernel's random source.
std::string NewSecret();

// The secret in the file at `path`: its text without surrounding whitespace, which must be 16 to
// 256 printable ASCII characters without spaces. NOT_FOUND or INVALID_ARGUMENT naming the file
// otherwise.
absl::StatusOr<std::string> LoadSecretFile(const std::string& path);

}  // namespace strata

#endif  // STRATA_COMMON_SECRETS_H_
