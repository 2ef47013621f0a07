// The disk tier beyond the common contract: damage on the media, device errors, recovery after a
// crash (kill -9 while writing), zero-copy image transfers with a host tier.
#include "memtier/disk_tier.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "memtier/host_tier.h"
#include "memtier/slot_format.h"
#include "tests/test_dir.h"

namespace strata {
namespace {

constexpr KvBlockLayout kLayout{4, 16, 2, 8};  // 4 KiB raw, 8 KiB slots

std::vector<uint8_t> Block(uint32_t seed, int64_t bytes = kLayout.block_bytes()) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> out(bytes);
  for (auto& b : out) b = static_cast<uint8_t>(rng());
  return out;
}

BlockKey KeyOf(uint64_t i) { return BlockKey{i * 1000003 + 17, 5}; }

DiskTierConfig Config(const std::string& dir, int64_t slots = 8) {
  DiskTierConfig c;
  c.path = dir + "/slots";
  c.num_slots = slots;
  c.codec = KvCodec(kLayout, KvCompression::kNone);
  c.queue_depth = 4;
  return c;
}

absl::Status WriteNow(DiskTier& t, int64_t slot, BlockKey key, const std::vector<uint8_t>& p) {
  absl::Status r = absl::InternalError("no callback");
  t.Write(slot, key, p, [&r](absl::Status s) { r = std::move(s); });
  t.Flush();
  return r;
}

absl::Status ReadNow(DiskTier& t, int64_t slot, BlockKey key, std::vector<uint8_t>* out) {
  out->assign(t.payload_bytes(), 0);
  absl::Status r = absl::InternalError("no callback");
  t.Read(slot, key, absl::MakeSpan(*out), [&r](absl::Status s) { r = std::move(s); });
  t.Flush();
  return r;
}

// Overwrites `n` bytes at `offset` of the file, bypassing the tier (bit rot, a torn write).
void Damage(const std::string& path, int64_t offset, size_t n, uint8_t value) {
  const int fd = open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  std::vector<uint8_t> bytes(n, value);
  ASSERT_EQ(pwrite(fd, bytes.data(), n, offset), static_cast<ssize_t>(n));
  fsync(fd);
  close(fd);
}

TEST(DiskTierTest, DamagedSlotsAreMissesAndCountedAtReadAndAtRecovery) {
  const std::string dir = FreshTestDir();
  DiskTierConfig config = Config(dir);
  int64_t slot_bytes;
  {
    auto t = DiskTier::Open(config);
    ASSERT_TRUE(t.ok()) << t.status();
    slot_bytes = (*t)->slot_bytes();
    for (int64_t s = 0; s < 4; ++s) ASSERT_TRUE(WriteNow(**t, s, KeyOf(s), Block(s)).ok());
    // Bit rot in slot 1's payload, found when read.
    Damage(config.path, slot_bytes * 1 + kSlotHeaderBytes + 100, 1, 0x5A);
    std::vector<uint8_t> out;
    EXPECT_TRUE(absl::IsDataLoss(ReadNow(**t, 1, KeyOf(1), &out)));
    EXPECT_EQ((*t)->stats().corrupt_reads, 1);
    ASSERT_TRUE(ReadNow(**t, 0, KeyOf(0), &out).ok());
    EXPECT_EQ(out, Block(0));
  }
  // A torn header (slot 2) and a payload cut short (slot 3: its second half never reached disk).
  Damage(config.path, slot_bytes * 2 + 20, 8, 0);
  Damage(config.path, slot_bytes * 3 + kSlotHeaderBytes + 2048, 2048, 0);
  auto t = DiskTier::Open(config);
  ASSERT_TRUE(t.ok());
  // Slot 2's header fails its checksum; slots 1 and 3 have good headers (the payload checksum is
  // checked when they are read).
  EXPECT_EQ((*t)->stats().invalid_slots, 1);
  std::vector<int64_t> found;
  for (const StoredSlot& s : (*t)->Scan()) found.push_back(s.slot);
  EXPECT_EQ(found, (std::vector<int64_t>{0, 1, 3}));
  std::vector<uint8_t> out;
  EXPECT_TRUE(absl::IsDataLoss(ReadNow(**t, 3, KeyOf(3), &out)));
  EXPECT_TRUE(ReadNow(**t, 0, KeyOf(0), &out).ok());
}

TEST(DiskTierTest, TheNewestCopyOfABlockWinsAtRecovery) {
  const std::string dir = FreshTestDir();
  DiskTierConfig config = Config(dir);
  {
    auto t = DiskTier::Open(config);
    ASSERT_TRUE(t.ok());
    ASSERT_TRUE(WriteNow(**t, 5, KeyOf(1), Block(1)).ok());
    ASSERT_TRUE(WriteNow(**t, 2, KeyOf(1), Block(1)).ok());  // later generation
    ASSERT_TRUE(WriteNow(**t, 6, KeyOf(2), Block(2)).ok());
  }
  auto t = DiskTier::Open(config);
  ASSERT_TRUE(t.ok());
  const std::vector<StoredSlot> found = (*t)->Scan();
  ASSERT_EQ(found.size(), 2u);
  EXPECT_EQ(found[0].slot, 2);
  EXPECT_EQ(found[0].key, KeyOf(1));
  EXPECT_EQ(found[1].slot, 6);
  // Generations continue past what was found.
  ASSERT_TRUE(WriteNow(**t, 5, KeyOf(3), Block(3)).ok());
  t->reset();
  t = DiskTier::Open(config);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ((*t)->Scan().size(), 3u);
  // Without recovery the old contents are ignored.
  config.recover = false;
  t->reset();
  t = DiskTier::Open(config);
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE((*t)->Scan().empty());
}

TEST(DiskTierTest, OneProcessPerFile) {
  const std::string dir = FreshTestDir();
  DiskTierConfig config = Config(dir);
  auto first = DiskTier::Open(config);
  ASSERT_TRUE(first.ok());
  // flock locks belong to open file descriptions: a second open conflicts even in one process.
  auto second = DiskTier::Open(config);
  EXPECT_TRUE(absl::IsFailedPrecondition(second.status())) << second.status();
  first->reset();
  EXPECT_TRUE(DiskTier::Open(config).ok());
}

TEST(DiskTierTest, OtherEncodingsAreNotRecovered) {
  const std::string dir = FreshTestDir();
  DiskTierConfig config = Config(dir);
  {
    auto t = DiskTier::Open(config);
    ASSERT_TRUE(t.ok());
    ASSERT_TRUE(WriteNow(**t, 0, KeyOf(0), Block(0)).ok());
  }
  // Reopened with another head size, whose slots are as large: the old block is not offered.
  config.codec = KvCodec(KvBlockLayout{4, 16, 2, 9}, KvCompression::kNone);
  auto t = DiskTier::Open(config);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE((*t)->Scan().empty());
  EXPECT_EQ((*t)->stats().invalid_slots, 1);
}

TEST(DiskTierTest, DeviceErrorsFailTheOperationAndTheTierGoesOn) {
  const std::string dir = FreshTestDir();
  DiskTierConfig config = Config(dir);
  std::atomic<int> fail_next{0};
  config.fault_injector = [&fail_next](bool, int64_t) { return fail_next.exchange(0); };
  auto t = DiskTier::Open(config);
  ASSERT_TRUE(t.ok());
  fail_next = -EIO;
  absl::Status s = WriteNow(**t, 0, KeyOf(0), Block(0));
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_NE(s.message().find("slot 0"), std::string::npos) << s;
  fail_next = -ENOSPC;
  s = WriteNow(**t, 1, KeyOf(1), Block(1));
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  ASSERT_TRUE(WriteNow(**t, 1, KeyOf(1), Block(1)).ok());
  fail_next = -EIO;
  std::vector<uint8_t> out;
  EXPECT_TRUE(absl::IsUnavailable(ReadNow(**t, 1, KeyOf(1), &out)));
  EXPECT_TRUE(ReadNow(**t, 1, KeyOf(1), &out).ok());
  EXPECT_EQ(out, Block(1));
  EXPECT_EQ((*t)->stats().io_errors, 3);
}

// io_uring itself failing (injected where the I/O thread waits for completions): every operation
// accepted before, in flight or queued, and every one after, completes with UNAVAILABLE; none is
// lost, nothing crashes, and the tier closes cleanly.
TEST(DiskTierTest, ARingFailureFailsEveryOperationAndTheProcessGoesOn) {
  const std::string dir = FreshTestDir();
  DiskTierConfig config = Config(dir);
  std::atomic<bool> fail_ring{false};
  config.ring_fault_injector = [&fail_ring] {
    return fail_ring ? absl::UnavailableError("injected: io_uring_enter: Bad file descriptor")
                     : absl::OkStatus();
  };
  auto t = DiskTier::Open(config);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE(WriteNow(**t, 0, KeyOf(0), Block(0)).ok());
  fail_ring = true;
  // More operations than the queue depth (4), so some are queued behind the ones in the ring.
  constexpr int kOps = 7;
  std::vector<absl::Status> results(kOps, absl::InternalError("no callback"));
  std::vector<std::vector<uint8_t>> payloads, outs(kOps);
  for (int i = 0; i < kOps; ++i) payloads.push_back(Block(100 + i));
  for (int i = 0; i < kOps; ++i) {
    auto done = [&results, i](absl::Status s) { results[i] = std::move(s); };
    if (i % 2 == 0) {
      (*t)->Write(1 + i, KeyOf(1 + i), payloads[i], done);
    } else {
      outs[i].assign((*t)->payload_bytes(), 0);
      (*t)->Read(0, KeyOf(0), absl::MakeSpan(outs[i]), done);
    }
  }
  (*t)->Flush();
  EXPECT_EQ((*t)->in_flight(), 0);
  for (int i = 0; i < kOps; ++i) {
    EXPECT_TRUE(absl::IsUnavailable(results[i])) << "operation " << i << ": " << results[i];
    EXPECT_NE(results[i].message().find("io_uring failed"), std::string::npos) << results[i];
  }
  // From now on everything fails at once, even with the injection gone (the ring is closed).
  fail_ring = false;
  std::vector<uint8_t> out;
  EXPECT_TRUE(absl::IsUnavailable(ReadNow(**t, 0, KeyOf(0), &out)));
  EXPECT_TRUE(absl::IsUnavailable(WriteNow(**t, 2, KeyOf(2), Block(2))));
  EXPECT_EQ((*t)->stats().io_errors, kOps + 2);
  t->reset();  // closes without waiting forever
  // What was written before the failure is still on disk.
  DiskTierConfig again = Config(dir);
  auto reopened = DiskTier::Open(again);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  ASSERT_TRUE(ReadNow(**reopened, 0, KeyOf(0), &out).ok());
  EXPECT_EQ(out, Block(0));
}

TEST(DiskTierTest, ImagesMoveToAndFromARegisteredHostPool) {
  const std::string dir = FreshTestDir();
  HostTierConfig hc;
  hc.codec = KvCodec(kLayout, KvCompression::kInt8);
  hc.num_slots = 4;
  auto host = HostTier::Create(hc);
  ASSERT_TRUE(host.ok());
  DiskTierConfig config = Config(dir);
  config.codec = hc.codec;
  config.registered_region = (*host)->region();
  auto disk = DiskTier::Open(config);
  ASSERT_TRUE(disk.ok());
  EXPECT_TRUE((*disk)->stats().fixed_buffers);
  std::vector<uint8_t> raw(kLayout.block_bytes());
  {
    std::vector<float> f(raw.size() / 4);
    for (size_t i = 0; i < f.size(); ++i) f[i] = std::sin(static_cast<float>(i));
    std::memcpy(raw.data(), f.data(), raw.size());
  }
  (*host)->Write(0, KeyOf(9), raw, [](absl::Status s) { ASSERT_TRUE(s.ok()); });
  (*host)->Flush();
  absl::Status w, r;
  (*disk)->WriteImage(3, (*host)->image(0), [&w](absl::Status s) { w = std::move(s); });
  (*disk)->Flush();
  ASSERT_TRUE(w.ok()) << w;
  // Into another host slot, then decoded from there: the same bytes as the first copy.
  (*disk)->ReadImage(3, KeyOf(9), (*host)->image(2), [&r](absl::Status s) { r = std::move(s); });
  (*disk)->Flush();
  ASSERT_TRUE(r.ok()) << r;
  std::vector<uint8_t> a(raw.size()), b(raw.size());
  (*host)->Read(0, KeyOf(9), absl::MakeSpan(a), [](absl::Status s) { ASSERT_TRUE(s.ok()); });
  (*host)->Read(2, KeyOf(9), absl::MakeSpan(b), [](absl::Status s) { ASSERT_TRUE(s.ok()); });
  (*host)->Flush();
  EXPECT_EQ(a, b);
  // The wrong key is refused, and the image from an unregistered buffer goes through staging.
  (*disk)->ReadImage(3, KeyOf(8), (*host)->image(1), [&r](absl::Status s) { r = std::move(s); });
  (*disk)->Flush();
  EXPECT_TRUE(absl::IsDataLoss(r));
  std::vector<uint8_t> loose((*disk)->slot_bytes());
  (*disk)->ReadImage(3, KeyOf(9), absl::MakeSpan(loose),
                     [&r](absl::Status s) { r = std::move(s); });
  (*disk)->Flush();
  ASSERT_TRUE(r.ok()) << r;
  EXPECT_EQ(0, std::memcmp(loose.data(), (*host)->image(2).data(), loose.size()));
}

// A child process writes blocks as fast as it can and is killed with SIGKILL mid-stream. On
// reopening, every slot is either a verified copy of what was written there or a miss.
TEST(DiskTierTest, KillDuringWritesLeavesOnlyVerifiedBlocksOrMisses) {
  const std::string dir = FreshTestDir();
  constexpr KvBlockLayout kBig{8, 64, 8, 64};  // 1 MiB raw: writes take long enough to be torn
  constexpr int64_t kSlots = 16;
  DiskTierConfig config = Config(dir, kSlots);
  config.codec = KvCodec(kBig, KvCompression::kNone);
  config.queue_depth = 8;
  int pipefd[2];
  ASSERT_EQ(pipe(pipefd), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(pipefd[0]);
    auto t = DiskTier::Open(config);
    if (!t.ok()) _exit(2);
    std::vector<std::vector<uint8_t>> blocks;
    for (uint32_t i = 0; i < 8; ++i) blocks.push_back(Block(i, kBig.block_bytes()));
    bool signalled = false;
    for (uint64_t n = 0;; ++n) {
      // Block n goes to slot n % kSlots, content blocks[n % 8], key n.
      (*t)->Write(static_cast<int64_t>(n % kSlots), KeyOf(n), blocks[n % 8], [](absl::Status) {});
      while ((*t)->in_flight() >= 8) (*t)->Poll();
      if (!signalled && n == 3 * kSlots) {
        (*t)->Flush();
        const char c = 'w';
        if (write(pipefd[1], &c, 1) != 1) _exit(3);
        signalled = true;
      }
    }
  }
  close(pipefd[1]);
  char c;
  ASSERT_EQ(read(pipefd[0], &c, 1), 1);  // every slot written at least once
  usleep(50 * 1000);
  ASSERT_EQ(kill(child, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status));
  close(pipefd[0]);

  auto t = DiskTier::Open(config);
  ASSERT_TRUE(t.ok()) << t.status();
  const std::vector<StoredSlot> found = (*t)->Scan();
  EXPECT_GE(found.size(), static_cast<size_t>(kSlots) - 8);  // at most 8 writes were in flight
  int verified = 0, misses = 0;
  for (const StoredSlot& s : found) {
    const uint64_t n = (s.key.hash - 17) / 1000003;
    ASSERT_EQ(s.key, KeyOf(n));
    ASSERT_EQ(static_cast<int64_t>(n % kSlots), s.slot);
    std::vector<uint8_t> out;
    absl::Status st = ReadNow(**t, s.slot, s.key, &out);
    if (st.ok()) {
      ASSERT_EQ(out, Block(static_cast<uint32_t>(n % 8), kBig.block_bytes())) << "slot " << s.slot;
      ++verified;
    } else {
      ASSERT_TRUE(absl::IsDataLoss(st)) << st;
      ++misses;
    }
  }
  EXPECT_GT(verified, 0);
  RecordProperty("verified", verified);
  RecordProperty("torn", misses + static_cast<int>((*t)->stats().invalid_slots));
}

}  // namespace
}  // namespace strata
