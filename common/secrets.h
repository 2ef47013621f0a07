// Shared secrets between Strata's processes: compared in constant time, drawn from the kernel's
// random source, and read from files (a mounted Kubernetes Secret).
//
// The cluster secret (--cluster_secret_file on workers and coordinators): a worker given one
// answers its Worker service only to calls that carry it as the gRPC metadata
// kClusterSecretMetadata, so that nothing but the cluster's own coordinators can submit work to it
// around their API keys and limits. Its health service stays open (for probes).
//
// The file may hold more than one secret, one a line: callers send the first, workers accept any.
// Both read the file again every --cluster_secret_reload_s, so the secret rotates without a
// restart, in three edits each seen everywhere before the next (a Kubernetes Secret volume is
// updated in place within a minute or two). A worker counts the calls that carry a secret other
// than its file's first (strata_worker_calls_with_other_secret_total): it grows while coordinators
// and workers disagree on which secret comes first, so it stops growing once all have read the
// same file:
//   1. "OLD\nNEW": every worker accepts NEW while OLD is still sent;
//   2. "NEW\nOLD": the coordinators send NEW, OLD still accepted from those not yet moved;
//   3. "NEW".
// Replace the file whole (write another and rename it over): a reload that finds a file it cannot
// use keeps the secrets before. A secret is checked when a call starts: streams opened with a
// secret since removed (the coordinators' event watches) run on until they end.
#ifndef STRATA_COMMON_SECRETS_H_
#define STRATA_COMMON_SECRETS_H_

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/periodic.h"

namespace strata {

inline constexpr char kClusterSecretMetadata[] = "x-strata-cluster-secret";

// A secret's shape, for API keys and the cluster secret alike: 16 to 256 printable ASCII
// characters without spaces.
bool ValidSecret(absl::string_view s);

// known == given, in time that depends on known's length only (and given's, which its sender
// knows): neither where they differ nor the secret's length shows.
bool SecretsEqual(absl::string_view known, absl::string_view given);

// 64 hex digits from the kernel's random source.
std::string NewSecret();

// The secrets in the file at `path`, one a line (surrounding whitespace and blank lines left out),
// 1 to kMaxClusterSecrets of them, each 16 to 256 printable ASCII characters without spaces.
// NOT_FOUND or INVALID_ARGUMENT naming the file (and the line) otherwise.
inline constexpr int kMaxClusterSecrets = 4;
absl::StatusOr<std::vector<std::string>> LoadSecretFile(const std::string& path);

// The cluster secrets in force, from a file (above) that can be read again. Thread-safe: any thread
// may call Sent and Match while another reloads.
class ClusterSecret {
 public:
  // Reads `path`; errors as LoadSecretFile. Reloads every `reload` on a thread of its own when it
  // is positive (logging what changes and what fails).
  static absl::StatusOr<std::unique_ptr<ClusterSecret>> Open(const std::string& path,
                                                             absl::Duration reload);
  // Fixed secrets (for tests and tools); at least one.
  explicit ClusterSecret(std::vector<std::string> secrets);
  ~ClusterSecret();
  ClusterSecret(const ClusterSecret&) = delete;
  ClusterSecret& operator=(const ClusterSecret&) = delete;

  // The secret to send: the first.
  std::string Sent() const;
  // Which secret `given` is (0: the first), or -1 for none. Every secret is compared whole, so
  // the time tells neither which matched nor where a wrong one differs.
  int Match(absl::string_view given) const;
  // Reads the file again: OK with its secrets in force, or the error, those before staying.
  absl::Status Reload();

 private:
  ClusterSecret(std::string path, std::vector<std::string> secrets);
  void Watch(absl::Duration period);

  const std::string path_;
  mutable absl::Mutex mu_;
  std::vector<std::string> secrets_ ABSL_GUARDED_BY(mu_);
  absl::Mutex reload_mu_;  // one Reload at a time
  std::unique_ptr<PeriodicThread> watcher_;
};

// --cluster_secret_file and --cluster_secret_reload_s as the mains take them: nullptr for no file,
// else the secret opened (and watched).
absl::StatusOr<std::unique_ptr<ClusterSecret>> OpenClusterSecretFlag(const std::string& path,
                                                                     double reload_s);

}  // namespace strata

#endif  // STRATA_COMMON_SECRETS_H_
