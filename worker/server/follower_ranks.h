// FollowerRanks: the processes that run ranks 1 .. N-1 of a worker's tensor-parallel group.
//
// Rank 0 (the strata-worker an operator starts) starts them from its own binary with its own
// flags plus the rank and the group's descriptors, so one command starts a whole group. Each
// follower dies with rank 0 (PR_SET_PDEATHSIG) and runs in its own process group, so a terminal's
// Ctrl-C reaches rank 0 alone, which drains and then stops the followers. Rank 0 watches them from
// a thread: a follower exits 0 only when rank 0 told it to (ModelRunner::StopFollowers), and any
// other exit before Stop calls `on_failure` with a description ("tensor-parallel rank 1 (pid 123)
// was killed by signal 9"). The caller aborts the group, so the step in flight fails (the
// coordinator resumes its sequences elsewhere), and shuts the worker down for its supervisor to
// restart: a group missing a rank cannot serve.
//
// Thread contract: Start, Stop and the destructor from one thread; on_failure runs on the watcher
// thread, once at most.
#ifndef STRATA_WORKER_SERVER_FOLLOWER_RANKS_H_
#define STRATA_WORKER_SERVER_FOLLOWER_RANKS_H_

#include <sys/types.h>

#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace strata {

class FollowerRanks {
 public:
  // Starts ranks 1 .. world_size-1: `binary` with `argv` (the worker's own, argv[0] included) and
  // --tp_rank=R --tp_control_fd=C --tp_memory_fd=M right after argv[0] (so that a "--" among the
  // operator's arguments cannot turn them into positional ones). The descriptors must be
  // inheritable (ShmGroup::MakeInheritable). Call before starting other threads: fork is only
  // followed by async-signal-safe calls, but the earlier the better.
  static absl::StatusOr<std::unique_ptr<FollowerRanks>> Start(
      const std::string& binary, const std::vector<std::string>& argv, int world_size,
      int control_fd, int memory_fd, std::function<void(const std::string&)> on_failure);
  // Stops watching for failures and waits up to `grace` for the followers to exit (rank 0 has told
  // them to: ModelRunner::StopFollowers), then kills the rest. True when every one exited 0.
  bool Stop(absl::Duration grace);
  // Stop(zero) if not yet stopped.
  ~FollowerRanks();

  const std::vector<pid_t>& pids() const { return pids_; }

 private:
  FollowerRanks(std::vector<pid_t> pids, std::function<void(const std::string&)> on_failure);
  void Watch();

  const std::vector<pid_t> pids_;
  const std::function<void(const std::string&)> on_failure_;
  absl::Mutex mu_;
  // Per follower: its wait status once the watcher reaped it, else -1.
  std::vector<int> exit_status_ ABSL_GUARDED_BY(mu_);
  int num_running_ ABSL_GUARDED_BY(mu_) = 0;
  // Set by Stop: exits from then on are expected.
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool stopped_ = false;
  std::thread watcher_;
};

// "exited with status 3", "was killed by signal 9": what a wait status says.
std::string DescribeWaitStatus(int status);

}  // namespace strata

#endif  // STRATA_WORKER_SERVER_FOLLOWER_RANKS_H_
