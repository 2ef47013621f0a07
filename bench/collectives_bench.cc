// collectives_bench: what CPU tensor parallelism pays per collective. Ranks run as forked
// processes over one ShmGroup, as a --tensor_parallel worker's do; rank 0 times each collective
// (every rank runs the same sequence).
//
//   bazel run -c opt //bench:collectives_bench -- [--ranks=2] [--reps=200]
//
// Prints, per size, the median microseconds of AllReduceSum and AllGather, and of Broadcast for
// the step-plan sizes, with the bytes per second that means, next to a plain memcpy of the same
// bytes in this process (the baseline: an all-reduce copies each byte in, reduces and copies out).
// A one-float all-reduce is the latency floor: two barriers.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "common/init.h"
#include "worker/comm/shm_collectives.h"

ABSL_FLAG(int, ranks, 2, "Ranks (processes) in the group.");
ABSL_FLAG(int, reps, 200, "Repetitions per size; the median is reported.");

namespace strata {
namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Bytes each collective moves per rank: a decode step's hidden state (1 token) of a 256-wide and a
// 4096-wide model, a 64-token batch, and prefill chunks of 512 tokens.
const std::vector<int64_t> kSizes = {4, 1 << 10, 16 << 10, 256 << 10, 1 << 20, 8 << 20};
const std::vector<int64_t> kPlanSizes = {256, 4 << 10, 64 << 10};

struct Row {
  std::string what;
  int64_t bytes;
  double us;
};

// Runs the whole sequence on one rank; rank 0 fills `rows`.
int RunRank(int rank, int ranks, const ShmGroup& group, std::vector<Row>* rows) {
  auto comm = ShmCollectives::Join(group.control_fd(), group.memory_fd(), rank, ranks);
  if (!comm.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, comm.status().ToString().c_str());
    return 1;
  }
  const int reps = absl::GetFlag(FLAGS_reps);
  std::vector<float> data(kSizes.back() / 4, 1.0f), out(kSizes.back() / 4 * ranks);
  auto time = [&](const std::string& what, int64_t bytes, auto&& fn) -> bool {
    std::vector<double> us;
    for (int i = 0; i < reps + 5; ++i) {
      const auto t0 = Clock::now();
      if (!fn()) return false;
      if (i >= 5)
        us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    }
    if (rows != nullptr) rows->push_back({what, bytes, Median(us)});
    return true;
  };
  for (int64_t bytes : kSizes) {
    const int64_t n = bytes / 4;
    if (!time("AllReduceSum", bytes, [&] { return (*comm)->AllReduceSum(data.data(), n).ok(); }) ||
        !time("AllGather", bytes,
              [&] { return (*comm)->AllGather(data.data(), n, out.data()).ok(); })) {
      return 1;
    }
  }
  for (int64_t bytes : kPlanSizes) {
    std::string plan(rank == 0 ? bytes : 0, 'p');
    if (!time("Broadcast", bytes, [&] { return (*comm)->Broadcast(&plan).ok(); })) return 1;
  }
  return 0;
}

double MemcpyUs(int64_t bytes) {
  std::vector<char> a(bytes, 1), b(bytes);
  std::vector<double> us;
  for (int i = 0; i < absl::GetFlag(FLAGS_reps); ++i) {
    const auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    a[i % bytes] = b[(i * 7) % bytes];
  }
  return Median(us);
}

int Main() {
  const int ranks = absl::GetFlag(FLAGS_ranks);
  auto group = ShmGroup::Create(ranks);
  if (!group.ok()) {
    std::fprintf(stderr, "%s\n", group.status().ToString().c_str());
    return 1;
  }
  std::vector<pid_t> pids;
  for (int r = 1; r < ranks; ++r) {
    const pid_t pid = fork();
    if (pid == 0) _exit(RunRank(r, ranks, *group, nullptr));
    pids.push_back(pid);
  }
  std::vector<Row> rows;
  int rc = RunRank(0, ranks, *group, &rows);
  for (pid_t pid : pids) {
    int status = 0;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) rc = 1;
  }
  std::printf("%d ranks (processes), %u cores, median of %d\n", ranks,
              std::max(1u, std::thread::hardware_concurrency()), absl::GetFlag(FLAGS_reps));
  std::printf("%-13s %10s %10s %10s %12s\n", "collective", "bytes", "us", "GB/s", "memcpy us");
  for (const Row& row : rows) {
    std::printf("%-13s %10lld %10.1f %10.2f %12.1f\n", row.what.c_str(),
                static_cast<long long>(row.bytes), row.us, row.bytes / row.us / 1e3,
                MemcpyUs(row.bytes));
  }
  return rc;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::InitProgram(argc, argv, "collectives_bench: CPU tensor-parallel collectives' cost");
  return strata::Main();
}
