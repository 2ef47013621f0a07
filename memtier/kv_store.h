// KvStore: the host and disk tiers under an engine's device cache, and the policies that move KV
// blocks between the three.
//
// The engine's BlockManager keeps the device tier (reference-counted pinning, LRU). This store
// keeps what falls out of it:
//   - Put: a device block about to be reused (evicted), a block hit twice or more (write-through)
//     or a finished turn's blocks (kept warm) are copied to the host tier, unless already there.
//   - Eviction order (each tier): least recently used first, or with fair_eviction the least
//     recently used block of the owner (tenant) holding the most blocks in the tier
//     (memtier/owner_lru.h).
//   - Write-back: the host tier keeps a reserve of clean slots (also on disk) where its eviction
//     order starts by writing the next victims that are dirty to disk ahead of need; evicting a
//     clean host block costs nothing. A burst that outruns the reserve evicts dirty blocks, which
//     are written from a copy; a block is lost only when the disk falls 2 x queue_depth copies
//     behind.
//   - Disk slots are reused in the eviction order (Persist's own writes take the oldest of all);
//     a recovered disk tier's blocks (DiskTier recovery) are indexed again at start, owned by
//     no tenant (0).
//   - Prefetch: a request's chain blocks found on disk start loading into the host tier when the
//     request arrives, while it queues. Restore copies a host block into a device slot.
//   - Faults: a block that fails its checks is dropped and counted (a miss); repeated device
//     errors disable the disk tier, a disk that cannot be preallocated is shrunk until it fits.
//
// Block state machine, per tier slot (a slot is pinned while a copy reads or writes it):
//   host:  free -> loading (disk read in flight) -> ready; ready -> free (evicted); a ready slot
//          is dirty until a disk copy exists (clean) and is pinned while it is written back or
//          restored. Ready slots keep their LRU place while pinned; eviction skips pinned ones.
//   disk:  free -> writing -> ready -> free (reused); ready slots are pinned while read.
//
// Thread contract: one owning thread (the engine's step loop) calls every method; tier callbacks
// run from Poll on that thread. The SetNotify callback runs on the disk tier's I/O thread.
#ifndef STRATA_MEMTIER_KV_STORE_H_
#define STRATA_MEMTIER_KV_STORE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "memtier/block_tier.h"
#include "memtier/disk_tier.h"
#include "memtier/host_tier.h"
#include "memtier/io_ring.h"
#include "memtier/kv_codec.h"
#include "memtier/owner_lru.h"

namespace strata {

struct KvStoreConfig {
  // Byte capacities; 0 leaves the tier out.
  int64_t host_bytes = 0;
  int64_t disk_bytes = 0;
  // The disk tier's file (or block device).
  std::string disk_path;
  int disk_queue_depth = 32;
  // Index the blocks a previous process left in the disk file.
  bool disk_recover = true;
  // How the host and disk tiers store blocks.
  KvCompression compression = KvCompression::kNone;
  bool pin_host = true;
  // Consecutive failed disk operations after which the disk tier is turned off.
  int disk_error_limit = 8;
  // Passed to the disk tier (tests).
  std::function<int(bool write, int64_t slot)> disk_fault_injector;
  std::function<absl::Status()> disk_ring_fault_injector;
  // Eviction by owner in both tiers (memtier/owner_lru.h): the least recently used block of the
  // owner (tenant) holding the most blocks in the tier, as the engine's device cache evicts with
  // --fair_cache_eviction; off: the least recently used of all.
  bool fair_eviction = false;
};

// A block entering (stored) or leaving (removed) the host or disk tier.
struct TierEvent {
  Tier tier = Tier::kHost;
  bool stored = true;
  BlockHash hash = 0;
};

struct KvStoreStats {
  struct PerTier {
    int64_t num_slots = 0;
    int64_t num_used = 0;
    int64_t slot_bytes = 0;
    int64_t stores = 0;     // blocks written into the tier
    int64_t hits = 0;       // blocks read out of it (restored or loaded up)
    int64_t evictions = 0;  // blocks dropped to make room
  };
  PerTier host, disk;
  bool disk_enabled = false;
  int64_t write_backs = 0;     // host -> disk copies finished
  int64_t loads = 0;           // disk -> host copies finished
  int64_t lost_evictions = 0;  // dirty host blocks evicted before their write-back
  // Dirty host blocks evicted at all (written from a copy, or lost): the write-backs were not
  // ahead of the evictions.
  int64_t dirty_evictions = 0;
  int64_t dropped_puts = 0;  // blocks not kept: every host slot pinned
  // Times a block coming down from the device waited for the disk (every host slot pinned by
  // writes in flight, or every spill copy in use), and the time spent so: the host tier is too
  // small for the bursts, or the disk too slow.
  int64_t disk_waits = 0;
  double disk_wait_seconds = 0;
  int64_t corrupt_blocks = 0;  // reads that failed a checksum or key check (misses)
  int64_t io_errors = 0;
  int64_t disk_recovered = 0;  // blocks indexed from the disk file at start
  // Speculative prefetch: blocks moved up ahead of need, and how many of them a request used.
  int64_t prefetch_promoted = 0;
  int64_t prefetch_used = 0;
  // Hits on blocks that were below the device tier when their request arrived, and how many of
  // those were already on the device when the request was admitted.
  int64_t lower_tier_hits = 0;
  int64_t lower_tier_hits_covered = 0;
};

class KvStore {
 public:
  // kLoading: on its way (loading into host, or being written to disk with no host copy left);
  // ready soon, as kHost or kDisk.
  enum class Where { kNone, kHost, kLoading, kDisk };

  // `device` (the engine's cache as a tier) is not owned and must outlive the store. A disk tier
  // that cannot be preallocated is shrunk (halved until it fits) or left out with a warning.
  static absl::StatusOr<std::unique_ptr<KvStore>> Create(KvStoreConfig config, KvBlockLayout layout,
                                                         BlockTier* device);
  // Waits for the disk tier's operations.
  ~KvStore();

  // Where a block is below the device tier.
  Where Find(BlockHash hash) const;
  // Copies the device block `key` in `device_slot` to the host tier unless it is there already
  // (then it only becomes most recently used); `to_disk` also starts writing it to disk at once.
  // `owner`: the tenant it is kept for (fair_eviction), which its disk copy inherits.
  void Put(int64_t device_slot, BlockKey key, bool to_disk = false, int32_t owner = 0);
  // Copies the host block `hash` into `device_slot`. NOT_FOUND when it is not ready in host;
  // DATA_LOSS when it failed its checks (it is dropped). `speculative`: a prefetch promotion,
  // counted for accuracy.
  absl::Status Restore(BlockHash hash, int64_t device_slot, bool speculative = false);
  // Copies the raw payload of the host block `hash` into `raw` (the device tier's payload_bytes(),
  // dequantized when the tier stores blocks compressed) and makes it the most recently used;
  // returns its key. NOT_FOUND when it is not ready in host; DATA_LOSS when it failed its checks
  // (it is dropped). For copies to another worker (Engine::ExportKvBlocks).
  absl::StatusOr<BlockKey> ReadHost(BlockHash hash, absl::Span<uint8_t> raw);
  // Keeps a ready host block from being evicted (while the caller makes room on the device for
  // it); false when it is not ready in host. Every successful Pin needs one Unpin.
  bool Pin(BlockHash hash);
  void Unpin(BlockHash hash);
  // Starts loading into the host tier each of `hashes` that is on disk only, in order, stopping
  // at the first that is nowhere and after loads for half the host tier. Returns how many
  // loads started.
  int Prefetch(absl::Span<const BlockHash> hashes);
  // A request reused `hash`, which was below the device tier when it arrived; `covered`: it was
  // on the device by the time the request was admitted.
  void RecordLowerTierHit(BlockHash hash, bool covered);

  // Runs finished transfers' continuations and schedules write-backs. Call once per engine step.
  void Poll();
  // `notify` runs (on the disk tier's I/O thread) whenever disk completions wait for Poll, so that
  // an owner sleeping while a request waits for loads wakes at once; null stops it. Callable from
  // any thread.
  void SetNotify(std::function<void()> notify) ABSL_LOCKS_EXCLUDED(notify_mu_);
  // Waits for every disk operation and runs its continuation (tests, shutdown).
  void Flush();
  // For shutdown: writes the host tier's blocks that have no disk copy to disk, most recently used
  // first, so that a store opened later on the same disk file (DiskTier recovery) starts with them.
  // Writes no more blocks than the disk holds besides the host's clean blocks, keeps up to
  // 2 x disk_queue_depth writes in flight, and stops starting new ones at `deadline` or once
  // `*cancel` (if given) is true; returns when the last has finished, with how many blocks were
  // written. 0 without a disk tier.
  int64_t Persist(absl::Time deadline, const std::atomic<bool>* cancel = nullptr);
  // Disk loads in flight (a waiting request may be waiting for them).
  int64_t loads_in_flight() const { return loads_in_flight_; }

  std::vector<TierEvent> DrainEvents();
  // Every block in the host and disk tiers now (ready or on its way), for a new event subscriber.
  std::vector<TierEvent> Inventory() const;
  KvStoreStats stats() const;
  // The owner a block is kept for in the host tier, or -1 when it is not ready there (tests).
  int32_t HostOwner(BlockHash hash) const;
  // Ready blocks `owner` holds in the host or the disk tier (on disk: those not pinned by a load
  // in flight).
  int64_t BlocksOf(Tier tier, int32_t owner) const {
    return tier == Tier::kHost   ? host_order_.count(owner)
           : tier == Tier::kDisk ? disk_order_.count(owner)
                                 : 0;
  }
  bool has_disk() const { return disk_enabled_; }

 private:
  struct HostSlot {
    enum class State { kFree, kLoading, kReady };
    State state = State::kFree;
    BlockKey key;
    int pins = 0;
    bool clean = false;       // a ready disk copy exists
    bool writing = false;     // a write-back is in flight
    bool prefetched = false;  // loaded by Prefetch and not used yet
    int32_t owner = 0;
  };
  struct DiskSlot {
    enum class State { kFree, kWriting, kReady };
    State state = State::kFree;
    BlockKey key;
    int pins = 0;
    int32_t owner = 0;
  };

  KvStore(KvStoreConfig config, KvBlockLayout layout, BlockTier* device);
  absl::Status OpenTiers();
  // A free host slot, evicting a clean (or, failing that, the oldest) block; -1 when every slot
  // is pinned. `wait_for_disk`: while every slot is pinned and disk operations are in flight,
  // or a dirty victim finds every spill copy in use, waits for the disk (WaitForDisk) instead.
  int64_t AllocateHost(bool wait_for_disk);
  // The host slot AllocateHost would evict, or -1 when every slot is pinned.
  int64_t HostVictim() const;
  // Waits until a disk operation finishes and runs its callback (counted in disk_waits).
  void WaitForDisk();
  int64_t AllocateDisk();
  void EvictHost(int64_t slot);
  // After a failed read of host `slot`: a block that failed its checks (DATA_LOSS) is counted and,
  // unless pinned, dropped.
  void DropIfDamaged(int64_t slot, const absl::Status& read);
  void EvictDisk(int64_t slot);
  void PinHost(int64_t slot);
  void UnpinHost(int64_t slot);
  // Makes a ready host block the most recently used.
  void TouchHost(int64_t slot);
  void PinDisk(int64_t slot);
  void UnpinDisk(int64_t slot);
  // Starts writing `image` (kept unchanged until then) to a free or reused disk slot as `key`;
  // `after(ok)` runs when it is done, or at once with false (and the call returns false) when no
  // disk slot can be had.
  bool WriteToDisk(BlockKey key, int32_t owner, absl::Span<uint8_t> image,
                   absl::AnyInvocable<void(bool ok) &&> after);
  // False when the block is not on disk and cannot be written there now.
  bool StartWriteBack(int64_t host_slot);
  // Writes a copy of a dirty host block that is about to be evicted. False when it cannot (with
  // `wait_for_disk`, only when the disk is off or full).
  bool SpillToDisk(int64_t host_slot, bool wait_for_disk);
  // False when no host slot can be had.
  bool StartLoad(int64_t disk_slot);
  void ScheduleWriteBacks();
  void DiskFailed(const absl::Status& status);
  void DisableDisk();
  void Emit(Tier tier, bool stored, BlockHash hash) { events_.push_back({tier, stored, hash}); }

  KvStoreConfig config_;
  KvCodec codec_;
  BlockTier* device_;
  std::unique_ptr<HostTier> host_;
  std::unique_ptr<DiskTier> disk_;
  bool disk_enabled_ = false;
  int consecutive_disk_errors_ = 0;
  // Bumped when the disk tier is turned off, so continuations of older operations know.
  uint64_t disk_epoch_ = 0;

  std::vector<HostSlot> host_slots_;
  std::vector<int64_t> host_free_;
  OwnerLru host_order_{0};  // ready host blocks (pinned ones too)
  absl::flat_hash_map<BlockHash, int64_t> host_index_;
  std::vector<DiskSlot> disk_slots_;
  std::vector<int64_t> disk_free_;
  OwnerLru disk_order_{0};  // ready, unpinned disk blocks
  absl::flat_hash_map<BlockHash, int64_t> disk_index_;
  int64_t writes_in_flight_ = 0;
  int64_t loads_in_flight_ = 0;
  bool persisting_ = false;  // in Persist: disk slots are taken oldest of all first

  std::vector<uint8_t> staging_;              // one raw block, for device <-> host copies
  bool staging_pinned_ = false;               // registered with the CUDA driver
  std::vector<AlignedBuffer> spill_buffers_;  // free copies for SpillToDisk
  int64_t spill_buffers_out_ = 0;
  absl::flat_hash_set<BlockHash> promoted_;
  std::vector<TierEvent> events_;
  KvStoreStats stats_;
  std::mutex notify_mu_;
  std::function<void()> notify_ ABSL_GUARDED_BY(notify_mu_);
};

}  // namespace strata

#endif  // STRATA_MEMTIER_KV_STORE_H_
