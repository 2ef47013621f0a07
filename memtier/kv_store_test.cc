// KvStore policies on real tiers: a device tier in memory, a pinned host pool, a disk file.
#include "memtier/kv_store.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
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
#include "memtier/device_tier.h"
#include "memtier/slot_format.h"
#include "tests/test_dir.h"

namespace strata {
namespace {

constexpr KvBlockLayout kLayout{4, 16, 2, 8};  // 4 KiB raw; host and disk slots of 8 KiB
constexpr int64_t kSlotBytes = 8192;
constexpr int64_t kDeviceSlots = 8;

std::vector<uint8_t> Block(uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<float> f(kLayout.block_bytes() / 4);
  for (float& x : f) x = static_cast<float>(rng() % 1000) / 100.0f;
  std::vector<uint8_t> out(kLayout.block_bytes());
  std::memcpy(out.data(), f.data(), out.size());
  return out;
}

BlockKey KeyOf(uint32_t i) { return BlockKey{0x51ed270b27ull * (i + 1), 3}; }

class KvStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = FreshTestDir();
    DeviceTierConfig dc;
    dc.layout = kLayout;
    dc.num_slots = kDeviceSlots;
    device_ = *DeviceTier::Create(dc);
  }
  KvStoreConfig Config(int64_t host_slots, int64_t disk_slots) {
    KvStoreConfig c;
    c.host_bytes = host_slots * kSlotBytes;
    c.disk_bytes = disk_slots * kSlotBytes;
    c.disk_path = dir_ + "/kv";
    c.disk_queue_depth = 4;
    return c;
  }
  void Open(KvStoreConfig c) {
    store_.reset();
    auto s = KvStore::Create(std::move(c), kLayout, device_.get());
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = *std::move(s);
  }
  // Puts block i into device slot `slot`, as the engine computes it.
  void Compute(int64_t slot, uint32_t i) {
    absl::Status r;
    device_->Write(slot, KeyOf(i), Block(i), [&r](absl::Status s) { r = std::move(s); });
    device_->Flush();
    ASSERT_TRUE(r.ok()) << r;
  }
  std::vector<uint8_t> DeviceBlock(int64_t slot, uint32_t i) {
    std::vector<uint8_t> out(kLayout.block_bytes());
    absl::Status r;
    device_->Read(slot, KeyOf(i), absl::MakeSpan(out), [&r](absl::Status s) { r = std::move(s); });
    device_->Flush();
    EXPECT_TRUE(r.ok()) << r;
    return out;
  }
  // Evicts block i from the device: computed in slot 0, then put down.
  void Evict(uint32_t i, bool to_disk = false) {
    Compute(0, i);
    store_->Put(0, KeyOf(i), to_disk);
    store_->Poll();
  }
  void Settle() {
    for (int i = 0; i < 4; ++i) {
      store_->Flush();
      store_->Poll();
    }
  }

  std::string dir_;
  std::unique_ptr<DeviceTier> device_;
  std::unique_ptr<KvStore> store_;
};

TEST_F(KvStoreTest, ABlockPutDownComesBackExactly) {
  Open(Config(4, 0));
  Evict(7);
  EXPECT_EQ(store_->Find(KeyOf(7).hash), KvStore::Where::kHost);
  EXPECT_EQ(store_->Find(KeyOf(8).hash), KvStore::Where::kNone);
  ASSERT_TRUE(store_->Restore(KeyOf(7).hash, 5).ok());
  EXPECT_EQ(DeviceBlock(5, 7), Block(7));
  EXPECT_TRUE(absl::IsNotFound(store_->Restore(KeyOf(8).hash, 5)));
  const std::vector<TierEvent> events = store_->DrainEvents();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].tier, Tier::kHost);
  EXPECT_TRUE(events[0].stored);
  EXPECT_EQ(store_->stats().host.stores, 1);
  EXPECT_EQ(store_->stats().host.hits, 1);
}

TEST_F(KvStoreTest, HostIsLruWithoutADisk) {
  Open(Config(3, 0));
  for (uint32_t i = 0; i < 3; ++i) Evict(i);
  Evict(0);  // already there: becomes most recently used
  Evict(3);  // evicts 1, the least recently used
  EXPECT_EQ(store_->Find(KeyOf(1).hash), KvStore::Where::kNone);
  for (uint32_t i : {0u, 2u, 3u}) EXPECT_EQ(store_->Find(KeyOf(i).hash), KvStore::Where::kHost);
  EXPECT_EQ(store_->stats().host.evictions, 1);
  EXPECT_EQ(store_->stats().lost_evictions, 0);  // nothing to write back to
}

TEST_F(KvStoreTest, HostBlocksAreWrittenBackBeforeEvictionAndLoadBack) {
  Open(Config(6, 32));
  for (uint32_t i = 0; i < 20; ++i) {
    Evict(i);
    Settle();  // write-backs of the LRU end keep up
  }
  const KvStoreStats st = store_->stats();
  EXPECT_EQ(st.lost_evictions, 0);
  EXPECT_GE(st.write_backs, 16);
  // Every block is somewhere below the device.
  for (uint32_t i = 0; i < 20; ++i) {
    EXPECT_NE(store_->Find(KeyOf(i).hash), KvStore::Where::kNone) << i;
  }
  EXPECT_EQ(store_->Find(KeyOf(0).hash), KvStore::Where::kDisk);
  // A prefix chain 0, 1, 2 loads up from disk in one prefetch.
  const std::vector<BlockHash> chain = {KeyOf(0).hash, KeyOf(1).hash, KeyOf(2).hash};
  EXPECT_EQ(store_->Prefetch(chain), 3);
  EXPECT_EQ(store_->Find(KeyOf(0).hash), KvStore::Where::kLoading);
  EXPECT_EQ(store_->loads_in_flight(), 3);
  Settle();
  EXPECT_EQ(store_->loads_in_flight(), 0);
  for (uint32_t i = 0; i < 3; ++i) {
    ASSERT_EQ(store_->Find(KeyOf(i).hash), KvStore::Where::kHost);
    ASSERT_TRUE(store_->Restore(KeyOf(i).hash, 2 + i).ok());
    EXPECT_EQ(DeviceBlock(2 + i, i), Block(i));
    store_->RecordLowerTierHit(KeyOf(i).hash, /*covered=*/i < 2);
  }
  EXPECT_EQ(store_->stats().loads, 3);
  EXPECT_EQ(store_->stats().prefetch_promoted, 3);
  EXPECT_EQ(store_->stats().prefetch_used, 3);
  EXPECT_EQ(store_->stats().lower_tier_hits, 3);
  EXPECT_EQ(store_->stats().lower_tier_hits_covered, 2);
  // One prefetch loads at most half the host tier.
  EXPECT_EQ(store_->Prefetch({KeyOf(5).hash, KeyOf(6).hash, KeyOf(7).hash, KeyOf(8).hash}), 3);
  Settle();
  // A chain stops at the first block nobody has.
  EXPECT_EQ(store_->Prefetch({KeyOf(99).hash, KeyOf(9).hash}), 0);
}

// Fair eviction: one owner's stream of blocks pushes out its own oldest before another owner's
// few; one LRU order for all without it.
TEST_F(KvStoreTest, FairHostEvictionTakesTheLargestOwnersBlocksFirst) {
  for (const bool fair : {false, true}) {
    KvStoreConfig c = Config(6, 0);
    c.fair_eviction = fair;
    Open(c);
    for (uint32_t i : {100u, 101u}) {  // the quiet tenant's two blocks, oldest of all
      Compute(0, i);
      store_->Put(0, KeyOf(i), false, /*owner=*/2);
    }
    for (uint32_t i = 0; i < 10; ++i) {  // the busy tenant's stream
      Compute(0, i);
      store_->Put(0, KeyOf(i), false, /*owner=*/1);
    }
    for (uint32_t i : {100u, 101u}) {
      EXPECT_EQ(store_->Find(KeyOf(i).hash), fair ? KvStore::Where::kHost : KvStore::Where::kNone)
          << "fair " << fair << " block " << i;
    }
    // The busy tenant keeps its most recent blocks either way.
    for (uint32_t i = 6; i < 10; ++i) {
      EXPECT_EQ(store_->Find(KeyOf(i).hash), KvStore::Where::kHost) << fair << " " << i;
    }
    EXPECT_EQ(store_->stats().host.evictions, 6);
  }
}

TEST_F(KvStoreTest, FairDiskEvictionAndLoadsKeepTheOwner) {
  for (const bool fair : {false, true}) {
    KvStoreConfig c = Config(3, 8);
    c.fair_eviction = fair;
    c.disk_recover = false;  // each round on its own
    Open(c);
    for (uint32_t i : {100u, 101u}) {
      Compute(0, i);
      store_->Put(0, KeyOf(i), /*to_disk=*/true, /*owner=*/2);
      Settle();
    }
    for (uint32_t i = 0; i < 12; ++i) {
      Compute(0, i);
      store_->Put(0, KeyOf(i), /*to_disk=*/true, /*owner=*/1);
      Settle();
    }
    EXPECT_EQ(store_->stats().lost_evictions, 0);
    // Kept below the device (fair: on disk, or the one left in host) or lost (plain).
    for (uint32_t i : {100u, 101u}) {
      EXPECT_EQ(store_->Find(KeyOf(i).hash) != KvStore::Where::kNone, fair)
          << "fair " << fair << " block " << i;
    }
    if (!fair) continue;
    // Host: 101 and the busy tenant's last two (each tenant down to an equal share, then the
    // older of a tie); 100 went down to disk, still the quiet tenant's.
    ASSERT_EQ(store_->Find(KeyOf(100).hash), KvStore::Where::kDisk);
    EXPECT_EQ(store_->HostOwner(KeyOf(101).hash), 2);
    ASSERT_EQ(store_->Prefetch({KeyOf(100).hash}), 1);
    Settle();
    ASSERT_EQ(store_->Find(KeyOf(100).hash), KvStore::Where::kHost);
    EXPECT_EQ(store_->HostOwner(KeyOf(100).hash), 2);  // a load keeps the owner
    ASSERT_TRUE(store_->Restore(KeyOf(100).hash, 3).ok());
    EXPECT_EQ(DeviceBlock(3, 100), Block(100));
    EXPECT_EQ(store_->stats().lost_evictions, 0);
  }
}

// Persist fills a full disk oldest of all first even with fair eviction: by owner, its own
// writes would become the largest owner's and evict one another.
TEST_F(KvStoreTest, PersistUnderFairEvictionKeepsEveryBlockItWrites) {
  {
    Open(Config(8, 8));  // a disk file full of a previous process's blocks (owner 0 now)
    for (uint32_t i = 100; i < 108; ++i) Evict(i, /*to_disk=*/true);
    Settle();
  }
  KvStoreConfig c = Config(8, 8);
  c.fair_eviction = true;
  c.disk_queue_depth = 1;  // two writes in flight: each pair's blocks are indexed before the next
  Open(c);
  ASSERT_EQ(store_->stats().disk_recovered, 8);
  for (uint32_t i = 0; i < 8; ++i) {  // one tenant's dirty blocks fill the host tier
    Compute(0, i);
    store_->Put(0, KeyOf(i), /*to_disk=*/false, /*owner=*/1);
  }
  EXPECT_EQ(store_->Persist(absl::InfiniteFuture()), 8);
  store_.reset();
  Open(Config(8, 8));
  for (uint32_t i = 0; i < 8; ++i) {
    EXPECT_EQ(store_->Find(KeyOf(i).hash), KvStore::Where::kDisk) << i;
  }
}

// The write-backs clean blocks in the order fair eviction will take them, also when two owners
// hold about as many and the victims alternate between them.
TEST_F(KvStoreTest, FairWriteBacksStayAheadOfTheEvictions) {
  KvStoreConfig c = Config(16, 64);
  c.fair_eviction = true;
  Open(c);
  for (uint32_t i = 0; i < 48; ++i) {
    Compute(0, i);
    store_->Put(0, KeyOf(i), /*to_disk=*/false, /*owner=*/1 + static_cast<int32_t>(i % 2));
    if (i % 2 == 1) Settle();  // two evictions a step, from one owner and then the other
  }
  EXPECT_GT(store_->stats().host.evictions, 0);
  EXPECT_EQ(store_->stats().dirty_evictions, 0);
  EXPECT_EQ(store_->stats().lost_evictions, 0);
}

TEST_F(KvStoreTest, ABurstBeyondTheCleanReserveIsSpilledNotLost) {
  Open(Config(4, 32));
  // No Poll between puts: the write-backs never run ahead, so evictions find dirty blocks.
  for (uint32_t i = 0; i < 12; ++i) {
    Compute(0, i);
    store_->Put(0, KeyOf(i));
  }
  Settle();
  EXPECT_EQ(store_->stats().lost_evictions, 0);
  for (uint32_t i = 0; i < 12; ++i) EXPECT_NE(store_->Find(KeyOf(i).hash), KvStore::Where::kNone);
  ASSERT_EQ(store_->Prefetch({KeyOf(0).hash}), 1);
  Settle();
  ASSERT_TRUE(store_->Restore(KeyOf(0).hash, 4).ok());
  EXPECT_EQ(DeviceBlock(4, 0), Block(0));
}

TEST_F(KvStoreTest, ALoadKeepsItsDiskSlotWhileRoomIsMadeForIt) {
  Open(Config(2, 2));
  Evict(0, /*to_disk=*/true);
  Evict(1, /*to_disk=*/true);
  Settle();  // disk: 0, 1 (full)
  Compute(0, 2);
  store_->Put(0, KeyOf(2));
  Compute(0, 3);
  store_->Put(0, KeyOf(3));  // host: 2, 3, both dirty
  // Loading 0 needs a host slot: evicting dirty 2 spills it to disk, which must take 1's slot,
  // not the one 0 is being read from.
  ASSERT_EQ(store_->Prefetch({KeyOf(0).hash}), 1);
  Settle();
  ASSERT_EQ(store_->Find(KeyOf(0).hash), KvStore::Where::kHost);
  ASSERT_TRUE(store_->Restore(KeyOf(0).hash, 5).ok());
  EXPECT_EQ(DeviceBlock(5, 0), Block(0));
  EXPECT_EQ(store_->Find(KeyOf(1).hash), KvStore::Where::kNone);
  EXPECT_EQ(store_->stats().corrupt_blocks, 0);
}

TEST_F(KvStoreTest, PinnedHostBlocksAreNotEvicted) {
  Open(Config(2, 0));
  Evict(0);
  Evict(1);
  ASSERT_TRUE(store_->Pin(KeyOf(0).hash));
  EXPECT_FALSE(store_->Pin(KeyOf(5).hash));
  Evict(2);  // evicts 1, not the pinned 0
  EXPECT_EQ(store_->Find(KeyOf(0).hash), KvStore::Where::kHost);
  EXPECT_EQ(store_->Find(KeyOf(1).hash), KvStore::Where::kNone);
  ASSERT_TRUE(store_->Pin(KeyOf(2).hash));
  Evict(3);  // everything pinned: the put is dropped
  EXPECT_EQ(store_->Find(KeyOf(3).hash), KvStore::Where::kNone);
  EXPECT_EQ(store_->stats().dropped_puts, 1);
  store_->Unpin(KeyOf(0).hash);
  store_->Unpin(KeyOf(2).hash);
  Evict(3);
  EXPECT_EQ(store_->Find(KeyOf(3).hash), KvStore::Where::kHost);
}

TEST_F(KvStoreTest, WriteThroughPutsAHotBlockOnDiskAtOnce) {
  Open(Config(8, 8));
  Evict(1, /*to_disk=*/true);
  Settle();
  EXPECT_EQ(store_->stats().write_backs, 1);
  bool on_disk = false;
  for (const TierEvent& e : store_->Inventory()) on_disk |= e.tier == Tier::kDisk;
  EXPECT_TRUE(on_disk);
}

TEST_F(KvStoreTest, TheDiskTierIsIndexedAgainAfterARestart) {
  Open(Config(2, 16));
  for (uint32_t i = 0; i < 8; ++i) {
    Evict(i, /*to_disk=*/true);
    Settle();
  }
  store_.reset();
  Open(Config(2, 16));
  EXPECT_EQ(store_->stats().disk_recovered, 8);
  int on_disk = 0;
  for (const TierEvent& e : store_->Inventory()) on_disk += e.tier == Tier::kDisk;
  EXPECT_EQ(on_disk, 8);
  for (uint32_t i = 0; i < 8; ++i) EXPECT_EQ(store_->Find(KeyOf(i).hash), KvStore::Where::kDisk);
  ASSERT_EQ(store_->Prefetch({KeyOf(5).hash}), 1);
  Settle();
  ASSERT_TRUE(store_->Restore(KeyOf(5).hash, 3).ok());
  EXPECT_EQ(DeviceBlock(3, 5), Block(5));
  // Started without recovery, the same file offers nothing.
  KvStoreConfig fresh = Config(2, 16);
  fresh.disk_recover = false;
  Open(fresh);
  EXPECT_EQ(store_->Find(KeyOf(5).hash), KvStore::Where::kNone);
}

TEST_F(KvStoreTest, PersistLeavesTheHostTierOnDiskForTheNextStore) {
  Open(Config(8, 16));
  for (uint32_t i = 0; i < 8; ++i) Evict(i);
  Settle();
  const int64_t clean = store_->stats().write_backs;  // the LRU end, written back ahead of need
  EXPECT_LT(clean, 8);
  EXPECT_EQ(store_->Persist(absl::InfinitePast()), 0);  // past its deadline: starts nothing
  EXPECT_EQ(store_->Persist(absl::InfiniteFuture()), 8 - clean);
  EXPECT_EQ(store_->Persist(absl::InfiniteFuture()), 0);  // nothing left without a disk copy
  store_.reset();
  Open(Config(8, 16));
  EXPECT_EQ(store_->stats().disk_recovered, 8);
  for (uint32_t i = 0; i < 8; ++i) {
    ASSERT_EQ(store_->Find(KeyOf(i).hash), KvStore::Where::kDisk) << i;
    ASSERT_EQ(store_->Prefetch({KeyOf(i).hash}), 1);
    Settle();
    ASSERT_TRUE(store_->Restore(KeyOf(i).hash, 3).ok());
    EXPECT_EQ(DeviceBlock(3, i), Block(i)) << i;
  }
}

TEST_F(KvStoreTest, PersistOnASmallDiskKeepsTheMostRecentlyUsed) {
  Open(Config(8, 4));
  for (uint32_t i = 0; i < 8; ++i) Evict(i);
  Settle();
  const int64_t clean = store_->stats().write_backs;
  ASSERT_LT(clean, 4);
  // Only the disk's free room: writing more would evict what this call wrote first.
  EXPECT_EQ(store_->Persist(absl::InfiniteFuture()), 4 - clean);
  store_.reset();
  Open(Config(8, 4));
  EXPECT_EQ(store_->stats().disk_recovered, 4);
  for (uint32_t i = 8 - (4 - clean); i < 8; ++i) {
    EXPECT_EQ(store_->Find(KeyOf(i).hash), KvStore::Where::kDisk) << i;
  }
}

TEST_F(KvStoreTest, PersistTakesRoomFromDiskOnlyBlocksBeforeHostOnes) {
  Open(Config(4, 4));
  for (uint32_t i = 0; i < 4; ++i) {
    Evict(i, /*to_disk=*/true);  // disk, oldest first: 0 1 2 3
    Settle();
  }
  Evict(0);  // used again: 0 and 1 are the host tier's most recent
  Evict(1);
  Evict(4);  // evicts 2 and 3 from host (clean: they stay on disk only)
  Evict(5);
  Settle();
  ASSERT_EQ(store_->Find(KeyOf(2).hash), KvStore::Where::kDisk);
  // Room for 4 and 5 comes from 2 and 3, not from the disk copies of 0 and 1, which are older
  // on disk but in use.
  EXPECT_EQ(store_->Persist(absl::InfiniteFuture()), 2);
  store_.reset();
  Open(Config(4, 4));
  for (uint32_t i : {0u, 1u, 4u, 5u}) {
    EXPECT_EQ(store_->Find(KeyOf(i).hash), KvStore::Where::kDisk) << i;
  }
}

TEST_F(KvStoreTest, PersistWithoutADiskWritesNothing) {
  Open(Config(4, 0));
  Evict(1);
  EXPECT_EQ(store_->Persist(absl::InfiniteFuture()), 0);
  EXPECT_EQ(store_->Find(KeyOf(1).hash), KvStore::Where::kHost);
}

TEST_F(KvStoreTest, ADamagedDiskBlockIsAMissAndCounted) {
  Open(Config(2, 8));
  Evict(4, /*to_disk=*/true);
  Settle();
  store_.reset();
  // Flip payload bytes of every written slot.
  const int fd = open((dir_ + "/kv").c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  for (int64_t s = 0; s < 8; ++s) {
    const uint8_t junk[16] = {1, 2, 3};
    ASSERT_EQ(pwrite(fd, junk, sizeof(junk), s * kSlotBytes + kSlotHeaderBytes + 64),
              static_cast<ssize_t>(sizeof(junk)));
  }
  close(fd);
  Open(Config(2, 8));
  ASSERT_EQ(store_->Find(KeyOf(4).hash), KvStore::Where::kDisk);  // its header is intact
  EXPECT_EQ(store_->Prefetch({KeyOf(4).hash}), 1);
  Settle();
  EXPECT_EQ(store_->Find(KeyOf(4).hash), KvStore::Where::kNone);
  EXPECT_EQ(store_->stats().corrupt_blocks, 1);
  EXPECT_TRUE(store_->has_disk());  // damage is not a device error
}

TEST_F(KvStoreTest, RepeatedDeviceErrorsTurnTheDiskOffAndServingGoesOn) {
  KvStoreConfig c = Config(2, 8);
  c.disk_error_limit = 3;
  c.disk_fault_injector = [](bool write, int64_t) { return write ? -EIO : 0; };
  Open(c);
  for (uint32_t i = 0; i < 10; ++i) {
    Evict(i, /*to_disk=*/true);
    Settle();
  }
  EXPECT_FALSE(store_->has_disk());
  EXPECT_EQ(store_->stats().io_errors, 3);
  // The host tier still works.
  EXPECT_EQ(store_->Find(KeyOf(9).hash), KvStore::Where::kHost);
  ASSERT_TRUE(store_->Restore(KeyOf(9).hash, 1).ok());
  EXPECT_EQ(DeviceBlock(1, 9), Block(9));
}

TEST_F(KvStoreTest, ARingFailureTurnsTheDiskOffAndServingGoesOn) {
  KvStoreConfig c = Config(2, 8);
  c.disk_error_limit = 3;
  std::atomic<bool> fail_ring{false};
  c.disk_ring_fault_injector = [&fail_ring] {
    return fail_ring ? absl::UnavailableError("injected: io_uring_enter failed") : absl::OkStatus();
  };
  Open(c);
  Evict(0, /*to_disk=*/true);
  Settle();
  EXPECT_TRUE(store_->has_disk());
  fail_ring = true;
  for (uint32_t i = 1; i < 10; ++i) {
    Evict(i, /*to_disk=*/true);
    Settle();
  }
  EXPECT_FALSE(store_->has_disk());
  // The host tier still serves.
  EXPECT_EQ(store_->Find(KeyOf(9).hash), KvStore::Where::kHost);
  ASSERT_TRUE(store_->Restore(KeyOf(9).hash, 1).ok());
  EXPECT_EQ(DeviceBlock(1, 9), Block(9));
}

TEST_F(KvStoreTest, ADiskThatDoesNotFitIsShrunk) {
  // A file size limit makes preallocation fail as a full disk would (EFBIG, like ENOSPC).
  signal(SIGXFSZ, SIG_IGN);
  rlimit old;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  rlimit lim = old;
  lim.rlim_cur = 5 * kSlotBytes;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);
  Open(Config(2, 16));
  setrlimit(RLIMIT_FSIZE, &old);
  EXPECT_TRUE(store_->has_disk());
  EXPECT_EQ(store_->stats().disk.num_slots, 4);  // 16 -> 8 -> 4
}

TEST_F(KvStoreTest, BadConfigurationsAreRefused) {
  KvStoreConfig c = Config(0, 4);
  EXPECT_TRUE(absl::IsInvalidArgument(KvStore::Create(c, kLayout, device_.get()).status()));
  c = Config(4, 4);
  c.disk_path.clear();
  EXPECT_TRUE(absl::IsInvalidArgument(KvStore::Create(c, kLayout, device_.get()).status()));
  c = Config(0, 0);
  c.host_bytes = 100;  // less than one slot
  EXPECT_TRUE(absl::IsInvalidArgument(KvStore::Create(c, kLayout, device_.get()).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      KvStore::Create(Config(2, 0), KvBlockLayout{4, 16, 2, 4}, device_.get()).status()));
}

TEST_F(KvStoreTest, QuantizedLowerTiersComeBackClose) {
  KvStoreConfig c = Config(2, 8);
  c.compression = KvCompression::kInt8;
  Open(c);
  Evict(3, /*to_disk=*/true);
  Settle();
  store_.reset();
  Open(c);
  ASSERT_EQ(store_->Prefetch({KeyOf(3).hash}), 1);
  Settle();
  ASSERT_TRUE(store_->Restore(KeyOf(3).hash, 6).ok());
  const std::vector<uint8_t> got = DeviceBlock(6, 3), want = Block(3);
  const float* a = reinterpret_cast<const float*>(want.data());
  const float* b = reinterpret_cast<const float*>(got.data());
  for (size_t i = 0; i < want.size() / 4; ++i) ASSERT_NEAR(a[i], b[i], 10.0f / 254 * 1.001f);
  EXPECT_LT(store_->stats().host.slot_bytes, kSlotBytes);
}

}  // namespace
}  // namespace strata
