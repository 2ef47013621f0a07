#include "coordinator/serial_writer.h"

#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

// A connected pair of stream sockets, the writing side's send buffer small, so that writes are
// partial and the writers queue behind each other.
struct Pair {
  int w = -1, r = -1;
  Pair() {
    int fds[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
    w = fds[0];
    r = fds[1];
    const int small = 4096;
    ::setsockopt(w, SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
  }
  ~Pair() {
    if (w >= 0) ::close(w);
    if (r >= 0) ::close(r);
  }
};

// Reads until `bytes` have come (or the peer closed).
std::string ReadAll(int fd, size_t bytes) {
  std::string out;
  char buf[8192];
  while (out.size() < bytes) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

// Records appended by eight threads reach the socket whole, in the order their fills ran: each
// fill numbers its record from a counter only fills touch (under the writer's lock), so the
// stream must read 0, 1, 2, ... and each thread's own records must keep its order.
TEST(SerialWriterTest, ManyThreadsWriteWholeRecordsInFillOrder) {
  Pair p;
  std::atomic<int> failures{0};
  SerialWriter writer(p.w, -1, absl::Seconds(30), [&] { failures.fetch_add(1); });
  constexpr int kThreads = 8, kPerThread = 1500;
  int64_t next = 0;  // only fills touch it
  std::string got;
  std::thread reader([&] { got = ReadAll(p.r, SIZE_MAX); });
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        // Records of different lengths: a torn or interleaved one shows.
        EXPECT_TRUE(writer.Append([&](std::string* out) {
          absl::StrAppend(out, next++, " ", t, " ", i, " ", std::string(i % 37, 'x'), "\n");
        }));
      }
    });
  }
  for (std::thread& t : threads) t.join();
  ::shutdown(p.w, SHUT_WR);
  reader.join();
  EXPECT_EQ(failures.load(), 0);
  std::vector<int> last(kThreads, -1);
  int64_t expect = 0;
  for (absl::string_view line : absl::StrSplit(got, '\n', absl::SkipEmpty())) {
    const std::vector<absl::string_view> f = absl::StrSplit(line, ' ');
    ASSERT_EQ(f.size(), 4u) << line;
    int64_t seq = 0;
    int t = 0, i = 0;
    ASSERT_TRUE(absl::SimpleAtoi(f[0], &seq) && absl::SimpleAtoi(f[1], &t) &&
                absl::SimpleAtoi(f[2], &i))
        << line;
    ASSERT_EQ(seq, expect++) << "records out of their fills' order";
    ASSERT_EQ(i, last[t] + 1) << "thread " << t << "'s records out of order";
    ASSERT_EQ(f[3], std::string(i % 37, 'x'));
    last[t] = i;
  }
  EXPECT_EQ(expect, int64_t{kThreads} * kPerThread);
}

// Far more than kMaxPendingBytes from four threads while the reader is slow: the appenders wait
// for room instead of buffering without bound, and everything arrives.
TEST(SerialWriterTest, SlowReaderHoldsTheAppendersBack) {
  Pair p;
  SerialWriter writer(p.w, -1, absl::Seconds(30), [] {});
  constexpr int kThreads = 4, kChunks = 6;
  const std::string chunk(size_t{1} << 20, 'a');  // 24 MiB in all
  std::atomic<size_t> most_pending{0};
  std::string got;
  std::thread reader([&] {
    absl::SleepFor(absl::Milliseconds(200));  // let the pending bytes pile up first
    got = ReadAll(p.r, size_t{kThreads} * kChunks * chunk.size());
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kChunks; ++i) {
        ASSERT_TRUE(writer.Append([&](std::string* out) {
          out->append(chunk);
          size_t seen = most_pending.load();
          while (out->size() > seen && !most_pending.compare_exchange_weak(seen, out->size())) {
          }
        }));
      }
    });
  }
  for (std::thread& t : threads) t.join();
  reader.join();
  EXPECT_EQ(got.size(), size_t{kThreads} * kChunks * chunk.size());
  EXPECT_EQ(got.find_first_not_of('a'), std::string::npos);
  // A fill ran only with room: under the limit before it, one chunk more after.
  EXPECT_LT(most_pending.load(), SerialWriter::kMaxPendingBytes + chunk.size());
}

// A client that keeps reading, slowly, is served however long the whole batch takes: the write
// timeout (0.5 s) applies to each 64 KiB slice (well under 0.1 s at this pace), not to the 2 MiB
// batch (over 1.2 s: reads of at most 8 KiB through the 4 KiB send buffer, 5 ms apart).
TEST(SerialWriterTest, ASlowButSteadyReaderIsNotCutOff) {
  Pair p;
  std::atomic<int> failures{0};
  SerialWriter writer(p.w, -1, absl::Milliseconds(500), [&] { failures.fetch_add(1); });
  const std::string batch(size_t{2} << 20, 'b');
  std::string got;
  std::thread reader([&] {
    char buf[8 << 10];
    while (got.size() < batch.size()) {
      const ssize_t n = ::read(p.r, buf, sizeof(buf));
      if (n <= 0) break;
      got.append(buf, static_cast<size_t>(n));
      absl::SleepFor(absl::Milliseconds(5));
    }
  });
  EXPECT_TRUE(writer.Append([&](std::string* out) { out->append(batch); }));
  reader.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(got.size(), batch.size());
}

// The peer goes away: the write fails, on_failure runs once whatever the number of threads, and
// every Append after is refused without running its fill.
TEST(SerialWriterTest, AFailedWriteRefusesEveryAppendAfterIt) {
  Pair p;
  ::close(p.r);
  p.r = -1;
  std::atomic<int> failures{0};
  SerialWriter writer(p.w, -1, absl::Seconds(30), [&] { failures.fetch_add(1); });
  std::atomic<int> refused{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 50; ++i) {
        if (!writer.Append([](std::string* out) { out->append(1000, 'z'); })) {
          refused.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures.load(), 1);
  EXPECT_GT(refused.load(), 0);
  bool ran = false;
  EXPECT_FALSE(writer.Append([&](std::string*) { ran = true; }));
  EXPECT_FALSE(ran);
}

}  // namespace
}  // namespace strata
