// Slots in least-recently-used order, overall and per owner, for a tier's eviction: plain (the
// oldest slot of all) or fair (the oldest of the owner holding the most slots, so that one
// tenant's stream of new blocks pushes out its own before another's). An owner is a tenant's id
// as the engine numbers them, from 1; 0 is no tenant (blocks recovered from a disk file).
#ifndef STRATA_MEMTIER_OWNER_LRU_H_
#define STRATA_MEMTIER_OWNER_LRU_H_

#include <cstdint>
#include <list>
#include <optional>
#include <set>
#include <tuple>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace strata {

// Not thread-safe: one owner (the KV store's thread) calls every method.
class OwnerLru {
 public:
  // `fair`: keep the owners' orders too (otherwise owners are only recorded).
  explicit OwnerLru(int64_t num_slots, bool fair = false)
      : entries_(static_cast<size_t>(num_slots)), fair_(fair) {}

  // `slot` (not in the order) becomes the most recently used, held by `owner`.
  void PushBack(int64_t slot, int32_t owner);
  // Takes `slot` out of the order (it must be in it).
  void Erase(int64_t slot);
  // Makes `slot` (in the order) the most recently used.
  void Touch(int64_t slot);
  bool Contains(int64_t slot) const { return entries_[static_cast<size_t>(slot)].in; }
  int32_t owner(int64_t slot) const { return entries_[static_cast<size_t>(slot)].owner; }
  // Slots `owner` holds.
  int64_t count(int32_t owner) const {
    auto it = counts_.find(owner);
    return it == counts_.end() ? 0 : it->second;
  }
  bool fair() const { return fair_; }
  size_t size() const { return all_.size(); }
  bool empty() const { return all_.empty(); }
  void Clear();

  // Every slot, least recently used first.
  const std::list<int64_t>& all() const { return all_; }
  // The slot to evict first: the oldest of all, or (`fair` and kept fair) the oldest of the
  // owner holding the most, the older front on a tie. -1 when empty.
  int64_t Front(bool fair) const;
  // The slots as runs to search for a victim, each oldest first: with `fair` (and kept fair) one
  // run per owner, in Front's order of owners; else the one run of all. `visit(run)` returns
  // false to stop.
  template <typename Visit>
  void ForEachRun(bool fair, Visit visit) const {
    if (!fair || !fair_) {
      visit(all_);
      return;
    }
    for (const Key& key : order_) {
      if (!visit(owners_.at(std::get<2>(key)).slots)) return;
    }
  }
  // The slots in the order successive evictions would take them were none pinned: each next
  // the front of the owner holding the most that remain (fair), or of all. `visit(slot)`
  // returns false to stop. O(log owners) a slot.
  template <typename Visit>
  void ForEachInEvictionOrder(bool fair, Visit visit) const;

 private:
  // Most slots first, then the oldest front, then the owner's id.
  using Key = std::tuple<int64_t, uint64_t, int32_t>;
  struct Entry {
    std::list<int64_t>::iterator pos, owner_pos;
    uint64_t stamp = 0;  // when it last became the most recently used
    int32_t owner = 0;
    bool in = false;
  };
  struct Owner {
    std::list<int64_t> slots;  // least recently used first
    std::optional<Key> key;    // in order_ while it holds a slot
  };
  void Reindex(int32_t id, Owner& o);

  std::vector<Entry> entries_;
  bool fair_;
  std::list<int64_t> all_;
  absl::flat_hash_map<int32_t, Owner> owners_;    // owners holding a slot (fair_ only)
  absl::flat_hash_map<int32_t, int64_t> counts_;  // slots by owner (always)
  std::set<Key> order_;
  uint64_t next_stamp_ = 0;
};

template <typename Visit>
void OwnerLru::ForEachInEvictionOrder(bool fair, Visit visit) const {
  if (!fair || !fair_) {
    for (const int64_t s : all_) {
      if (!visit(s)) return;
    }
    return;
  }
  // Each owner's remaining count and next slot, ranked as order_ ranks the owners.
  struct Cursor {
    int64_t left;
    std::list<int64_t>::const_iterator next, end;
  };
  std::vector<Cursor> cursors;
  std::set<std::tuple<int64_t, uint64_t, size_t>> ranked;  // (-left, next's stamp, cursor)
  for (const Key& key : order_) {
    const Owner& o = owners_.at(std::get<2>(key));
    cursors.push_back({static_cast<int64_t>(o.slots.size()), o.slots.begin(), o.slots.end()});
    ranked.emplace(-cursors.back().left, std::get<1>(key), cursors.size() - 1);
  }
  while (!ranked.empty()) {
    const size_t c = std::get<2>(*ranked.begin());
    ranked.erase(ranked.begin());
    Cursor& cur = cursors[c];
    if (!visit(*cur.next)) return;
    ++cur.next;
    --cur.left;
    if (cur.next != cur.end) {
      ranked.emplace(-cur.left, entries_[static_cast<size_t>(*cur.next)].stamp, c);
    }
  }
}

}  // namespace strata

#endif  // STRATA_MEMTIER_OWNER_LRU_H_
