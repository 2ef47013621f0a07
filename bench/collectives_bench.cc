// collectives_bench: what CPU tensor parallelism pays per collective. Ranks run as forked
// processes over one ShmGroup, as a --tensor_parallel worker's do; rank 0 times each collective
// (every rank runs the same sequence).
//
//   bazel run -c opt //bench:collectives_bench -- [--ranks=2] [--reps=200]
//
// Prints, per size, the median microseconds of AllReduceSum and AllGather, and of Broadcast for
// the step-plan sizes, with the bytes per second that means, next to one copy of the same bytes in
// this process (the baseline: an all-reduce copies each byte in, reduces and copies out). A
// one-float all-reduce is the latency floor: two barriers. Then glibc's memcpy against CopyBytes,
// at a source/destination skew that is slow on AMD Zen 3/4 with glibc < 2.39 and at one that is
// not.
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
#include "bench/stats.h"
#include "common/copy.h"
#include "common/init.h"
#include "worker/comm/shm_collectives.h"

ABSL_FLAG(int, ranks, 2, "Ranks (processes) in the group.");
ABSL_FLAG(int, reps, 200, "Repetitions per size; the median is reported.");

namespace strata {
namespace {

using Clock = std::chrono::steady_clock;

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

// Median microseconds of copying `bytes` with `copy` to a destination `skew` bytes past the
// source modulo 4 KiB (in one 64 MiB mapping, 32 MiB apart).
template <typename Copy>
double CopyUs(int64_t bytes, int64_t skew, Copy copy) {
  static std::vector<char> buffer(int64_t{64} << 20, 1);
  char* src = buffer.data() + (4096 - reinterpret_cast<uintptr_t>(buffer.data()) % 4096);
  char* dst = src + (int64_t{32} << 20) + skew;
  std::vector<double> us;
  for (int i = 0; i < absl::GetFlag(FLAGS_reps); ++i) {
    const auto t0 = Clock::now();
    copy(dst, src, bytes);
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  return Median(us);
}

void Memcpy(char* dst, const char* src, int64_t n) { std::memcpy(dst, src, n); }
void Copy(char* dst, const char* src, int64_t n) { CopyBytes(dst, src, n); }

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
  std::printf("%-13s %10s %10s %10s %10s\n", "collective", "bytes", "us", "GB/s", "copy us");
  for (const Row& row : rows) {
    std::printf("%-13s %10lld %10.1f %10.2f %10.1f\n", row.what.c_str(),
                static_cast<long long>(row.bytes), row.us, row.bytes / row.us / 1e3,
                CopyUs(row.bytes, 0, Copy));
  }
  // glibc's memcpy against CopyBytes where the destination is 16 bytes past the source modulo
  // 4 KiB, and where it is not (common/copy.h).
  std::printf("\n%10s %16s %16s %16s %16s\n", "bytes", "memcpy GB/s", "CopyBytes GB/s",
              "memcpy +16 GB/s", "CopyBytes +16");
  for (int64_t bytes : {int64_t{4} << 10, int64_t{64} << 10, int64_t{256} << 10, int64_t{1} << 20,
                        int64_t{4} << 20}) {
    const auto rate = [bytes](double us) { return bytes / us / 1e3; };
    std::printf("%10lld %16.1f %16.1f %16.1f %16.1f\n", static_cast<long long>(bytes),
                rate(CopyUs(bytes, 0, Memcpy)), rate(CopyUs(bytes, 0, Copy)),
                rate(CopyUs(bytes, 16, Memcpy)), rate(CopyUs(bytes, 16, Copy)));
  }
  return rc;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::InitProgram(argc, argv, "collectives_bench: CPU tensor-parallel collectives' cost");
  return strata::Main();
}
