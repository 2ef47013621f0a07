// BlockIndex: where KV blocks live in the cluster, as far as one coordinator knows.
//
// Maps a block hash to the workers that hold it and in which tiers, built from the workers'
// WatchEvents streams (stored / removed events per tier). It also holds "pending" entries: blocks
// that a request just routed to a worker will create there, counted as device-tier blocks until
// the request ends, so that a burst of requests sharing a prefix sees the prefix where the first
// of them went before the worker's events arrive.
//
// Soft state: everything about a worker is dropped when its event stream breaks and rebuilt from
// the snapshot of the next stream. Workers are named by small dense slot numbers.
//
// Not thread-safe; the owner serializes access.
#ifndef STRATA_COORDINATOR_BLOCK_INDEX_H_
#define STRATA_COORDINATOR_BLOCK_INDEX_H_

#include <array>
#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/inlined_vector.h"
#include "absl/types/span.h"
#include "common/hash.h"
#include "common/tier.h"

namespace strata {

using WorkerSlot = uint32_t;

class BlockIndex {
 public:
  // Bit i set: the block is in tier i (Tier's value).
  using TierMask = uint8_t;

  void Stored(WorkerSlot worker, Tier tier, absl::Span<const BlockHash> hashes);
  void Removed(WorkerSlot worker, Tier tier, absl::Span<const BlockHash> hashes);
  // Forgets every block of `worker` (its stream broke, or its epoch changed). Pending entries stay:
  // they belong to requests still running.
  void DropWorker(WorkerSlot worker);

  // Pending entries (reference-counted per worker and hash).
  void AddPending(WorkerSlot worker, absl::Span<const BlockHash> hashes);
  void RemovePending(WorkerSlot worker, absl::Span<const BlockHash> hashes);

  // The tiers that hold `hash` on `worker`, with pending entries as kDevice; 0 when none.
  TierMask Find(BlockHash hash, WorkerSlot worker) const;
  // In-flight requests routed to `worker` whose prompts hold `hash` (its pending references).
  int Pending(BlockHash hash, WorkerSlot worker) const;

  // For each worker in `workers`, the length of the longest prefix of `hashes` that it holds (in
  // any tier), and of that prefix how many blocks are in each worker's fastest tier: result[i][t] =
  // blocks of workers[i]'s matched prefix whose fastest tier is t. `with_pending` false: only the
  // blocks its events reported (what it could copy out now).
  std::vector<std::array<int64_t, kNumTiers>> PrefixOverlap(absl::Span<const BlockHash> hashes,
                                                            absl::Span<const WorkerSlot> workers,
                                                            bool with_pending = true) const;

  // Blocks indexed for `worker` in `tier` (from events; pending entries not included).
  int64_t NumBlocks(WorkerSlot worker, Tier tier) const;
  int64_t num_hashes() const { return static_cast<int64_t>(entries_.size()); }

 private:
  struct Holder {
    WorkerSlot worker;
    TierMask tiers;    // from events
    uint16_t pending;  // pending references
  };
  using Holders = absl::InlinedVector<Holder, 4>;

  // The tiers a holder stands for, pending entries as kDevice; 0 for none.
  static TierMask MaskOf(const Holder* holder);
  Holder* FindOrAdd(BlockHash hash, WorkerSlot worker);
  void MaybeErase(BlockHash hash, WorkerSlot worker);
  std::array<int64_t, kNumTiers>& Counts(WorkerSlot worker);

  absl::flat_hash_map<BlockHash, Holders> entries_;
  std::vector<std::array<int64_t, kNumTiers>> counts_;  // by slot
};

}  // namespace strata

#endif  // STRATA_COORDINATOR_BLOCK_INDEX_H_
