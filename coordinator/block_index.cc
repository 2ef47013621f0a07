#include "coordinator/block_index.h"

#include <algorithm>

namespace strata {
namespace {

// The entry of `worker` among a hash's holders, or null (const or not, as `holders` is).
template <typename Holders>
auto* FindIn(Holders& holders, WorkerSlot worker) {
  decltype(&*holders.begin()) found = nullptr;
  for (auto& h : holders) {
    if (h.worker == worker) {
      found = &h;
      break;
    }
  }
  return found;
}

}  // namespace

std::array<int64_t, kNumTiers>& BlockIndex::Counts(WorkerSlot worker) {
  if (worker >= counts_.size()) counts_.resize(worker + 1, {0, 0, 0});
  return counts_[worker];
}

BlockIndex::Holder* BlockIndex::FindOrAdd(BlockHash hash, WorkerSlot worker) {
  Holders& holders = entries_[hash];
  if (Holder* h = FindIn(holders, worker)) return h;
  holders.push_back(Holder{worker, 0, 0});
  return &holders.back();
}

void BlockIndex::MaybeErase(BlockHash hash, WorkerSlot worker) {
  auto it = entries_.find(hash);
  if (it == entries_.end()) return;
  Holders& holders = it->second;
  for (size_t i = 0; i < holders.size(); ++i) {
    if (holders[i].worker == worker && holders[i].tiers == 0 && holders[i].pending == 0) {
      holders.erase(holders.begin() + static_cast<ptrdiff_t>(i));
      break;
    }
  }
  if (holders.empty()) entries_.erase(it);
}

void BlockIndex::Stored(WorkerSlot worker, Tier tier, absl::Span<const BlockHash> hashes) {
  const TierMask bit = static_cast<TierMask>(1u << static_cast<int>(tier));
  auto& counts = Counts(worker);
  for (BlockHash hash : hashes) {
    Holder* h = FindOrAdd(hash, worker);
    if ((h->tiers & bit) == 0) {
      h->tiers |= bit;
      ++counts[static_cast<int>(tier)];
    }
  }
}

void BlockIndex::Removed(WorkerSlot worker, Tier tier, absl::Span<const BlockHash> hashes) {
  const TierMask bit = static_cast<TierMask>(1u << static_cast<int>(tier));
  auto& counts = Counts(worker);
  for (BlockHash hash : hashes) {
    auto it = entries_.find(hash);
    if (it == entries_.end()) continue;
    Holder* h = FindIn(it->second, worker);
    if (h != nullptr && (h->tiers & bit) != 0) {
      h->tiers &= static_cast<TierMask>(~bit);
      --counts[static_cast<int>(tier)];
    }
    MaybeErase(hash, worker);
  }
}

void BlockIndex::DropWorker(WorkerSlot worker) {
  for (auto it = entries_.begin(); it != entries_.end();) {
    Holders& holders = it->second;
    for (size_t i = 0; i < holders.size();) {
      if (holders[i].worker == worker) {
        holders[i].tiers = 0;
        if (holders[i].pending == 0) {
          holders.erase(holders.begin() + static_cast<ptrdiff_t>(i));
          continue;
        }
      }
      ++i;
    }
    if (holders.empty()) {
      entries_.erase(it++);
    } else {
      ++it;
    }
  }
  Counts(worker) = {0, 0, 0};
}

void BlockIndex::AddPending(WorkerSlot worker, absl::Span<const BlockHash> hashes) {
  for (BlockHash hash : hashes) {
    Holder* h = FindOrAdd(hash, worker);
    if (h->pending < UINT16_MAX) ++h->pending;
  }
}

void BlockIndex::RemovePending(WorkerSlot worker, absl::Span<const BlockHash> hashes) {
  for (BlockHash hash : hashes) {
    auto it = entries_.find(hash);
    if (it == entries_.end()) continue;
    Holder* h = FindIn(it->second, worker);
    if (h != nullptr && h->pending > 0) --h->pending;
    MaybeErase(hash, worker);
  }
}

BlockIndex::TierMask BlockIndex::MaskOf(const Holder* h) {
  if (h == nullptr) return 0;
  return static_cast<TierMask>(h->tiers | (h->pending > 0 ? 1u : 0u));
}

BlockIndex::TierMask BlockIndex::Find(BlockHash hash, WorkerSlot worker) const {
  auto it = entries_.find(hash);
  return it == entries_.end() ? 0 : MaskOf(FindIn(it->second, worker));
}

int BlockIndex::Pending(BlockHash hash, WorkerSlot worker) const {
  auto it = entries_.find(hash);
  const Holder* h = it == entries_.end() ? nullptr : FindIn(it->second, worker);
  return h == nullptr ? 0 : h->pending;
}

std::vector<std::array<int64_t, kNumTiers>> BlockIndex::PrefixOverlap(
    absl::Span<const BlockHash> hashes, absl::Span<const WorkerSlot> workers,
    bool with_pending) const {
  std::vector<std::array<int64_t, kNumTiers>> out(workers.size(), {0, 0, 0});
  std::vector<bool> alive(workers.size(), true);
  size_t num_alive = workers.size();
  for (BlockHash hash : hashes) {
    if (num_alive == 0) break;
    auto it = entries_.find(hash);
    if (it == entries_.end()) break;
    for (size_t i = 0; i < workers.size(); ++i) {
      if (!alive[i]) continue;
      const Holder* holder = FindIn(it->second, workers[i]);
      const TierMask mask = with_pending ? MaskOf(holder) : (holder != nullptr ? holder->tiers : 0);
      if (mask == 0) {
        alive[i] = false;
        --num_alive;
        continue;
      }
      // The fastest tier is the lowest set bit.
      int tier = 0;
      while ((mask & (1u << tier)) == 0) ++tier;
      ++out[i][tier];
    }
  }
  return out;
}

int64_t BlockIndex::NumBlocks(WorkerSlot worker, Tier tier) const {
  if (worker >= counts_.size()) return 0;
  return counts_[worker][static_cast<int>(tier)];
}

}  // namespace strata
