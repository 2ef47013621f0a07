// DiskTier: KV block slots in a preallocated file (or block device) opened O_DIRECT, driven by
// io_uring with registered buffers from one I/O thread.
//
// Each slot holds one slot image (slot_format.h), the same bytes as a host tier slot with the same
// codec. The owning thread posts operations; the I/O thread batches them into the ring (up to
// queue_depth in flight, one submit per batch), reaps completions, checks every image it reads
// (header, key, encoding, payload checksum) and hands the results back for Poll. The owning thread
// never waits on the disk unless it calls Flush.
//
// Memory: a staging area of `staging_slots` slots (registered) serves payload writes and reads,
// which are encoded and decoded on the I/O thread. The host tier's pool can be registered too
// (`registered_region`): WriteImage and ReadImage on images inside it move them with no copy.
// When the kernel refuses to register memory (RLIMIT_MEMLOCK), plain reads and writes are used.
//
// Persistence and recovery: writes carry an increasing generation. Open reads every slot's header
// (recover = true) and offers the valid ones, newest generation per key, through Scan; torn,
// corrupt or foreign slots are counted and treated as free. Payload checksums are checked on every
// read, so a slot damaged after the scan is a DATA_LOSS miss then.
//
// Ring failure: should io_uring itself fail (submission or waiting refused for a reason other than
// a transient shortage), the I/O thread closes the ring, waiting for what the kernel took (it may
// write into our buffers until it is done; if even that wait fails, the process stops rather than
// hand those buffers back), and from then on fails every operation, queued, in flight or new, with
// UNAVAILABLE. The process keeps serving; the owner (KvStore) turns the tier off after a few
// failures in a row.
//
// Thread contract: one owning thread calls every method; `notify` runs on the I/O thread.
#ifndef STRATA_MEMTIER_DISK_TIER_H_
#define STRATA_MEMTIER_DISK_TIER_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "memtier/block_tier.h"
#include "memtier/io_ring.h"
#include "memtier/kv_codec.h"

namespace strata {

struct DiskTierConfig {
  std::string path;
  int64_t num_slots = 0;
  KvCodec codec{KvBlockLayout{1, 1, 1, 1}, KvCompression::kNone};
  // Reads and writes in flight at once.
  int queue_depth = 32;
  // Staging slots for payload transfers and for images outside registered memory; 0: queue_depth.
  int staging_slots = 0;
  // Memory to register with the ring besides the staging area (the host tier's pool).
  absl::Span<uint8_t> registered_region;
  // Runs on the I/O thread whenever completions are waiting for Poll (to wake the owner's loop).
  std::function<void()> notify;
  // Read every slot's header at open and offer the valid blocks through Scan. False: start empty.
  bool recover = true;
  // Fault injection for tests: asked on the I/O thread before each read and write is issued; a
  // negative errno fails that operation as if the device had returned it.
  std::function<int(bool write, int64_t slot)> fault_injector;
  // Fault injection for tests: asked on the I/O thread before it waits for completions; an error
  // acts as if io_uring itself had failed (see "Ring failure" above).
  std::function<absl::Status()> ring_fault_injector;
};

struct DiskTierStats {
  int64_t reads = 0;
  int64_t writes = 0;
  int64_t read_bytes = 0;
  int64_t write_bytes = 0;
  // Operations the device failed (EIO, ENOSPC, short transfers).
  int64_t io_errors = 0;
  // Reads whose image failed its checks (torn, corrupt, another block).
  int64_t corrupt_reads = 0;
  // At open: valid slots found, and slots with a header that was damaged or foreign.
  int64_t recovered_slots = 0;
  int64_t invalid_slots = 0;
  bool fixed_buffers = false;
};

class DiskTier final : public BlockTier {
 public:
  // INVALID_ARGUMENT for a bad config; RESOURCE_EXHAUSTED when the file cannot be preallocated;
  // UNAVAILABLE when the file or the ring cannot be opened.
  static absl::StatusOr<std::unique_ptr<DiskTier>> Open(DiskTierConfig config);
  // Waits for every operation (running its callback), then stops the I/O thread.
  ~DiskTier() override;

  // Stores a sealed slot image (host tier image(), slot_bytes long) in `slot`, under a new
  // generation (rewritten in the image's header before this returns).
  void WriteImage(int64_t slot, absl::Span<uint8_t> image, Done done);
  // Reads `slot` into `image` (slot_bytes long) and checks that it is a valid image of `key`.
  void ReadImage(int64_t slot, BlockKey key, absl::Span<uint8_t> image, Done done);

  DiskTierStats stats() const { return stats_; }
  const std::string& path() const { return file_.path(); }
  int queue_depth() const { return config_.queue_depth; }

  Tier tier() const override { return Tier::kDisk; }
  int64_t num_slots() const override { return config_.num_slots; }
  int64_t payload_bytes() const override { return config_.codec.raw_bytes(); }
  int64_t slot_bytes() const override { return slot_bytes_; }
  bool persistent() const override { return true; }
  void Write(int64_t slot, BlockKey key, absl::Span<const uint8_t> payload, Done done) override;
  void Read(int64_t slot, BlockKey key, absl::Span<uint8_t> out, Done done) override;
  int Poll() override;
  // Waits until at least one operation has finished (when any is in flight), then Poll.
  int WaitAndPoll();
  void Flush() override;
  int64_t in_flight() const override { return in_flight_; }
  std::vector<StoredSlot> Scan() const override { return recovered_; }

 private:
  enum class OpKind { kWrite, kRead, kWriteImage, kReadImage };
  struct Op;
  DiskTier(DiskTierConfig config, SlotFile file, int64_t slot_bytes);
  absl::Status Start();
  absl::Status Recover();
  // Checks and posts one operation to the I/O thread (or, refused, straight to Poll).
  void Issue(OpKind kind, int64_t slot, BlockKey key, const uint8_t* src, uint8_t* dst,
             size_t bytes, Done done);
  void IoLoop();
  // I/O thread: assigns staging and the ring buffer; false when no staging slot is free.
  bool Prepare(Op* op);
  void Complete(Op* op, int32_t result);
  // I/O thread: fails `op` with `status` (returning its staging slot).
  void Fail(Op* op, const absl::Status& status);
  // I/O thread: returns `op`'s staging slot, if it holds one.
  void ReleaseStaging(Op* op);
  // I/O thread: hands finished operations to Poll and wakes the owner.
  void Deliver(std::vector<std::unique_ptr<Op>>* completed);
  // I/O thread: blocks until the owner writes the wake-up eventfd, then clears it.
  void WaitForWake();
  // I/O thread: clears the wake-up eventfd's count (non-blocking).
  void DrainWake();
  int BufferIndexOf(const uint8_t* p) const;

  DiskTierConfig config_;
  SlotFile file_;
  const int64_t slot_bytes_;
  AlignedBuffer staging_;
  std::unique_ptr<IoRing> ring_;  // the I/O thread's once started; null once it has failed
  absl::Status ring_status_;      // I/O thread: why the ring failed
  int event_fd_ = -1;
  int64_t region_chunk_bytes_ = 0;
  bool fixed_buffers_ = false;
  std::vector<int> free_staging_;  // I/O thread
  std::vector<StoredSlot> recovered_;

  // Owner thread.
  uint64_t next_generation_ = 1;
  int64_t in_flight_ = 0;
  DiskTierStats stats_;
  std::vector<std::unique_ptr<Op>> failed_;  // refused at the call; delivered by Poll

  std::mutex mu_;
  std::condition_variable finished_cv_;
  std::deque<std::unique_ptr<Op>> pending_;    // guarded by mu_
  std::vector<std::unique_ptr<Op>> finished_;  // guarded by mu_
  bool stop_ = false;                          // guarded by mu_
  std::thread thread_;
};

}  // namespace strata

#endif  // STRATA_MEMTIER_DISK_TIER_H_
