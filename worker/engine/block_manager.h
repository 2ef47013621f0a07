// BlockManager: the KV cache blocks of one worker, with prefix caching.
//
// Block states: free (no content), in use (reference count > 0, held by sequences), or cached
// (count 0 but holding a published full block, evictable in least-recently-released order). A full
// block is published under its chained hash (common/hash.h); a later sequence whose prompt starts
// with the same blocks (same tokens, same model / fine-tune / tenant namespace) acquires them
// instead of recomputing. Allocation takes free blocks first, then evicts the least recently used
// cached block; with fair eviction (SetFairEviction), the least recently used cached block of the
// owner (the tenant that published it) holding the most published blocks, so that one tenant's
// stream of new prompts pushes out its own cached blocks before another tenant's few.
//
// Every change to the set of published blocks is recorded as an event (stored / removed, by hash)
// for the coordinator's routing index. Not thread-safe: owned by the engine's step thread.
#ifndef STRATA_WORKER_ENGINE_BLOCK_MANAGER_H_
#define STRATA_WORKER_ENGINE_BLOCK_MANAGER_H_

#include <cstdint>
#include <functional>
#include <list>
#include <optional>
#include <set>
#include <tuple>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/types/span.h"
#include "common/hash.h"
#include "common/tier.h"
#include "memtier/block_tier.h"

namespace strata {

// A block entering or leaving a tier (the device tier here; memtier reports the others).
struct BlockEvent {
  enum class Kind { kStored, kRemoved };
  Kind kind;
  BlockHash hash;
  Tier tier;
};

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_tokens);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_tokens() const { return block_tokens_; }
  // Blocks that an allocation could take: free plus cached-and-unreferenced.
  int64_t num_available() const { return static_cast<int64_t>(free_.size() + lru_.size()); }
  int64_t num_cached() const { return static_cast<int64_t>(by_hash_.size()); }
  // Blocks holding nothing (never published, or freed unpublished): allocating one evicts nothing.
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }

  // Runs when a cached block is evicted, before its memory is reused (the KV store copies it
  // down a tier).
  void SetEvictionHook(std::function<void(int32_t block, BlockKey key, int32_t owner)> hook) {
    on_evict_ = std::move(hook);
  }

  // Eviction by owner (above); off: one least-recently-used order for all.
  void SetFairEviction(bool fair) { fair_eviction_ = fair; }
  // The owner a published block was published for (0 otherwise).
  int32_t owner(int32_t block) const { return blocks_[block].owner; }
  // Published blocks of `owner` (in use or cached).
  int64_t num_published_by(int32_t owner) const {
    auto it = owners_.find(owner);
    return it == owners_.end() ? 0 : it->second.published;
  }

  // How many leading hashes are published (whether in use or cached).
  int64_t MatchPrefix(absl::Span<const BlockHash> hashes) const;
  // Takes a reference to the published blocks of the first `n` hashes (n <= MatchPrefix(hashes)),
  // counting a hit on each unless `count_hits` is false (a reference only held, not a reuse).
  std::vector<int32_t> AcquirePrefix(absl::Span<const BlockHash> hashes, int64_t n,
                                     bool count_hits = true);
  // Takes a reference to the block published for `hash`, if any, without counting a hit (a hold
  // while it is copied, not a reuse): one lookup, for walks that go block by block.
  std::optional<int32_t> Hold(BlockHash hash);
  // A block for new content, or nullopt when none is available. `free_only`: only a block that
  // holds nothing (never evicts a cached one).
  std::optional<int32_t> Allocate(bool free_only = false);
  // Publishes a full, in-use block under `hash` (computed in `cache_namespace`) for `owner` (an id
  // of the tenant; 0 for all without one). If another block already holds `hash`, nothing changes
  // (this block stays private and is freed on release).
  void Publish(int32_t block, BlockHash hash, uint64_t cache_namespace = 0, int32_t owner = 0);
  // Drops one reference; at zero the block becomes cached (if published) or free.
  void Release(int32_t block);
  int32_t ref_count(int32_t block) const { return blocks_[block].refs; }
  // Times the published block was reused by AcquirePrefix since it was published.
  int32_t hit_count(int32_t block) const { return blocks_[block].hits; }
  BlockKey key(int32_t block) const { return {blocks_[block].hash, blocks_[block].ns}; }

  // Events since the last call, in order.
  std::vector<BlockEvent> DrainEvents();
  // Every published hash (in use or cached), in no particular order: the inventory that a fresh
  // subscriber to the events receives before the changes.
  std::vector<BlockHash> PublishedHashes() const;
  // Cached blocks (published, held by no sequence), least recently released first.
  std::vector<int32_t> CachedBlocks() const { return {lru_.begin(), lru_.end()}; }

 private:
  struct Block {
    int32_t refs = 0;
    bool published = false;
    BlockHash hash = 0;
    uint64_t ns = 0;
    int32_t hits = 0;
    std::list<int32_t>::iterator lru_pos;
    std::list<int32_t>::iterator owner_pos;  // in owners_[owner].lru, while in_lru
    bool in_lru = false;
    int32_t owner = 0;
    uint64_t released = 0;  // when it last became cached (a count of releases)
  };
  // An owner's place among the eviction candidates: the most published blocks first, then the
  // oldest least-recently-released block, then the id.
  using VictimKey = std::tuple<int64_t, uint64_t, int32_t>;
  struct Owner {
    int64_t published = 0;
    std::list<int32_t> lru;        // its cached blocks, least recently released first
    std::optional<VictimKey> key;  // in victims_ while it has a cached block
  };
  void Evict(int32_t block);
  void RemoveFromLru(Block& b);
  // Puts `o` back in victims_ under its current key (out of it without a cached block).
  void Reindex(int32_t owner, Owner& o);
  // The cached block to evict next.
  int32_t Victim() const;

  const int64_t num_blocks_;
  const int64_t block_tokens_;
  std::vector<Block> blocks_;
  std::vector<int32_t> free_;
  std::list<int32_t> lru_;  // cached, unreferenced; front is least recently released
  bool fair_eviction_ = false;
  uint64_t next_release_ = 0;
  absl::flat_hash_map<int32_t, Owner> owners_;  // owners with published blocks
  std::set<VictimKey> victims_;                 // owners with a cached block, the next first
  absl::flat_hash_map<BlockHash, int32_t> by_hash_;
  std::vector<BlockEvent> events_;
  std::function<void(int32_t, BlockKey, int32_t)> on_evict_;
};

}  // namespace strata

#endif  // STRATA_WORKER_ENGINE_BLOCK_MANAGER_H_
