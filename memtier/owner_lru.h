// Slots in least-recently-used order, overall and per owner, for a tier's eviction: plain (the
// oldest slot of all) or fair (the oldest of the owner holding the most slots, so that one
// tenant's stream of new blocks pushes out its own before another's). An owner is a tenant's id
// as the engine numbers them (0: none).
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

class OwnerLru {
 public:
  explicit OwnerLru(int64_t num_slots) : entries_(static_cast<size_t>(num_slots)) {}

  // `slot` (not in the order) becomes the most recently used, held by `owner`.
  void PushBack(int64_t slot, int32_t owner);
  // Takes `slot` out of the order (it must be in it).
  void Erase(int64_t slot);
  // Makes `slot` (in the order) the most recently used.
  void Touch(int64_t slot);
  bool Contains(int64_t slot) const { return entries_[static_cast<size_t>(slot)].in; }
  int32_t owner(int64_t slot) const { return entries_[static_cast<size_t>(slot)].owner; }
  size_t size() const { return all_.size(); }
  bool empty() const { return all_.empty(); }
  void Clear();

  // Every slot, least recently used first.
  const std::list<int64_t>& all() const { return all_; }
  // The slots in the order eviction should consider them, as runs each oldest first: with `fair`
  // one run per owner, the owner holding most slots first (then the one whose oldest slot is
  // older); else the one run of all. `visit(run)` returns false to stop.
  template <typename Visit>
  void ForEachRun(bool fair, Visit visit) const {
    if (!fair) {
      visit(all_);
      return;
    }
    for (const Key& key : order_) {
      if (!visit(owners_.at(std::get<2>(key)).slots)) return;
    }
  }

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
  std::list<int64_t> all_;
  absl::flat_hash_map<int32_t, Owner> owners_;  // owners holding a slot
  std::set<Key> order_;
  uint64_t next_stamp_ = 0;
};

}  // namespace strata

#endif  // STRATA_MEMTIER_OWNER_LRU_H_
