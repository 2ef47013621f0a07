// Child processes for multi-process tests: real binaries started on ports they pick themselves,
// cleaned up when the test ends, also when it fails or crashes.
//
// Each child gets PR_SET_PDEATHSIG(SIGKILL), so it dies with the test process even on a crash or a
// timeout kill; the destructor stops it (SIGTERM, then SIGKILL after a grace period). Output goes
// to a log file under the test's output directory, which bazel keeps (test.outputs/).
#ifndef STRATA_TESTS_PROCESS_H_
#define STRATA_TESTS_PROCESS_H_

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace strata {

class ChildProcess {
 public:
  // Starts `argv[0]` with `argv`; stdout and stderr go to `log_path`.
  static absl::StatusOr<ChildProcess> Start(std::vector<std::string> argv,
                                            const std::string& log_path);
  // Not running.
  ChildProcess() = default;
  ChildProcess(ChildProcess&& other) noexcept;
  ChildProcess& operator=(ChildProcess&& other) noexcept;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess();

  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_path_; }
  // SIGTERM, then SIGKILL after `grace`; returns the wait status (-1 when not running). After
  // Terminate, no second SIGTERM (which servers take as "stop at once").
  int Stop(absl::Duration grace = absl::Seconds(10));
  // SIGTERM once, without waiting: several children then shut down side by side.
  void Terminate();
  // SIGKILL at once (a crash, as far as peers can tell).
  void Kill();
  // True while it has not exited.
  bool Running();
  // Waits for exit up to `timeout`; the wait status, or nullopt-like -1 on timeout.
  int Wait(absl::Duration timeout);

 private:
  ChildProcess(pid_t pid, std::string log_path) : pid_(pid), log_path_(std::move(log_path)) {}
  pid_t pid_ = -1;
  int status_ = -1;
  bool terminated_ = false;
  std::string log_path_;
};

// Waits until `path` holds a port number (written by a server's --port_file) and returns it.
// DEADLINE_EXCEEDED after `timeout`.
absl::StatusOr<int> WaitForPortFile(const std::string& path, absl::Duration timeout);

// A directory for logs and port files: $TEST_UNDECLARED_OUTPUTS_DIR, else $TEST_TMPDIR, else /tmp.
std::string TestOutputDir();

}  // namespace strata

#endif  // STRATA_TESTS_PROCESS_H_
