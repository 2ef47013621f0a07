#include "memtier/kv_store.h"

#include <algorithm>
#include <cstring>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/copy.h"
#include "common/log.h"

#ifdef STRATA_HAVE_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace strata {
namespace {

// Runs one operation of a memory tier (which completes within the call) to its callback.
template <typename Issue>
absl::Status RunNow(BlockTier& tier, Issue issue) {
  absl::Status result = absl::InternalError("tier callback did not run");
  issue([&result](absl::Status s) { result = std::move(s); });
  tier.Flush();
  return result;
}

// Host entries looked at for a clean victim (in the LRU order searched: of all, or each owner's
// when fair) before the oldest block is taken regardless.
constexpr int kCleanVictimScan = 64;

}  // namespace

absl::StatusOr<std::unique_ptr<KvStore>> KvStore::Create(KvStoreConfig config, KvBlockLayout layout,
                                                         BlockTier* device) {
  if (!layout.valid()) return absl::InvalidArgumentError("kv store: invalid block layout");
  if (device == nullptr || device->payload_bytes() != layout.block_bytes()) {
    return absl::InvalidArgumentError("kv store: the device tier does not hold this layout");
  }
  if (config.host_bytes < 0 || config.disk_bytes < 0) {
    return absl::InvalidArgumentError("kv store: tier capacities must not be negative");
  }
  if (config.disk_bytes > 0 && config.host_bytes == 0) {
    return absl::InvalidArgumentError(
        "kv store: a disk tier needs a host tier (blocks move to disk through host memory)");
  }
  if (config.disk_bytes > 0 && config.disk_path.empty()) {
    return absl::InvalidArgumentError("kv store: a disk tier needs a path");
  }
  std::unique_ptr<KvStore> store(new KvStore(std::move(config), layout, device));
  if (absl::Status s = store->OpenTiers(); !s.ok()) return s;
#ifdef STRATA_HAVE_CUDA
  // A GPU device tier copies blocks into and out of the staging block: page-locked, those copies
  // are DMA at full speed (best effort; without a driver it stays pageable).
  if (store->config_.pin_host) {
    store->staging_pinned_ =
        RegisterPinnedHostMemory(store->staging_.data(), store->staging_.size()).ok();
  }
#endif
  return store;
}

KvStore::KvStore(KvStoreConfig config, KvBlockLayout layout, BlockTier* device)
    : config_(std::move(config)),
      codec_(layout, config_.compression),
      device_(device),
      staging_(layout.block_bytes()) {}

absl::Status KvStore::OpenTiers() {
  if (config_.host_bytes == 0) return absl::OkStatus();
  const int64_t slot_bytes = HostTier::SlotBytesFor(codec_);
  HostTierConfig hc;
  hc.codec = codec_;
  hc.num_slots = config_.host_bytes / slot_bytes;
  hc.pin = config_.pin_host;
  if (hc.num_slots == 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv store: host tier of ", config_.host_bytes,
                                                   " bytes holds no ", slot_bytes, "-byte block"));
  }
  absl::StatusOr<std::unique_ptr<HostTier>> host = HostTier::Create(hc);
  if (!host.ok()) return host.status();
  host_ = *std::move(host);
  host_slots_.resize(hc.num_slots);
  host_order_ = OwnerLru(hc.num_slots, config_.fair_eviction);
  for (int64_t s = hc.num_slots - 1; s >= 0; --s) host_free_.push_back(s);
  if (config_.disk_bytes == 0) return absl::OkStatus();

  DiskTierConfig dc;
  dc.path = config_.disk_path;
  dc.codec = codec_;
  dc.queue_depth = config_.disk_queue_depth;
  dc.registered_region = host_->region();
  dc.notify = [this] {
    std::lock_guard<std::mutex> lock(notify_mu_);
    if (notify_) notify_();
  };
  dc.recover = config_.disk_recover;
  dc.fault_injector = config_.disk_fault_injector;
  dc.ring_fault_injector = config_.disk_ring_fault_injector;
  dc.num_slots = config_.disk_bytes / slot_bytes;
  if (dc.num_slots == 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv store: disk tier of ", config_.disk_bytes,
                                                   " bytes holds no ", slot_bytes, "-byte block"));
  }
  absl::StatusOr<std::unique_ptr<DiskTier>> disk = DiskTier::Open(dc);
  // A file system without room for the whole tier: take what fits.
  while (absl::IsResourceExhausted(disk.status()) && dc.num_slots > 1) {
    dc.num_slots /= 2;
    LOG(WARNING) << disk.status().message() << "; trying " << dc.num_slots << " slots";
    disk = DiskTier::Open(dc);
  }
  // A file another worker holds, or a bad setting, is the operator's to fix; a disk that fails is
  // served around.
  if (absl::IsFailedPrecondition(disk.status()) || absl::IsInvalidArgument(disk.status())) {
    return disk.status();
  }
  if (!disk.ok()) {
    LOG(ERROR) << "kv store: serving without a disk tier: " << disk.status();
    return absl::OkStatus();
  }
  disk_ = *std::move(disk);
  disk_enabled_ = true;
  disk_slots_.resize(dc.num_slots);
  disk_order_ = OwnerLru(dc.num_slots, config_.fair_eviction);
  std::vector<StoredSlot> found = disk_->Scan();
  // Oldest first into the LRU.
  std::sort(found.begin(), found.end(),
            [](const StoredSlot& a, const StoredSlot& b) { return a.generation < b.generation; });
  std::vector<bool> used(dc.num_slots, false);
  for (const StoredSlot& f : found) {
    DiskSlot& d = disk_slots_[f.slot];
    d.state = DiskSlot::State::kReady;
    d.key = f.key;
    disk_order_.PushBack(f.slot, /*owner=*/0);  // whose it was is not recorded
    disk_index_[f.key.hash] = f.slot;
    used[f.slot] = true;
  }
  for (int64_t s = dc.num_slots - 1; s >= 0; --s) {
    if (!used[s]) disk_free_.push_back(s);
  }
  stats_.disk_recovered = static_cast<int64_t>(found.size());
  if (!found.empty()) {
    LOG(INFO) << "kv store: " << found.size() << " blocks recovered from " << dc.path;
  }
  return absl::OkStatus();
}

KvStore::~KvStore() {
  Flush();
#ifdef STRATA_HAVE_CUDA
  if (staging_pinned_) UnregisterPinnedHostMemory(staging_.data()).IgnoreError();
#endif
}

KvStore::Where KvStore::Find(BlockHash hash) const {
  if (auto it = host_index_.find(hash); it != host_index_.end()) {
    return host_slots_[it->second].state == HostSlot::State::kReady ? Where::kHost
                                                                    : Where::kLoading;
  }
  if (disk_enabled_) {
    if (auto it = disk_index_.find(hash); it != disk_index_.end()) {
      // A block being written from a copy (its host slot already reused) can be loaded soon.
      return disk_slots_[it->second].state == DiskSlot::State::kReady ? Where::kDisk
                                                                      : Where::kLoading;
    }
  }
  return Where::kNone;
}

void KvStore::PinHost(int64_t slot) { ++host_slots_[slot].pins; }

void KvStore::UnpinHost(int64_t slot) {
  CHECK_GT(host_slots_[slot].pins, 0);
  --host_slots_[slot].pins;
}

void KvStore::TouchHost(int64_t slot) {
  if (host_order_.Contains(slot)) host_order_.Touch(slot);
}

void KvStore::PinDisk(int64_t slot) {
  DiskSlot& d = disk_slots_[slot];
  if (disk_order_.Contains(slot)) disk_order_.Erase(slot);
  ++d.pins;
}

void KvStore::UnpinDisk(int64_t slot) {
  DiskSlot& d = disk_slots_[slot];
  CHECK_GT(d.pins, 0);
  CHECK(!disk_order_.Contains(slot));
  if (--d.pins > 0 || d.state != DiskSlot::State::kReady) return;
  disk_order_.PushBack(slot, d.owner);
}

void KvStore::EvictHost(int64_t slot) {
  HostSlot& h = host_slots_[slot];
  DCHECK(host_order_.Contains(slot) && h.pins == 0);
  host_order_.Erase(slot);
  host_index_.erase(h.key.hash);
  if (h.prefetched) promoted_.erase(h.key.hash);
  Emit(Tier::kHost, false, h.key.hash);
  h = HostSlot();
}

void KvStore::EvictDisk(int64_t slot) {
  DiskSlot& d = disk_slots_[slot];
  CHECK(disk_order_.Contains(slot) && d.pins == 0);
  disk_order_.Erase(slot);
  disk_index_.erase(d.key.hash);
  // A host copy is no longer clean.
  if (auto it = host_index_.find(d.key.hash); it != host_index_.end()) {
    host_slots_[it->second].clean = false;
  }
  Emit(Tier::kDisk, false, d.key.hash);
  d = DiskSlot();
}

int64_t KvStore::AllocateHost(bool wait_for_disk) {
  int64_t victim;
  for (;;) {
    if (!host_free_.empty()) {
      const int64_t s = host_free_.back();
      host_free_.pop_back();
      return s;
    }
    victim = HostVictim();
    // Every slot is pinned, most likely by writes to disk in flight (a burst larger than the
    // host tier, written through or back): wait for the disk rather than drop the block.
    if (victim >= 0 || !wait_for_disk || !disk_enabled_ || disk_->in_flight() == 0) break;
    WaitForDisk();
  }
  if (victim < 0) return -1;
  // A dirty victim goes to disk from a copy (the write-backs fell behind a burst).
  if (disk_enabled_ && !host_slots_[victim].clean) {
    ++stats_.dirty_evictions;
    if (!SpillToDisk(victim, wait_for_disk)) ++stats_.lost_evictions;
  }
  EvictHost(victim);
  ++stats_.host.evictions;
  return victim;
}

void KvStore::WaitForDisk() {
  const absl::Time start = absl::Now();
  disk_->WaitAndPoll();
  ++stats_.disk_waits;
  stats_.disk_wait_seconds += absl::ToDoubleSeconds(absl::Now() - start);
}

int64_t KvStore::HostVictim() const {
  // The least recently used clean block (a disk copy exists), else the least recently used one,
  // of all or (fair) of the owner holding the most, passing to the next owner only when all of
  // one's blocks are pinned. Preference: clean and not loaded for a request still waiting for it;
  // then clean; then the oldest.
  int64_t victim = -1;
  host_order_.ForEachRun(config_.fair_eviction, [&](const std::list<int64_t>& run) {
    int64_t clean_prefetched = -1, oldest = -1;
    int scanned = 0;
    for (auto it = run.begin(); it != run.end() && scanned < kCleanVictimScan; ++it) {
      const HostSlot& h = host_slots_[*it];
      if (h.pins > 0) continue;
      ++scanned;
      if (oldest < 0) oldest = *it;
      if (h.clean && !h.prefetched) {
        victim = *it;
        return false;
      }
      if (h.clean && clean_prefetched < 0) clean_prefetched = *it;
    }
    victim = clean_prefetched >= 0 ? clean_prefetched : oldest;
    return victim < 0;
  });
  return victim;
}

int64_t KvStore::AllocateDisk() {
  if (!disk_free_.empty()) {
    const int64_t s = disk_free_.back();
    disk_free_.pop_back();
    return s;
  }
  // Persist takes the oldest of all: it makes room for the host tier's blocks, most recently
  // used first, and by owner it would evict its own earlier writes.
  const int64_t s = disk_order_.Front(config_.fair_eviction && !persisting_);
  if (s < 0) return -1;
  EvictDisk(s);
  ++stats_.disk.evictions;
  return s;
}

void KvStore::Put(int64_t device_slot, BlockKey key, bool to_disk, int32_t owner) {
  if (host_ == nullptr) return;
  if (auto it = host_index_.find(key.hash); it != host_index_.end()) {
    const int64_t s = it->second;
    HostSlot& h = host_slots_[s];
    TouchHost(s);  // most recently used
    if (to_disk && h.state == HostSlot::State::kReady && !h.clean && !h.writing) {
      StartWriteBack(s);
    }
    return;
  }
  const int64_t s = AllocateHost(/*wait_for_disk=*/true);
  if (s < 0) {
    ++stats_.dropped_puts;
    return;
  }
  absl::Status st;
  if (host_->stores_raw()) {
    // Raw blocks go from the device straight into the slot's image, sealed in place.
    st = RunNow(*device_, [&](BlockTier::Done done) {
      device_->Read(device_slot, key, host_->raw_payload(s), std::move(done));
    });
    if (st.ok()) st = host_->Seal(s, key);
  } else {
    st = RunNow(*device_, [&](BlockTier::Done done) {
      device_->Read(device_slot, key, absl::MakeSpan(staging_), std::move(done));
    });
    if (st.ok()) {
      st = RunNow(*host_,
                  [&](BlockTier::Done done) { host_->Write(s, key, staging_, std::move(done)); });
    }
  }
  if (!st.ok()) {
    LOG(ERROR) << "kv store: cannot copy device slot " << device_slot << " to host: " << st;
    host_free_.push_back(s);
    return;
  }
  HostSlot& h = host_slots_[s];
  h.state = HostSlot::State::kReady;
  h.key = key;
  h.clean = false;
  if (disk_enabled_) {
    auto d = disk_index_.find(key.hash);
    h.clean = d != disk_index_.end() && disk_slots_[d->second].state == DiskSlot::State::kReady;
  }
  h.owner = owner;
  host_index_[key.hash] = s;
  host_order_.PushBack(s, owner);
  ++stats_.host.stores;
  Emit(Tier::kHost, true, key.hash);
  if (to_disk && !h.clean) StartWriteBack(s);
}

void KvStore::DropIfDamaged(int64_t slot, const absl::Status& read) {
  if (!absl::IsDataLoss(read)) return;
  ++stats_.corrupt_blocks;
  LOG(WARNING) << "kv store: dropping a damaged host block: " << read;
  if (host_slots_[slot].pins == 0) {
    EvictHost(slot);
    host_free_.push_back(slot);
  }
}

absl::Status KvStore::Restore(BlockHash hash, int64_t device_slot, bool speculative) {
  auto it = host_index_.find(hash);
  if (it == host_index_.end() || host_slots_[it->second].state != HostSlot::State::kReady) {
    return absl::NotFoundError("kv store: block not ready in the host tier");
  }
  const int64_t s = it->second;
  const BlockKey key = host_slots_[s].key;
  PinHost(s);
  absl::Status st;
  if (host_->stores_raw()) {
    // A raw block goes from the slot's image (checked first) straight to the device.
    st = host_->Check(s, key);
    if (st.ok()) {
      st = RunNow(*device_, [&](BlockTier::Done done) {
        device_->Write(device_slot, key, host_->raw_payload(s), std::move(done));
      });
    }
  } else {
    st = RunNow(*host_, [&](BlockTier::Done done) {
      host_->Read(s, key, absl::MakeSpan(staging_), std::move(done));
    });
    if (st.ok()) {
      st = RunNow(*device_, [&](BlockTier::Done done) {
        device_->Write(device_slot, key, staging_, std::move(done));
      });
    }
  }
  UnpinHost(s);
  TouchHost(s);
  if (!st.ok()) {
    DropIfDamaged(s, st);
    return st;
  }
  ++stats_.host.hits;
  // A block that prefetch loaded from disk was counted as promoted then; moving it on up to the
  // device is the same promotion.
  HostSlot& h = host_slots_[s];
  if (speculative && !h.prefetched && promoted_.insert(hash).second) ++stats_.prefetch_promoted;
  h.prefetched = false;
  return absl::OkStatus();
}

absl::StatusOr<BlockKey> KvStore::ReadHost(BlockHash hash, absl::Span<uint8_t> raw) {
  auto it = host_index_.find(hash);
  if (it == host_index_.end() || host_slots_[it->second].state != HostSlot::State::kReady) {
    return absl::NotFoundError("kv store: block not ready in the host tier");
  }
  const int64_t s = it->second;
  const BlockKey key = host_slots_[s].key;
  PinHost(s);
  const absl::Status st =
      RunNow(*host_, [&](BlockTier::Done done) { host_->Read(s, key, raw, std::move(done)); });
  UnpinHost(s);
  TouchHost(s);
  if (!st.ok()) {
    DropIfDamaged(s, st);
    return st;
  }
  ++stats_.host.hits;
  return key;
}

bool KvStore::Pin(BlockHash hash) {
  auto it = host_index_.find(hash);
  if (it == host_index_.end() || host_slots_[it->second].state != HostSlot::State::kReady) {
    return false;
  }
  PinHost(it->second);
  return true;
}

void KvStore::Unpin(BlockHash hash) {
  auto it = host_index_.find(hash);
  CHECK(it != host_index_.end()) << "Unpin without Pin";
  UnpinHost(it->second);
}

int KvStore::Prefetch(absl::Span<const BlockHash> hashes) {
  // One request's chain must not evict itself from a small host tier.
  // Counting the loads already in flight, since a waiting request calls again every step.
  const int64_t max_loads =
      std::max<int64_t>(1, static_cast<int64_t>(host_slots_.size()) / 2) - loads_in_flight_;
  int started = 0;
  for (BlockHash hash : hashes) {
    if (started >= max_loads) break;
    const Where where = Find(hash);
    if (where == Where::kHost || where == Where::kLoading) continue;
    if (where == Where::kNone) break;             // the chain ends here
    if (!StartLoad(disk_index_.at(hash))) break;  // no host slot free
    ++started;
  }
  return started;
}

void KvStore::RecordLowerTierHit(BlockHash hash, bool covered) {
  ++stats_.lower_tier_hits;
  if (covered) ++stats_.lower_tier_hits_covered;
  if (promoted_.erase(hash) > 0) ++stats_.prefetch_used;
  if (auto it = host_index_.find(hash); it != host_index_.end()) {
    host_slots_[it->second].prefetched = false;
  }
  // Bounded: promotions nobody used are forgotten when their host copy goes; device promotions
  // are forgotten wholesale if the set grows past this.
  if (promoted_.size() > (size_t{1} << 16)) promoted_.clear();
}

bool KvStore::StartLoad(int64_t disk_slot) {
  // Pinned first: making room in host may spill a block to disk, which must not take this slot.
  const BlockKey key = disk_slots_[disk_slot].key;
  PinDisk(disk_slot);
  const int64_t hs = AllocateHost(/*wait_for_disk=*/false);
  if (hs < 0) {
    UnpinDisk(disk_slot);
    return false;
  }
  HostSlot& h = host_slots_[hs];
  h.state = HostSlot::State::kLoading;
  h.key = key;
  h.owner = disk_slots_[disk_slot].owner;
  host_index_[key.hash] = hs;
  ++loads_in_flight_;
  const uint64_t epoch = disk_epoch_;
  disk_->ReadImage(disk_slot, key, host_->image(hs),
                   [this, hs, disk_slot, epoch, key](absl::Status st) {
                     --loads_in_flight_;
                     HostSlot& h = host_slots_[hs];
                     const bool current = epoch == disk_epoch_;
                     if (st.ok()) {
                       h.state = HostSlot::State::kReady;
                       h.clean = current;
                       h.prefetched = true;
                       host_order_.PushBack(hs, h.owner);
                       Emit(Tier::kHost, true, key.hash);
                       ++stats_.loads;
                       ++stats_.disk.hits;
                       ++stats_.prefetch_promoted;
                       promoted_.insert(key.hash);
                     } else {
                       host_index_.erase(key.hash);
                       h = HostSlot();
                       host_free_.push_back(hs);
                     }
                     if (!current) return;
                     UnpinDisk(disk_slot);
                     if (st.ok()) {
                       consecutive_disk_errors_ = 0;
                       return;
                     }
                     // The disk copy is unusable: forget it.
                     if (disk_order_.Contains(disk_slot)) {
                       EvictDisk(disk_slot);
                       disk_free_.push_back(disk_slot);
                     }
                     if (absl::IsDataLoss(st) || absl::IsNotFound(st)) {
                       ++stats_.corrupt_blocks;
                       LOG(WARNING) << "kv store: " << st;
                     } else {
                       DiskFailed(st);
                     }
                   });
  return true;
}

bool KvStore::WriteToDisk(BlockKey key, int32_t owner, absl::Span<uint8_t> image,
                          absl::AnyInvocable<void(bool ok) &&> after) {
  const int64_t ds = AllocateDisk();
  if (ds < 0) {
    std::move(after)(false);
    return false;
  }
  DiskSlot& d = disk_slots_[ds];
  d.state = DiskSlot::State::kWriting;
  d.key = key;
  d.owner = owner;
  disk_index_[key.hash] = ds;
  ++writes_in_flight_;
  const uint64_t epoch = disk_epoch_;
  disk_->WriteImage(ds, image,
                    [this, ds, epoch, key, after = std::move(after)](absl::Status st) mutable {
                      --writes_in_flight_;
                      const bool current = epoch == disk_epoch_;
                      if (current) {
                        DiskSlot& d = disk_slots_[ds];
                        if (st.ok()) {
                          consecutive_disk_errors_ = 0;
                          d.state = DiskSlot::State::kReady;
                          CHECK_EQ(d.pins, 0) << "a disk slot was read while written";
                          disk_order_.PushBack(ds, d.owner);
                          ++stats_.write_backs;
                          ++stats_.disk.stores;
                          Emit(Tier::kDisk, true, key.hash);
                        } else {
                          disk_index_.erase(key.hash);
                          d = DiskSlot();
                          disk_free_.push_back(ds);
                        }
                      }
                      std::move(after)(current && st.ok());
                      if (current && !st.ok()) DiskFailed(st);
                    });
  return true;
}

bool KvStore::StartWriteBack(int64_t host_slot) {
  if (!disk_enabled_) return false;
  HostSlot& h = host_slots_[host_slot];
  const BlockKey key = h.key;
  if (auto it = disk_index_.find(key.hash); it != disk_index_.end()) {
    if (disk_slots_[it->second].state == DiskSlot::State::kReady) h.clean = true;
    return true;  // on disk, or on its way there
  }
  PinHost(host_slot);
  h.writing = true;
  return WriteToDisk(key, h.owner, host_->image(host_slot), [this, host_slot](bool ok) {
    HostSlot& h = host_slots_[host_slot];
    h.writing = false;
    h.clean = ok;
    // It kept its place in the LRU; clean now, it is evicted for free when its turn comes.
    UnpinHost(host_slot);
  });
}

bool KvStore::SpillToDisk(int64_t host_slot, bool wait_for_disk) {
  const HostSlot& h = host_slots_[host_slot];
  if (disk_index_.contains(h.key.hash)) return true;  // on disk, or on its way there
  // Every copy in use: wait for one to come back rather than lose the block.
  while (wait_for_disk && disk_enabled_ && spill_buffers_.empty() &&
         spill_buffers_out_ >= 2 * static_cast<int64_t>(config_.disk_queue_depth) &&
         disk_->in_flight() > 0) {
    WaitForDisk();
  }
  if (!disk_enabled_) return false;
  if (disk_index_.contains(h.key.hash)) return true;
  AlignedBuffer buffer;
  if (!spill_buffers_.empty()) {
    buffer = std::move(spill_buffers_.back());
    spill_buffers_.pop_back();
  } else if (spill_buffers_out_ < 2 * static_cast<int64_t>(config_.disk_queue_depth)) {
    absl::StatusOr<AlignedBuffer> b = AlignedBuffer::Create(host_->slot_bytes());
    if (!b.ok()) return false;
    buffer = *std::move(b);
  } else {
    return false;
  }
  CopyBytes(buffer.data(), host_->image(host_slot).data(), buffer.size());
  const absl::Span<uint8_t> image = buffer.span();
  auto holder = std::make_unique<AlignedBuffer>(std::move(buffer));
  ++spill_buffers_out_;
  return WriteToDisk(h.key, h.owner, image, [this, b = std::move(holder)](bool) mutable {
    --spill_buffers_out_;
    spill_buffers_.push_back(std::move(*b));
  });
}

void KvStore::ScheduleWriteBacks() {
  if (!disk_enabled_ || host_ == nullptr) return;
  // Capped by the disk's size: writing back more than half of it would evict the copies that
  // made other host blocks clean.
  const int64_t reserve =
      std::min<int64_t>(std::max<int64_t>(2, static_cast<int64_t>(host_slots_.size()) / 8),
                        static_cast<int64_t>(disk_slots_.size()) / 2);
  const int64_t max_writes = 2 * static_cast<int64_t>(config_.disk_queue_depth);
  int64_t available = static_cast<int64_t>(host_free_.size());
  if (available >= reserve) return;  // (every step: nothing to set up then)
  // In the order successive evictions would take the blocks (fair: always from the owner then
  // holding the most), so that what AllocateHost takes next is clean.
  host_order_.ForEachInEvictionOrder(config_.fair_eviction, [&](int64_t s) {
    if (available >= reserve || writes_in_flight_ >= max_writes) return false;
    HostSlot& h = host_slots_[s];
    // No disk slot to be had: the rest would fare no better this step.
    if (!h.clean && !h.writing && !StartWriteBack(s)) return false;
    if (h.clean || h.writing) ++available;
    return true;
  });
}

void KvStore::DiskFailed(const absl::Status& status) {
  LOG(ERROR) << "kv store: " << status;
  if (++consecutive_disk_errors_ >= config_.disk_error_limit) DisableDisk();
}

void KvStore::DisableDisk() {
  if (!disk_enabled_) return;
  LOG(ERROR) << "kv store: " << consecutive_disk_errors_
             << " disk operations failed in a row; the disk tier is off, serving goes on";
  disk_enabled_ = false;
  ++disk_epoch_;
  for (const auto& [hash, slot] : disk_index_) Emit(Tier::kDisk, false, hash);
  disk_index_.clear();
  disk_order_.Clear();
  disk_free_.clear();
  for (DiskSlot& d : disk_slots_) d = DiskSlot();
  for (HostSlot& h : host_slots_) h.clean = false;
}

void KvStore::SetNotify(std::function<void()> notify) {
  std::lock_guard<std::mutex> lock(notify_mu_);
  notify_ = std::move(notify);
}

void KvStore::Poll() {
  if (disk_ != nullptr) disk_->Poll();
  ScheduleWriteBacks();
}

void KvStore::Flush() {
  if (disk_ != nullptr) disk_->Flush();
}

int64_t KvStore::Persist(absl::Time deadline, const std::atomic<bool>* cancel) {
  if (!disk_enabled_ || host_ == nullptr) return 0;
  persisting_ = true;
  absl::Cleanup done = [this] { persisting_ = false; };
  Flush();
  // The disk copies of blocks still in host are more recent than disk-only ones: move them to the
  // disk LRU's young end (host order kept), so that room for the writes below is taken from
  // disk-only blocks first.
  for (const int64_t hs : host_order_.all()) {
    auto it = disk_index_.find(host_slots_[hs].key.hash);
    if (it == disk_index_.end()) continue;
    if (disk_order_.Contains(it->second)) disk_order_.Touch(it->second);
  }
  std::vector<int64_t> todo;  // most recently used first
  int64_t clean = 0;
  for (auto it = host_order_.all().rbegin(); it != host_order_.all().rend(); ++it) {
    const HostSlot& h = host_slots_[*it];
    if (h.state != HostSlot::State::kReady) continue;
    if (h.clean || disk_index_.contains(h.key.hash)) {
      ++clean;
    } else {
      todo.push_back(*it);
    }
  }
  // More would evict the disk copies of blocks written earlier in this call (or of clean ones).
  const size_t limit = static_cast<size_t>(std::clamp<int64_t>(
      static_cast<int64_t>(disk_slots_.size()) - clean, 0, static_cast<int64_t>(todo.size())));
  const int64_t max_writes = 2 * static_cast<int64_t>(config_.disk_queue_depth);
  const int64_t before = stats_.write_backs;
  size_t next = 0;
  auto go_on = [&] {
    return disk_enabled_ && absl::Now() < deadline && (cancel == nullptr || !cancel->load());
  };
  while (next < limit && go_on()) {
    while (next < limit && writes_in_flight_ < max_writes && go_on()) {
      const int64_t slot = todo[next++];
      const HostSlot& h = host_slots_[slot];
      if (h.state != HostSlot::State::kReady || h.clean || h.writing) continue;
      if (!StartWriteBack(slot)) {
        next = limit;  // no disk slot to be had
        break;
      }
    }
    Flush();
  }
  Flush();
  return stats_.write_backs - before;
}

std::vector<TierEvent> KvStore::DrainEvents() {
  std::vector<TierEvent> out;
  out.swap(events_);
  return out;
}

std::vector<TierEvent> KvStore::Inventory() const {
  std::vector<TierEvent> out;
  for (const auto& [hash, slot] : host_index_) {
    if (host_slots_[slot].state == HostSlot::State::kReady)
      out.push_back({Tier::kHost, true, hash});
  }
  if (disk_enabled_) {
    for (const auto& [hash, slot] : disk_index_) {
      if (disk_slots_[slot].state == DiskSlot::State::kReady) {
        out.push_back({Tier::kDisk, true, hash});
      }
    }
  }
  return out;
}

int32_t KvStore::HostOwner(BlockHash hash) const {
  auto it = host_index_.find(hash);
  if (it == host_index_.end() || !host_order_.Contains(it->second)) return -1;
  return host_order_.owner(it->second);
}

KvStoreStats KvStore::stats() const {
  KvStoreStats st = stats_;
  st.disk_enabled = disk_enabled_;
  if (host_ != nullptr) {
    st.host.num_slots = host_->num_slots();
    st.host.num_used = host_->num_slots() - static_cast<int64_t>(host_free_.size());
    st.host.slot_bytes = host_->slot_bytes();
  }
  if (disk_enabled_) {
    st.disk.num_slots = disk_->num_slots();
    st.disk.num_used = disk_->num_slots() - static_cast<int64_t>(disk_free_.size());
    st.disk.slot_bytes = disk_->slot_bytes();
  }
  if (disk_ != nullptr) st.io_errors = disk_->stats().io_errors;
  return st;
}

}  // namespace strata
