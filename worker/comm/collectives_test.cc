// The conformance suite every Collectives implementation runs: the single rank, and shared-memory
// groups of 2 and 3 ranks as threads of this process and as forked processes.
#include "worker/comm/collectives.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "worker/comm/shm_collectives.h"

namespace strata {
namespace {

// Small slots, so that every collective below also runs in several operations.
constexpr int64_t kSlotBytes = 4096;
constexpr int64_t kSlotFloats = kSlotBytes / 4;

enum class Kind { kSingle, kThreads, kProcesses };

struct Setup {
  Kind kind;
  int world;
};

void PrintTo(const Setup& s, std::ostream* os) {
  *os << (s.kind == Kind::kSingle    ? "single"
          : s.kind == Kind::kThreads ? "threads"
                                     : "processes")
      << s.world;
}

// One rank's part of a test: OK, or what went wrong.
using RankFn = std::function<absl::Status(Collectives&)>;

#define EXPECT_OR_RETURN(cond, ...) \
  if (!(cond)) return absl::InternalError(absl::StrCat(__VA_ARGS__))

// Runs `fn` on every rank of a fresh group and returns each rank's result.
std::vector<absl::Status> RunGroup(const Setup& setup, const RankFn& fn) {
  if (setup.kind == Kind::kSingle) {
    SingleRankCollectives single;
    return {fn(single)};
  }
  absl::StatusOr<ShmGroup> group = ShmGroup::Create(setup.world, kSlotBytes);
  if (!group.ok()) return {group.status()};
  auto run_rank = [&](int rank) -> absl::Status {
    absl::StatusOr<std::unique_ptr<ShmCollectives>> c =
        ShmCollectives::Join(group->control_fd(), group->memory_fd(), rank, setup.world);
    if (!c.ok()) return c.status();
    absl::Status s = fn(**c);
    if (!s.ok()) (*c)->Abort(s.message());  // never leave the others waiting
    return s;
  };
  std::vector<absl::Status> results(setup.world);
  if (setup.kind == Kind::kThreads) {
    std::vector<std::thread> threads;
    for (int r = 0; r < setup.world; ++r) {
      threads.emplace_back([&, r] { results[r] = run_rank(r); });
    }
    for (auto& t : threads) t.join();
    return results;
  }
  // Processes: each rank forks and reports its status through a pipe.
  std::vector<std::pair<pid_t, int>> children;
  for (int r = 0; r < setup.world; ++r) {
    int fds[2];
    if (pipe(fds) != 0) return {absl::InternalError("pipe")};
    const pid_t pid = fork();
    if (pid == 0) {
      close(fds[0]);
      const absl::Status s = run_rank(r);
      const std::string text = s.ok() ? "" : s.ToString();
      (void)!write(fds[1], text.data(), text.size());
      _exit(s.ok() ? 0 : 1);
    }
    close(fds[1]);
    children.emplace_back(pid, fds[0]);
  }
  // A rank that fails (or crashes) must not leave the others waiting for it until the test times
  // out: this process aborts the group then, through a handle it never runs collectives on.
  auto observer = ShmCollectives::Join(group->control_fd(), group->memory_fd(), 0, setup.world);
  std::vector<int> statuses(setup.world, -1);
  for (int exited = 0; exited < setup.world; ++exited) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, 0);
    for (int r = 0; r < setup.world; ++r) {
      if (children[r].first == pid) statuses[r] = status;
    }
    if (status != 0 && observer.ok()) (*observer)->Abort("a rank's process failed");
  }
  for (int r = 0; r < setup.world; ++r) {
    std::string text;
    char buf[512];
    ssize_t n;
    while ((n = read(children[r].second, buf, sizeof(buf))) > 0) text.append(buf, n);
    close(children[r].second);
    const int status = statuses[r];
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
      results[r] = absl::OkStatus();
    } else {
      results[r] =
          absl::InternalError(absl::StrCat("rank ", r, " exited with status ", status, ": ", text));
    }
  }
  return results;
}

void ExpectAllOk(const std::vector<absl::Status>& results) {
  for (size_t r = 0; r < results.size(); ++r)
    EXPECT_TRUE(results[r].ok()) << r << ": " << results[r];
}

// A value that differs by rank and index and is not exactly representable in a short sum.
float Value(int rank, int64_t i, int salt = 0) {
  return std::sin(0.37f * (rank + 1) + 0.011f * i + 0.5f * salt) * (1 + rank);
}

class CollectivesTest : public ::testing::TestWithParam<Setup> {};

absl::Status CheckAllReduce(Collectives& c, int64_t count, int salt) {
  std::vector<float> data(count);
  for (int64_t i = 0; i < count; ++i) data[i] = Value(c.rank(), i, salt);
  std::vector<float> expected(count);
  for (int64_t i = 0; i < count; ++i) {
    float s = Value(0, i, salt);  // summed in rank order
    for (int r = 1; r < c.world_size(); ++r) s += Value(r, i, salt);
    expected[i] = s;
  }
  if (absl::Status s = c.AllReduceSum(data.data(), count); !s.ok()) return s;
  EXPECT_OR_RETURN(std::memcmp(data.data(), expected.data(), count * sizeof(float)) == 0, "rank ",
                   c.rank(), ": AllReduceSum of ", count, " floats differs");
  return absl::OkStatus();
}

TEST_P(CollectivesTest, AllReduceSumGivesEveryRankTheSameSumsInRankOrder) {
  ExpectAllOk(RunGroup(GetParam(), [](Collectives& c) -> absl::Status {
    for (int64_t count : {int64_t{0}, int64_t{1}, int64_t{17}, kSlotFloats - 1, kSlotFloats,
                          kSlotFloats + 1, 5 * kSlotFloats + 3}) {
      if (absl::Status s = CheckAllReduce(c, count, 0); !s.ok()) return s;
    }
    return absl::OkStatus();
  }));
}

absl::Status CheckAllGather(Collectives& c, int64_t count, int salt) {
  std::vector<float> in(count);
  for (int64_t i = 0; i < count; ++i) in[i] = Value(c.rank(), i, salt);
  std::vector<float> out(count * c.world_size(), std::nanf(""));
  if (absl::Status s = c.AllGather(in.data(), count, out.data()); !s.ok()) return s;
  for (int r = 0; r < c.world_size(); ++r) {
    for (int64_t i = 0; i < count; ++i) {
      EXPECT_OR_RETURN(out[r * count + i] == Value(r, i, salt), "rank ", c.rank(),
                       ": AllGather of ", count, " floats: element ", i, " of rank ", r);
    }
  }
  return absl::OkStatus();
}

TEST_P(CollectivesTest, AllGatherLaysOutEachRanksPartInRankOrder) {
  ExpectAllOk(RunGroup(GetParam(), [](Collectives& c) -> absl::Status {
    for (int64_t count : {int64_t{0}, int64_t{3}, kSlotFloats, 2 * kSlotFloats + 5}) {
      if (absl::Status s = CheckAllGather(c, count, 1); !s.ok()) return s;
    }
    return absl::OkStatus();
  }));
}

std::string Message(int64_t size, int salt) {
  std::string m(size, '\0');
  for (int64_t i = 0; i < size; ++i) m[i] = static_cast<char>((i * 131 + salt * 7) & 0xff);
  return m;
}

absl::Status CheckBroadcast(Collectives& c, int64_t size, int salt) {
  std::string bytes = c.rank() == 0 ? Message(size, salt) : "stale contents";
  if (absl::Status s = c.Broadcast(&bytes); !s.ok()) return s;
  EXPECT_OR_RETURN(bytes == Message(size, salt), "rank ", c.rank(), ": Broadcast of ", size,
                   " bytes arrived as ", bytes.size(), " different bytes");
  return absl::OkStatus();
}

TEST_P(CollectivesTest, BroadcastCarriesRankZerosBytesOfAnySize) {
  ExpectAllOk(RunGroup(GetParam(), [](Collectives& c) -> absl::Status {
    for (int64_t size :
         {int64_t{0}, int64_t{5}, kSlotBytes - 8, kSlotBytes - 7, 3 * kSlotBytes + 11}) {
      if (absl::Status s = CheckBroadcast(c, size, 2); !s.ok()) return s;
    }
    return absl::OkStatus();
  }));
}

// The runner's pattern: a plan, then reductions and gathers of varying sizes, many times over.
// Every rank draws the same sequence from one seed.
TEST_P(CollectivesTest, LongMixedSequencesStayInStep) {
  ExpectAllOk(RunGroup(GetParam(), [](Collectives& c) -> absl::Status {
    std::mt19937 rng(7);
    for (int i = 0; i < 600; ++i) {
      const int op = static_cast<int>(rng() % 3);
      const int64_t size = static_cast<int64_t>(rng() % (3 * kSlotFloats));
      absl::Status s = op == 0   ? CheckAllReduce(c, size, i)
                       : op == 1 ? CheckAllGather(c, size, i)
                                 : CheckBroadcast(c, size, i);
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  }));
}

TEST_P(CollectivesTest, SharedMemoryIsTheSameMemoryOnEveryRank) {
  ExpectAllOk(RunGroup(GetParam(), [](Collectives& c) -> absl::Status {
    constexpr int64_t kBytes = int64_t{3} << 20;
    if (c.world_size() == 1) {
      EXPECT_OR_RETURN(c.SharedMemory(kBytes).status().code() == absl::StatusCode::kUnimplemented,
                       "a single rank claims shared memory");
      return absl::OkStatus();
    }
    std::string go;
    if (c.rank() == 0) {
      absl::StatusOr<void*> mem = c.SharedMemory(kBytes);
      if (!mem.ok()) return mem.status();
      std::memset(*mem, 0x5a, kBytes);
      go = "mapped";
    }
    if (absl::Status s = c.Broadcast(&go); !s.ok()) return s;
    absl::StatusOr<void*> mem = c.SharedMemory(kBytes);
    if (!mem.ok()) return mem.status();
    EXPECT_OR_RETURN(
        c.SharedMemory(kBytes / 2).status().code() == absl::StatusCode::kFailedPrecondition,
        "a second size was accepted");
    auto* bytes = static_cast<unsigned char*>(*mem);
    // (Bytes at multiples of 4096 are the ranks' markers below, which faster ranks may have set.)
    EXPECT_OR_RETURN(bytes[1] == 0x5a && bytes[kBytes - 1] == 0x5a, "rank ", c.rank(),
                     " does not see rank 0's writes");
    bytes[c.rank() * 4096] = static_cast<unsigned char>(c.rank() + 1);
    float sync = 0;
    if (absl::Status s = c.AllReduceSum(&sync, 1); !s.ok()) return s;  // a barrier
    for (int r = 0; r < c.world_size(); ++r) {
      EXPECT_OR_RETURN(bytes[r * 4096] == r + 1, "rank ", c.rank(), " misses rank ", r, "'s write");
    }
    return absl::OkStatus();
  }));
}

TEST_P(CollectivesTest, AbortWakesTheOthersAndNamesTheReason) {
  if (GetParam().world == 1) GTEST_SKIP() << "a group of one never waits";
  const std::vector<absl::Status> results = RunGroup(GetParam(), [](Collectives& c) {
    float x = 1;
    absl::Status s = c.AllReduceSum(&x, 1);
    if (c.rank() == c.world_size() - 1) {
      if (!s.ok()) return s;
      c.Abort("weights failed to load");
      return absl::OkStatus();
    }
    // The others wait in the next collective until the abort wakes them. (A rank still on its way
    // out of the first one when the abort lands sees that one fail instead: an abort fails every
    // collective in progress.)
    if (s.ok()) s = c.AllReduceSum(&x, 1);
    EXPECT_OR_RETURN(s.code() == absl::StatusCode::kUnavailable, "rank ", c.rank(), " got ",
                     s.ToString());
    EXPECT_OR_RETURN(absl::StrContains(s.message(), absl::StrCat("rank ", c.world_size() - 1,
                                                                 ": weights failed to load")),
                     s.message());
    // And every later call fails at once.
    std::string bytes = "x";
    s = c.Broadcast(&bytes);
    EXPECT_OR_RETURN(s.code() == absl::StatusCode::kUnavailable, "after abort: ", s.ToString());
    return absl::OkStatus();
  });
  ExpectAllOk(results);
}

INSTANTIATE_TEST_SUITE_P(Implementations, CollectivesTest,
                         ::testing::Values(Setup{Kind::kSingle, 1}, Setup{Kind::kThreads, 2},
                                           Setup{Kind::kThreads, 3}, Setup{Kind::kProcesses, 2},
                                           Setup{Kind::kProcesses, 3}),
                         [](const ::testing::TestParamInfo<Setup>& info) {
                           std::ostringstream os;
                           PrintTo(info.param, &os);
                           return os.str();
                         });

TEST(ShmCollectivesTest, JoinRejectsWhatIsNotItsGroup) {
  absl::StatusOr<ShmGroup> group = ShmGroup::Create(2, kSlotBytes);
  ASSERT_TRUE(group.ok()) << group.status();
  auto c = ShmCollectives::Join(group->control_fd(), group->memory_fd(), 0, 3);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(c.status().message(), "has 2 ranks, not 3")) << c.status();
  c = ShmCollectives::Join(group->control_fd(), group->memory_fd(), 2, 2);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  // The memory descriptor is not a control segment.
  c = ShmCollectives::Join(group->memory_fd(), group->memory_fd(), 0, 2);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ShmGroup::Create(0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ShmGroup::Create(2, 1000).status().code(), absl::StatusCode::kInvalidArgument);
  // A group that was aborted cannot be joined.
  c = ShmCollectives::Join(group->control_fd(), group->memory_fd(), 0, 2);
  ASSERT_TRUE(c.ok()) << c.status();
  (*c)->Abort("rank 1 exited");
  EXPECT_TRUE(absl::StrContains((*c)->AbortReason(), "rank 1 exited"));
  auto late = ShmCollectives::Join(group->control_fd(), group->memory_fd(), 1, 2);
  EXPECT_EQ(late.status().code(), absl::StatusCode::kFailedPrecondition) << late.status();
}

TEST(ShmCollectivesTest, DescriptorsAreInheritableOnlyWhenAskedTo) {
  absl::StatusOr<ShmGroup> group = ShmGroup::Create(2, kSlotBytes);
  ASSERT_TRUE(group.ok());
  EXPECT_NE(fcntl(group->control_fd(), F_GETFD) & FD_CLOEXEC, 0);
  ASSERT_TRUE(group->SetInheritable(true).ok());
  EXPECT_EQ(fcntl(group->control_fd(), F_GETFD) & FD_CLOEXEC, 0);
  EXPECT_EQ(fcntl(group->memory_fd(), F_GETFD) & FD_CLOEXEC, 0);
  ASSERT_TRUE(group->SetInheritable(false).ok());
  EXPECT_NE(fcntl(group->control_fd(), F_GETFD) & FD_CLOEXEC, 0);
  EXPECT_NE(fcntl(group->memory_fd(), F_GETFD) & FD_CLOEXEC, 0);
}

}  // namespace
}  // namespace strata
