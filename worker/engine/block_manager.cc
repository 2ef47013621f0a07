#include "worker/engine/block_manager.h"

#include "common/log.h"

namespace strata {

BlockManager::BlockManager(int64_t num_blocks, int64_t block_tokens)
    : num_blocks_(num_blocks), block_tokens_(block_tokens), blocks_(num_blocks) {
  CHECK_GT(num_blocks, 0);
  CHECK_GT(block_tokens, 0);
  free_.reserve(num_blocks);
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

int64_t BlockManager::MatchPrefix(absl::Span<const BlockHash> hashes) const {
  int64_t n = 0;
  for (BlockHash h : hashes) {
    if (!by_hash_.contains(h)) break;
    ++n;
  }
  return n;
}

std::vector<int32_t> BlockManager::AcquirePrefix(absl::Span<const BlockHash> hashes, int64_t n,
                                                 bool count_hits) {
  std::vector<int32_t> out;
  for (int64_t i = 0; i < n; ++i) {
    auto it = by_hash_.find(hashes[i]);
    CHECK(it != by_hash_.end()) << "AcquirePrefix beyond MatchPrefix";
    Block& b = blocks_[it->second];
    RemoveFromLru(b);
    ++b.refs;
    if (count_hits) ++b.hits;
    out.push_back(it->second);
  }
  return out;
}

std::optional<int32_t> BlockManager::Hold(BlockHash hash) {
  auto it = by_hash_.find(hash);
  if (it == by_hash_.end()) return std::nullopt;
  Block& b = blocks_[it->second];
  RemoveFromLru(b);
  ++b.refs;
  return it->second;
}

std::optional<int32_t> BlockManager::Allocate(bool free_only) {
  int32_t id;
  if (!free_.empty()) {
    id = free_.back();
    free_.pop_back();
  } else if (!lru_.empty() && !free_only) {
    id = Victim();
    Evict(id);
  } else {
    return std::nullopt;
  }
  Block& b = blocks_[id];
  b.refs = 1;
  return id;
}

int32_t BlockManager::Victim() const {
  if (!fair_eviction_) return lru_.front();
  // The owner holding the most published blocks among those with a cached one; of equals, the
  // one whose least recently released block is older (the plain LRU order between them).
  return owners_.at(std::get<2>(*victims_.begin())).lru.front();
}

void BlockManager::Reindex(int32_t owner, Owner& o) {
  if (o.key.has_value()) victims_.erase(*o.key);
  o.key.reset();
  if (o.lru.empty()) return;
  o.key = VictimKey{-o.published, blocks_[o.lru.front()].released, owner};
  victims_.insert(*o.key);
}

void BlockManager::RemoveFromLru(Block& b) {
  if (!b.in_lru) return;
  lru_.erase(b.lru_pos);
  Owner& o = owners_[b.owner];
  o.lru.erase(b.owner_pos);
  Reindex(b.owner, o);
  b.in_lru = false;
}

void BlockManager::Evict(int32_t id) {
  Block& b = blocks_[id];
  DCHECK(b.in_lru);
  RemoveFromLru(b);
  if (auto it = owners_.find(b.owner); it != owners_.end()) {
    if (--it->second.published == 0) {
      DCHECK(!it->second.key.has_value());  // (its last cached block was this one)
      owners_.erase(it);
    } else {
      Reindex(b.owner, it->second);
    }
  }
  const int32_t owner = b.owner;
  b.owner = 0;
  if (on_evict_) on_evict_(id, BlockKey{b.hash, b.ns}, owner);
  by_hash_.erase(b.hash);
  events_.push_back({BlockEvent::Kind::kRemoved, b.hash, Tier::kDevice});
  b.published = false;
  b.hash = 0;
  b.ns = 0;
  b.hits = 0;
}

void BlockManager::Publish(int32_t id, BlockHash hash, uint64_t cache_namespace, int32_t owner) {
  Block& b = blocks_[id];
  DCHECK_LT(0, b.refs);
  if (b.published || by_hash_.contains(hash)) return;
  b.published = true;
  b.owner = owner;
  Owner& o = owners_[owner];
  ++o.published;
  Reindex(owner, o);
  b.hash = hash;
  b.ns = cache_namespace;
  b.hits = 0;
  by_hash_[hash] = id;
  events_.push_back({BlockEvent::Kind::kStored, hash, Tier::kDevice});
}

void BlockManager::Release(int32_t id) {
  Block& b = blocks_[id];
  CHECK_GT(b.refs, 0) << "block " << id << " released more often than acquired";
  if (--b.refs > 0) return;
  if (b.published) {
    lru_.push_back(id);
    b.lru_pos = std::prev(lru_.end());
    Owner& o = owners_[b.owner];
    o.lru.push_back(id);
    b.owner_pos = std::prev(o.lru.end());
    b.released = next_release_++;
    b.in_lru = true;
    Reindex(b.owner, o);
  } else {
    free_.push_back(id);
  }
}

std::vector<BlockEvent> BlockManager::DrainEvents() {
  std::vector<BlockEvent> out;
  out.swap(events_);
  return out;
}

std::vector<BlockHash> BlockManager::PublishedHashes() const {
  std::vector<BlockHash> out;
  out.reserve(by_hash_.size());
  for (const auto& [hash, block] : by_hash_) out.push_back(hash);
  return out;
}

}  // namespace strata
