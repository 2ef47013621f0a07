#include "worker/server/follower_ranks.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/log.h"

namespace strata {

std::string DescribeWaitStatus(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exited with status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return absl::StrCat("was killed by signal ", WTERMSIG(status));
  return absl::StrCat("ended with wait status ", status);
}

absl::StatusOr<std::unique_ptr<FollowerRanks>> FollowerRanks::Start(
    const std::string& binary, const std::vector<std::string>& base_argv, int world_size,
    int control_fd, int memory_fd, std::function<void(const std::string&)> on_failure) {
  std::vector<pid_t> pids;
  const auto kill_started = [&pids] {
    for (pid_t pid : pids) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  };
  const pid_t parent = getpid();
  for (int rank = 1; rank < world_size; ++rank) {
    // Everything the child needs is built before fork: after it, only async-signal-safe calls.
    std::vector<std::string> argv = {
        base_argv.empty() ? binary : base_argv[0], absl::StrCat("--tp_rank=", rank),
        absl::StrCat("--tp_control_fd=", control_fd), absl::StrCat("--tp_memory_fd=", memory_fd)};
    if (!base_argv.empty()) argv.insert(argv.end(), base_argv.begin() + 1, base_argv.end());
    std::vector<char*> cargv;
    for (std::string& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    const pid_t pid = fork();
    if (pid < 0) {
      const int err = errno;
      kill_started();
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot start tensor-parallel rank ", rank, ": fork: ", std::strerror(err)));
    }
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(1);  // rank 0 died before the line above
      setpgid(0, 0);
      execv(binary.c_str(), cargv.data());
      _exit(127);
    }
    pids.push_back(pid);
  }
  return std::unique_ptr<FollowerRanks>(new FollowerRanks(std::move(pids), std::move(on_failure)));
}

FollowerRanks::FollowerRanks(std::vector<pid_t> pids,
                             std::function<void(const std::string&)> on_failure)
    : pids_(std::move(pids)), on_failure_(std::move(on_failure)) {
  {
    absl::MutexLock lock(&mu_);
    exit_status_.assign(pids_.size(), -1);
    num_running_ = static_cast<int>(pids_.size());
  }
  watcher_ = std::thread([this] { Watch(); });
}

void FollowerRanks::Watch() {
  bool reported = false;
  while (true) {
    for (size_t i = 0; i < pids_.size(); ++i) {
      {
        absl::MutexLock lock(&mu_);
        if (exit_status_[i] != -1) continue;
      }
      int status = 0;
      if (waitpid(pids_[i], &status, WNOHANG) != pids_[i]) continue;
      bool expected;
      {
        absl::MutexLock lock(&mu_);
        exit_status_[i] = status;
        --num_running_;
        // Status 0 is a follower that rank 0 stopped, whether or not Stop has been called yet.
        expected = stopping_ || status == 0;
      }
      const std::string what = absl::StrCat("tensor-parallel rank ", i + 1, " (pid ", pids_[i],
                                            ") ", DescribeWaitStatus(status));
      if (!expected && !reported) {
        reported = true;
        LOG(ERROR) << what;
        if (on_failure_) on_failure_(what);
      } else if (expected && status != 0) {
        LOG(WARNING) << what;
      }
    }
    bool stopping;
    {
      absl::MutexLock lock(&mu_);
      if (num_running_ == 0) return;
      stopping = stopping_;
    }
    absl::SleepFor(absl::Milliseconds(stopping ? 5 : 50));
  }
}

bool FollowerRanks::Stop(absl::Duration grace) {
  if (stopped_) return false;
  stopped_ = true;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    mu_.AwaitWithTimeout(absl::Condition(
                             +[](int* n) { return *n == 0; }, &num_running_),
                         grace);
    for (size_t i = 0; i < pids_.size(); ++i) {
      if (exit_status_[i] == -1) {
        LOG(WARNING) << "tensor-parallel rank " << i + 1 << " (pid " << pids_[i]
                     << ") did not stop; killing it";
        kill(pids_[i], SIGKILL);
      }
    }
  }
  watcher_.join();
  absl::MutexLock lock(&mu_);
  for (int status : exit_status_) {
    if (status != 0) return false;
  }
  return true;
}

FollowerRanks::~FollowerRanks() {
  if (!stopped_) Stop(absl::ZeroDuration());
}

}  // namespace strata
