#include "memtier/owner_lru.h"

#include "common/log.h"

namespace strata {

void OwnerLru::Reindex(int32_t id, Owner& o) {
  if (o.key.has_value()) order_.erase(*o.key);
  o.key.reset();
  if (o.slots.empty()) return;
  o.key = Key{-static_cast<int64_t>(o.slots.size()),
              entries_[static_cast<size_t>(o.slots.front())].stamp, id};
  order_.insert(*o.key);
}

void OwnerLru::PushBack(int64_t slot, int32_t owner) {
  Entry& e = entries_[static_cast<size_t>(slot)];
  CHECK(!e.in) << "slot " << slot << " is in the order already";
  e.in = true;
  e.owner = owner;
  e.stamp = next_stamp_++;
  e.pos = all_.insert(all_.end(), slot);
  ++counts_[owner];
  if (!fair_) return;
  Owner& o = owners_[owner];
  e.owner_pos = o.slots.insert(o.slots.end(), slot);
  Reindex(owner, o);
}

void OwnerLru::Erase(int64_t slot) {
  Entry& e = entries_[static_cast<size_t>(slot)];
  CHECK(e.in) << "slot " << slot << " is not in the order";
  e.in = false;
  all_.erase(e.pos);
  if (auto c = counts_.find(e.owner); --c->second == 0) counts_.erase(c);
  if (!fair_) return;
  auto it = owners_.find(e.owner);
  it->second.slots.erase(e.owner_pos);
  Reindex(e.owner, it->second);
  if (it->second.slots.empty()) owners_.erase(it);
}

void OwnerLru::Touch(int64_t slot) {
  Entry& e = entries_[static_cast<size_t>(slot)];
  CHECK(e.in) << "slot " << slot << " is not in the order";
  e.stamp = next_stamp_++;
  all_.splice(all_.end(), all_, e.pos);
  if (!fair_) return;
  Owner& o = owners_.at(e.owner);
  const bool was_front = o.slots.front() == slot;
  o.slots.splice(o.slots.end(), o.slots, e.owner_pos);
  // The owner's rank moves only with its oldest slot (its count stays).
  if (was_front) Reindex(e.owner, o);
}

int64_t OwnerLru::Front(bool fair) const {
  if (all_.empty()) return -1;
  if (!fair || !fair_) return all_.front();
  return owners_.at(std::get<2>(*order_.begin())).slots.front();
}

void OwnerLru::Clear() {
  for (const int64_t s : all_) entries_[static_cast<size_t>(s)].in = false;
  all_.clear();
  owners_.clear();
  counts_.clear();
  order_.clear();
}

}  // namespace strata
