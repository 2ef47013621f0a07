// The disk tier's I/O path on a real file: O_DIRECT, io_uring, registered buffers.
#include "memtier/io_ring.h"

#include <errno.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "memtier/slot_format.h"

namespace strata {
namespace {

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
}

TEST(IoRingTest, SlotsWrittenAndReadBackAtQueueDepth) {
  constexpr int kSlots = 64;
  constexpr int64_t kSlotBytes = 64 << 10;
  constexpr unsigned kDepth = 16;
  auto file = SlotFile::Open(TempPath("slots"), kSlots, kSlotBytes);
  ASSERT_TRUE(file.ok()) << file.status();
  // One registered buffer per queue slot, for writes and then for reads.
  std::vector<AlignedBuffer> buffers;
  std::vector<iovec> iov;
  for (unsigned i = 0; i < kDepth; ++i) {
    auto b = AlignedBuffer::Create(kSlotBytes);
    ASSERT_TRUE(b.ok());
    iov.push_back({b->data(), b->size()});
    buffers.push_back(*std::move(b));
  }
  auto ring = IoRing::Create(kDepth, iov);
  ASSERT_TRUE(ring.ok()) << ring.status();
  auto payload = [](int slot) {
    std::vector<uint8_t> p(kSlotBytes - kSlotHeaderBytes - 100);
    for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<uint8_t>(i + slot * 13);
    return p;
  };
  // Write every slot, kDepth at a time, in batches.
  for (int base = 0; base < kSlots; base += kDepth) {
    for (unsigned k = 0; k < kDepth; ++k) {
      const int slot = base + static_cast<int>(k);
      SlotHeader h;
      h.block_hash = 1000 + slot;
      ASSERT_TRUE(EncodeSlot(h, payload(slot), buffers[k].span()).ok());
      ASSERT_TRUE((*ring)
                      ->QueueWrite(file->fd(), static_cast<int>(k), buffers[k].data(), kSlotBytes,
                                   file->SlotOffset(slot), slot)
                      .ok());
    }
    EXPECT_EQ((*ring)->QueueWrite(file->fd(), 0, buffers[0].data(), kSlotBytes, 0, 999).code(),
              absl::StatusCode::kResourceExhausted);
    ASSERT_TRUE((*ring)->Submit().ok());
    auto done = (*ring)->Reap(kDepth);
    ASSERT_TRUE(done.ok());
    ASSERT_EQ(done->size(), kDepth);
    for (const auto& c : *done) EXPECT_EQ(c.result, kSlotBytes) << "slot " << c.tag;
  }
  // Read them back in reverse order and verify each one.
  for (int base = kSlots - static_cast<int>(kDepth); base >= 0; base -= kDepth) {
    for (unsigned k = 0; k < kDepth; ++k) {
      memset(buffers[k].data(), 0xAB, kSlotBytes);  // poison
      ASSERT_TRUE((*ring)
                      ->QueueRead(file->fd(), static_cast<int>(k), buffers[k].data(), kSlotBytes,
                                  file->SlotOffset(base + k), k)
                      .ok());
    }
    auto done = (*ring)->Reap(kDepth);
    ASSERT_TRUE(done.ok());
    ASSERT_EQ(done->size(), kDepth);
    for (const auto& c : *done) {
      ASSERT_EQ(c.result, kSlotBytes);
      const int slot = base + static_cast<int>(c.tag);
      absl::StatusOr<SlotHeader> h = ValidateSlot(buffers[c.tag].span());
      ASSERT_TRUE(h.ok()) << "slot " << slot << ": " << h.status();
      EXPECT_EQ(h->block_hash, static_cast<uint64_t>(1000 + slot));
      const std::vector<uint8_t> want = payload(slot);
      EXPECT_TRUE(std::equal(want.begin(), want.end(), buffers[c.tag].data() + kSlotHeaderBytes));
    }
  }
  // The file survives closing and reopening (the index rebuild reads headers back).
  ring->reset();
  *file = SlotFile();
  auto again = SlotFile::Open(TempPath("slots"), kSlots, kSlotBytes);
  ASSERT_TRUE(again.ok());
  auto b = AlignedBuffer::Create(kSlotBytes);
  const iovec one = {b->data(), b->size()};
  auto ring2 = IoRing::Create(4, absl::MakeConstSpan(&one, 1));
  ASSERT_TRUE(ring2.ok());
  ASSERT_TRUE(
      (*ring2)->QueueRead(again->fd(), 0, b->data(), kSlotBytes, again->SlotOffset(7), 7).ok());
  auto done = (*ring2)->Reap(1);
  ASSERT_TRUE(done.ok());
  ASSERT_EQ(done->size(), 1u);
  EXPECT_EQ(ValidateSlotHeader(b->span())->block_hash, 1007u);
}

// Close waits for what the kernel took and drops what it never took: a submitted read has landed
// in its buffer when Close returns, an unsubmitted one never happens, and nothing hangs.
TEST(IoRingTest, CloseWaitsForSubmittedOperationsAndDropsTheRest) {
  constexpr int64_t kSlotBytes = 64 << 10;
  auto file = SlotFile::Open(TempPath("close_slots"), 2, kSlotBytes);
  ASSERT_TRUE(file.ok()) << file.status();
  auto a = AlignedBuffer::Create(kSlotBytes), b = AlignedBuffer::Create(kSlotBytes);
  ASSERT_TRUE(a.ok() && b.ok());
  // Slot 0 on disk holds 0x5a bytes.
  std::fill(a->data(), a->data() + kSlotBytes, 0x5a);
  auto ring = IoRing::Create(4, {});
  ASSERT_TRUE(ring.ok()) << ring.status();
  ASSERT_TRUE((*ring)->QueueWrite(file->fd(), -1, a->data(), kSlotBytes, 0, 1).ok());
  ASSERT_TRUE((*ring)->Reap(1).ok());
  std::fill(a->data(), a->data() + kSlotBytes, 0);
  std::fill(b->data(), b->data() + kSlotBytes, 0);
  ASSERT_TRUE((*ring)->QueueRead(file->fd(), -1, a->data(), kSlotBytes, 0, 2).ok());
  ASSERT_TRUE((*ring)->Submit().ok());
  ASSERT_TRUE((*ring)->QueueRead(file->fd(), -1, b->data(), kSlotBytes, 0, 3).ok());  // not sent
  ASSERT_TRUE((*ring)->Close().ok());
  EXPECT_EQ(a->data()[kSlotBytes - 1], 0x5a) << "the submitted read had not landed";
  EXPECT_EQ(b->data()[0], 0) << "the unsubmitted read ran";
  EXPECT_TRUE((*ring)->Close().ok());  // once closed, again is a no-op
}

TEST(IoRingTest, ErrorsComeBackAsCompletionsAndStatuses) {
  auto b = AlignedBuffer::Create(4096);
  ASSERT_TRUE(b.ok());
  const iovec one = {b->data(), b->size()};
  auto ring = IoRing::Create(4, absl::MakeConstSpan(&one, 1));
  ASSERT_TRUE(ring.ok());
  // A closed descriptor: the completion carries -EBADF.
  ASSERT_TRUE((*ring)->QueueRead(12345, 0, b->data(), 4096, 0, 1).ok());
  auto done = (*ring)->Reap(1);
  ASSERT_TRUE(done.ok());
  ASSERT_EQ(done->size(), 1u);
  EXPECT_EQ((*done)[0].result, -EBADF);
  // Past the end of the file: a short (empty) read, which callers treat as a miss.
  auto file = SlotFile::Open(TempPath("short"), 2, 4096);
  ASSERT_TRUE(file.ok());
  ASSERT_TRUE((*ring)->QueueRead(file->fd(), 0, b->data(), 4096, 2 * 4096, 2).ok());
  done = (*ring)->Reap(1);
  ASSERT_TRUE(done.ok());
  EXPECT_EQ((*done)[0].result, 0);
  // Bad sizes and paths are refused up front.
  EXPECT_EQ(SlotFile::Open(TempPath("x"), 2, 1000).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SlotFile::Open("/nonexistent-dir/slots", 2, 4096).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(IoRing::Create(0, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace strata
