#include "worker/engine/delta_cache.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/ids.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "worker/model/lora.h"

namespace strata {
DeltaCache::DeltaCache(const ModelWeights* base, std::string base_fingerprint,
                       int64_t capacity_bytes, absl::Duration retry_after)
    : base_(base),
      base_fingerprint_(std::move(base_fingerprint)),
      capacity_bytes_(capacity_bytes),
      retry_after_(retry_after) {
  stats_.capacity_bytes = capacity_bytes_;
  loader_ = std::thread([this] { LoaderLoop(); });
}

DeltaCache::~DeltaCache() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  loader_.join();
}

absl::StatusOr<std::shared_ptr<DeltaCache::Entry>> DeltaCache::Check(
    const std::string& id, const std::string& path) const {
  if (id.empty() || !IsValidId(id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("fine-tune id \"", id, "\" must be 1 to 128 bytes of [A-Za-z0-9._-]"));
  }
  int64_t reserve = 0;
  std::string revision;
  if (IsLoraAdapter(path)) {
    absl::StatusOr<LoraAdapterInfo> info =
        ReadLoraAdapterInfo(path, base_->config, LoraFactorType(*base_));
    if (!info.ok()) {
      return absl::Status(info.status().code(),
                          absl::StrCat("fine-tune ", id, ": ", info.status().message()));
    }
    reserve = info->resident_bytes;
    revision = info->revision;
  } else {
    ASSIGN_OR_RETURN(DeltaFileInfo info, ReadDeltaFileInfo(path));
    if (info.base_fingerprint != base_fingerprint_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "fine-tune ", id, ": ", path, " was made from a different base model (fingerprint ",
          info.base_fingerprint, ", base ", info.base_model,
          "); this worker's base has fingerprint ", base_fingerprint_));
    }
    // Loaded, each tensor starts on a 64-byte boundary.
    reserve = info.data_bytes + 64 * (info.num_tensors + 1);
    revision = info.data_xxh3;
  }
  if (reserve > capacity_bytes_) {
    return absl::InvalidArgumentError(absl::StrCat("fine-tune ", id, ": its delta needs ", reserve,
                                                   " bytes, more than the whole delta cache (",
                                                   capacity_bytes_, " bytes)"));
  }
  auto e = std::make_shared<Entry>();
  e->id = id;
  e->path = path;
  e->revision = std::move(revision);
  e->reserve_bytes = reserve;
  return e;
}

absl::Status DeltaCache::Register(const std::string& id, const std::string& path) {
  ASSIGN_OR_RETURN(std::shared_ptr<Entry> e, Check(id, path));
  absl::MutexLock lock(&mu_);
  if (entries_.contains(id)) {
    return absl::AlreadyExistsError(absl::StrCat("fine-tune ", id, " is registered twice"));
  }
  entries_.emplace(id, std::move(e));
  ++stats_.num_registered;
  ++stats_.num_registry_changes;
  return absl::OkStatus();
}

absl::Status DeltaCache::Replace(const std::string& id, const std::string& path) {
  ASSIGN_OR_RETURN(std::shared_ptr<Entry> e, Check(id, path));
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) {
    entries_.emplace(id, std::move(e));
    ++stats_.num_registered;
    ++stats_.num_registry_changes;
    return absl::OkStatus();
  }
  if (it->second->path == e->path && it->second->revision == e->revision) {
    // The same data (its checksum) at the same place (a file touched, or copied in again): the
    // registration stays, and so does its delta in memory; a failed load may be tried at once.
    it->second->failed_at = absl::InfinitePast();
    return absl::OkStatus();
  }
  std::shared_ptr<Entry> old = std::move(it->second);
  it->second = std::move(e);
  RemoveLocked(old);
  ++stats_.num_registry_changes;
  return absl::OkStatus();
}

absl::Status DeltaCache::Unregister(const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat("fine-tune ", id, " is not registered"));
  }
  std::shared_ptr<Entry> old = std::move(it->second);
  entries_.erase(it);
  --stats_.num_registered;
  ++stats_.num_registry_changes;
  RemoveLocked(old);
  return absl::OkStatus();
}

void DeltaCache::RemoveLocked(const std::shared_ptr<Entry>& e) {
  switch (e->state) {
    case State::kResident:
      if (e->pins == 0) {
        FreeLocked(*e);
        StartLoads();  // its room may let a queued load start
      } else {
        e->removed = true;  // freed by the last Release
      }
      break;
    case State::kQueued:
      queued_.erase(std::find(queued_.begin(), queued_.end(), e));
      e->state = State::kOnDisk;
      break;
    case State::kLoading:
      e->removed = true;  // dropped when its load ends
      break;
    case State::kOnDisk:
    case State::kFailed:
      break;
  }
}

void DeltaCache::FreeLocked(Entry& e) {
  const DeltaWeights* key = e.delta.get();
  stats_.resident_bytes -= e.delta->resident_bytes;
  --stats_.num_resident;
  e.delta.reset();
  e.state = State::kOnDisk;
  used_bytes_ -= e.reserve_bytes;
  resident_.erase(key);  // last: it may hold the only reference to `e`
}

bool DeltaCache::Has(const std::string& id) const {
  absl::MutexLock lock(&mu_);
  return entries_.contains(id);
}

std::string DeltaCache::Revision(const std::string& id) const {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  return it == entries_.end() ? "" : it->second->revision;
}

std::vector<std::string> DeltaCache::Ids() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> ids;
  for (const auto& [id, e] : entries_) ids.push_back(id);
  return ids;
}

std::vector<std::pair<std::string, std::string>> DeltaCache::Revisions() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [id, e] : entries_) out.emplace_back(id, e->revision);
  return out;
}

void DeltaCache::Prefetch(const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  Entry& e = *it->second;
  if (e.state != State::kOnDisk && e.state != State::kFailed) return;
  if (e.state == State::kFailed && absl::Now() < e.failed_at + retry_after_) return;
  e.state = State::kQueued;
  e.error = absl::OkStatus();
  queued_.push_back(it->second);
  StartLoads();
}

absl::StatusOr<const DeltaWeights*> DeltaCache::Acquire(const std::string& id,
                                                        const std::string* revision) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat("fine-tune ", id, " is not registered"));
  }
  Entry& e = *it->second;
  if (revision != nullptr && *revision != e.revision) {
    return absl::AbortedError(absl::StrCat("fine-tune ", id,
                                           " was replaced by a new revision while the request "
                                           "waited; try it again"));
  }
  switch (e.state) {
    case State::kResident:
      ++e.pins;
      e.last_use = ++tick_;
      ++stats_.num_hits;
      return e.delta.get();
    case State::kFailed:
      return e.error;
    case State::kOnDisk:
      e.state = State::kQueued;
      queued_.push_back(it->second);
      StartLoads();
      return nullptr;
    case State::kQueued:
    case State::kLoading:
      return nullptr;
  }
  return nullptr;
}

void DeltaCache::Release(const DeltaWeights* delta) {
  absl::MutexLock lock(&mu_);
  auto it = resident_.find(delta);
  if (it == resident_.end() || it->second->pins == 0) {
    LOG(ERROR) << "DeltaCache::Release of a delta that is not pinned";
    return;
  }
  Entry& e = *it->second;
  --e.pins;
  e.last_use = ++tick_;
  if (e.pins > 0) return;
  if (e.removed) {
    FreeLocked(e);  // unregistered or replaced meanwhile: nobody holds it now
    StartLoads();
  } else if (!queued_.empty()) {
    StartLoads();
  }
}

void DeltaCache::StartLoads() {
  while (!queued_.empty()) {
    Entry& e = *queued_.front();
    while (used_bytes_ + e.reserve_bytes > capacity_bytes_) {
      Entry* victim = nullptr;
      for (auto& [id, other] : entries_) {
        if (other->state == State::kResident && other->pins == 0 &&
            (victim == nullptr || other->last_use < victim->last_use)) {
          victim = other.get();
        }
      }
      if (victim == nullptr) return;  // wait for a Release
      ++stats_.num_evictions;
      FreeLocked(*victim);
    }
    used_bytes_ += e.reserve_bytes;
    e.state = State::kLoading;
    to_load_.push_back(std::move(queued_.front()));
    queued_.pop_front();
  }
}

void DeltaCache::LoaderLoop() {
  while (true) {
    std::shared_ptr<Entry> entry;
    std::string path;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](DeltaCache* c)
               ABSL_EXCLUSIVE_LOCKS_REQUIRED(c->mu_) { return c->stop_ || !c->to_load_.empty(); },
          this));
      if (stop_) return;
      entry = std::move(to_load_.front());
      to_load_.pop_front();
      path = entry->path;
      if (entry->removed) {  // unregistered before its load began: nobody can use it
        entry->state = State::kOnDisk;
        used_bytes_ -= entry->reserve_bytes;
        StartLoads();
        continue;
      }
    }
    const absl::Time start = absl::Now();
    absl::StatusOr<std::unique_ptr<DeltaWeights>> loaded =
        LoadFineTune(path, *base_, base_fingerprint_);
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    {
      absl::MutexLock lock(&mu_);
      Entry& e = *entry;
      stats_.load_seconds += seconds;
      if (e.removed) {
        // Unregistered or replaced while it loaded: nobody can use it (a load all the same).
        ++(loaded.ok() ? stats_.num_loads : stats_.num_load_failures);
        e.state = State::kOnDisk;
        used_bytes_ -= e.reserve_bytes;
        StartLoads();
      } else {
        if (loaded.ok() && (*loaded)->revision != e.revision) {
          // The file changed since it was registered (renamed over, say): not the revision the
          // requests were namespaced with. The rescan that finds it registers it anew.
          loaded = absl::AbortedError(absl::StrCat("fine-tune ", e.id, ": ", e.path,
                                                   " changed since it was registered (revision ",
                                                   (*loaded)->revision, ", not ", e.revision, ")"));
        }
        if (loaded.ok() && (*loaded)->resident_bytes > e.reserve_bytes &&
            used_bytes_ - e.reserve_bytes + (*loaded)->resident_bytes > capacity_bytes_) {
          // The file grew since it was registered (replaced in place) beyond the room left.
          loaded = absl::ResourceExhaustedError(
              absl::StrCat("fine-tune ", e.id, ": its delta grew to ", (*loaded)->resident_bytes,
                           " bytes since registration, more than the delta cache has room for"));
        }
        if (loaded.ok()) {
          // Account what the delta really holds from now on.
          used_bytes_ += (*loaded)->resident_bytes - e.reserve_bytes;
          e.reserve_bytes = (*loaded)->resident_bytes;
          e.delta = *std::move(loaded);
          e.state = State::kResident;
          e.last_use = ++tick_;
          resident_.emplace(e.delta.get(), entry);
          ++stats_.num_loads;
          ++stats_.num_resident;
          stats_.resident_bytes += e.delta->resident_bytes;
          // What it reserved past its size is room again, and it may be evicted now: a load
          // waiting for room may start.
          StartLoads();
        } else {
          LOG(ERROR) << "loading fine-tune " << e.id << ": " << loaded.status();
          e.error = loaded.status();
          e.state = State::kFailed;
          e.failed_at = absl::Now();
          ++stats_.num_load_failures;
          used_bytes_ -= e.reserve_bytes;
          StartLoads();
        }
      }
    }
    absl::MutexLock lock(&notify_mu_);
    if (notify_) notify_();
  }
}

void DeltaCache::SetNotify(std::function<void()> notify) {
  absl::MutexLock lock(&notify_mu_);
  notify_ = std::move(notify);
}

DeltaCacheStats DeltaCache::GetStats() const {
  absl::MutexLock lock(&mu_);
  DeltaCacheStats s = stats_;
  s.num_pinned = 0;
  for (const auto& [delta, e] : resident_) s.num_pinned += e->pins > 0 ? 1 : 0;
  for (const auto& [id, e] : entries_) {
    if (e->state == State::kResident) s.resident_ids.push_back(id);
  }
  s.num_waiting_for_room = static_cast<int64_t>(queued_.size());
  return s;
}

}  // namespace strata
