// Process-level helpers for Strata's server binaries: termination signals and start-up files.
#ifndef STRATA_COMMON_PROCESS_H_
#define STRATA_COMMON_PROCESS_H_

#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace strata {

// Blocks SIGINT and SIGTERM in the calling thread and every thread it starts later, so that they
// are delivered only through WaitForTerminationSignal. Call first thing in main, before any thread
// exists.
void BlockTerminationSignals();
// Undoes it in the calling thread (and threads it starts later): SIGINT and SIGTERM terminate the
// process again.
void UnblockTerminationSignals();

// Waits up to `timeout` (forever when it is absl::InfiniteDuration()) for SIGINT or SIGTERM and
// returns the signal number, or 0 on timeout.
int WaitForTerminationSignal(absl::Duration timeout = absl::InfiniteDuration());

// Writes `contents` to `path` through a temporary file and a rename, so that a reader polling for
// the file never sees it half written.
absl::Status WriteFileAtomically(const std::string& path, const std::string& contents);

}  // namespace strata

#endif  // STRATA_COMMON_PROCESS_H_
