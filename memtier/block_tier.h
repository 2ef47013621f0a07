// BlockTier: one level of the KV block store, as an array of fixed-size block slots.
//
// Every tier (device memory, pinned host memory, disk) stores whole KV blocks under a BlockKey in
// numbered slots, and moves them with the same two asynchronous operations. The payload of a
// block is its raw KV bytes in the KvBlockLayout the engine computes them in; a tier may store it
// in another form (host and disk tiers add a checksummed header, and may quantize, kv_codec.h),
// but Read always returns exactly the bytes given to Write, or the nearest dequantized values.
//
// Contract, for every implementation (memtier/tier_conformance_test.cc checks it):
//   - Write(slot, key, payload, done) stores payload (exactly payload_bytes() long) in `slot`;
//     Read(slot, key, out, done) fills `out` (payload_bytes() long) with the block stored there.
//   - `done` runs exactly once, from Poll() or Flush() on the calling thread, never inside
//     Write/Read and never under a lock of the tier. Buffers passed in must stay valid until then.
//   - Read fails with NOT_FOUND when the slot was never written, DATA_LOSS when it holds another
//     key or fails its checksum (a torn write, bit rot): a miss, never wrong data. A bad slot
//     index or buffer size is INVALID_ARGUMENT. Media errors are UNAVAILABLE (EIO) or
//     RESOURCE_EXHAUSTED (ENOSPC), naming the tier and the slot.
//   - Operations on different slots are independent; the caller never has two operations on one
//     slot in flight at once (the policy above, kv_store.h, pins slots while they move).
//   - A persistent tier's Scan() lists the valid blocks it holds, as found when it was opened.
//
// Thread contract: one owning thread calls every method. A tier may run its own threads (the disk
// tier's I/O thread) and then calls `notify` from its config when completions are ready for Poll.
#ifndef STRATA_MEMTIER_BLOCK_TIER_H_
#define STRATA_MEMTIER_BLOCK_TIER_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/hash.h"
#include "common/tier.h"
#include "kernels/dtype.h"

namespace strata {

// Names a block: its chain hash and the cache namespace it was computed under (common/hash.h).
struct BlockKey {
  BlockHash hash = 0;
  uint64_t cache_namespace = 0;
  friend bool operator==(const BlockKey& a, const BlockKey& b) {
    return a.hash == b.hash && a.cache_namespace == b.cache_namespace;
  }
};

// The raw bytes of one KV block: `num_segments` segments (K and V of each layer, for each
// tensor-parallel rank whose cache the tier serves), each [block_tokens, num_heads, head_dim]
// elements of `dtype` (f32 for the CPU engine, the activation type of a GPU engine: f32, f16 or
// bf16), concatenated in segment order.
struct KvBlockLayout {
  int64_t num_segments = 0;
  int64_t block_tokens = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  DType dtype = DType::kF32;

  int64_t segment_elements() const { return block_tokens * num_heads * head_dim; }
  int64_t element_bytes() const { return DTypeBytes(dtype); }
  int64_t segment_bytes() const { return segment_elements() * element_bytes(); }
  int64_t block_bytes() const { return num_segments * segment_bytes(); }
  bool valid() const {
    return num_segments > 0 && block_tokens > 0 && num_heads > 0 && head_dim > 0 &&
           (dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16);
  }
};

// A valid block a persistent tier found at open.
struct StoredSlot {
  int64_t slot = 0;
  BlockKey key;
  // Write generation: when two slots hold one key (a crash between two writes), the newer wins.
  uint64_t generation = 0;
};

class BlockTier {
 public:
  using Done = absl::AnyInvocable<void(absl::Status) &&>;

  virtual ~BlockTier() = default;

  virtual Tier tier() const = 0;
  virtual int64_t num_slots() const = 0;
  // Bytes of the raw block that Write takes and Read returns.
  virtual int64_t payload_bytes() const = 0;
  // Bytes one slot takes in this tier's memory or file (header, compression and padding
  // included): what its byte capacity is divided by.
  virtual int64_t slot_bytes() const = 0;
  // Whether blocks survive the process (Scan finds them again).
  virtual bool persistent() const = 0;

  virtual void Write(int64_t slot, BlockKey key, absl::Span<const uint8_t> payload, Done done) = 0;
  virtual void Read(int64_t slot, BlockKey key, absl::Span<uint8_t> out, Done done) = 0;

  // Runs the callbacks of finished operations; returns how many ran.
  virtual int Poll() = 0;
  // Waits for every operation issued so far and runs its callback.
  virtual void Flush() = 0;
  // Operations issued whose callbacks have not run.
  virtual int64_t in_flight() const = 0;

  // The valid blocks found when the tier was opened (empty for a volatile tier).
  virtual std::vector<StoredSlot> Scan() const = 0;
};

// Base of the tiers whose copies complete within Write/Read (device and host memory): the callbacks
// wait here for Poll, as the contract asks, and nothing survives the process.
class ImmediateTier : public BlockTier {
 public:
  bool persistent() const override { return false; }
  // Runs what finished before the call (callbacks may issue more); returns how many ran.
  int Poll() override {
    std::vector<std::pair<Done, absl::Status>> ready;
    ready.swap(ready_);
    for (auto& [done, status] : ready) std::move(done)(std::move(status));
    return static_cast<int>(ready.size());
  }
  void Flush() override {
    while (Poll() > 0) {
    }
  }
  int64_t in_flight() const override { return static_cast<int64_t>(ready_.size()); }
  std::vector<StoredSlot> Scan() const override { return {}; }

 protected:
  // Records a finished operation for the next Poll.
  void Finish(Done done, absl::Status status) {
    ready_.emplace_back(std::move(done), std::move(status));
  }

 private:
  std::vector<std::pair<Done, absl::Status>> ready_;
};

// Checks what every tier's Write/Read must refuse. OK, or INVALID_ARGUMENT naming the tier.
absl::Status CheckSlotAccess(const BlockTier& tier, int64_t slot, size_t buffer_bytes);

}  // namespace strata

#endif  // STRATA_MEMTIER_BLOCK_TIER_H_
