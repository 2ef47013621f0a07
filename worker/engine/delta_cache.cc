#include "worker/engine/delta_cache.h"

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

absl::Status DeltaCache::Register(const std::string& id, const std::string& path) {
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
  absl::MutexLock lock(&mu_);
  if (entries_.contains(id)) {
    return absl::AlreadyExistsError(absl::StrCat("fine-tune ", id, " is registered twice"));
  }
  Entry& e = entries_[id];
  e.path = path;
  e.revision = revision;
  e.reserve_bytes = reserve;
  ++stats_.num_registered;
  return absl::OkStatus();
}

bool DeltaCache::Has(const std::string& id) const {
  absl::MutexLock lock(&mu_);
  return entries_.contains(id);
}

std::string DeltaCache::Revision(const std::string& id) const {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  return it == entries_.end() ? "" : it->second.revision;
}

std::vector<std::string> DeltaCache::Ids() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> ids;
  for (const auto& [id, e] : entries_) ids.push_back(id);
  return ids;
}

void DeltaCache::Prefetch(const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  Entry& e = it->second;
  if (e.state != State::kOnDisk && e.state != State::kFailed) return;
  if (e.state == State::kFailed && absl::Now() < e.failed_at + retry_after_) return;
  e.state = State::kQueued;
  e.error = absl::OkStatus();
  queued_.push_back(id);
  StartLoads();
}

absl::StatusOr<const DeltaWeights*> DeltaCache::Acquire(const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat("fine-tune ", id, " is not registered"));
  }
  Entry& e = it->second;
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
      queued_.push_back(id);
      StartLoads();
      return nullptr;
    case State::kQueued:
    case State::kLoading:
      return nullptr;
  }
  return nullptr;
}

void DeltaCache::Release(const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  if (it == entries_.end() || it->second.pins == 0) {
    LOG(ERROR) << "DeltaCache::Release of fine-tune " << id << " that is not pinned";
    return;
  }
  Entry& e = it->second;
  --e.pins;
  e.last_use = ++tick_;
  if (e.pins == 0 && !queued_.empty()) StartLoads();
}

void DeltaCache::StartLoads() {
  while (!queued_.empty()) {
    Entry& e = entries_.at(queued_.front());
    while (used_bytes_ + e.reserve_bytes > capacity_bytes_) {
      Entry* victim = nullptr;
      for (auto& [id, other] : entries_) {
        if (other.state == State::kResident && other.pins == 0 &&
            (victim == nullptr || other.last_use < victim->last_use)) {
          victim = &other;
        }
      }
      if (victim == nullptr) return;  // wait for a Release
      stats_.resident_bytes -= victim->delta->resident_bytes;
      --stats_.num_resident;
      ++stats_.num_evictions;
      victim->delta.reset();
      victim->state = State::kOnDisk;
      used_bytes_ -= victim->reserve_bytes;
    }
    used_bytes_ += e.reserve_bytes;
    e.state = State::kLoading;
    to_load_.push_back(queued_.front());
    queued_.pop_front();
  }
}

void DeltaCache::LoaderLoop() {
  while (true) {
    std::string id, path;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](DeltaCache* c)
               ABSL_EXCLUSIVE_LOCKS_REQUIRED(c->mu_) { return c->stop_ || !c->to_load_.empty(); },
          this));
      if (stop_) return;
      id = to_load_.front();
      to_load_.pop_front();
      path = entries_.at(id).path;
    }
    const absl::Time start = absl::Now();
    absl::StatusOr<std::unique_ptr<DeltaWeights>> loaded =
        LoadFineTune(path, *base_, base_fingerprint_);
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    {
      absl::MutexLock lock(&mu_);
      Entry& e = entries_.at(id);
      stats_.load_seconds += seconds;
      if (loaded.ok() && (*loaded)->resident_bytes > e.reserve_bytes &&
          used_bytes_ - e.reserve_bytes + (*loaded)->resident_bytes > capacity_bytes_) {
        // The file grew since it was registered (replaced in place) beyond the room left.
        loaded = absl::ResourceExhaustedError(
            absl::StrCat("fine-tune ", id, ": its delta grew to ", (*loaded)->resident_bytes,
                         " bytes since registration, more than the delta cache has room for"));
      }
      if (loaded.ok()) {
        // Account what the delta really holds from now on.
        used_bytes_ += (*loaded)->resident_bytes - e.reserve_bytes;
        e.reserve_bytes = (*loaded)->resident_bytes;
        e.delta = *std::move(loaded);
        e.state = State::kResident;
        e.last_use = ++tick_;
        ++stats_.num_loads;
        ++stats_.num_resident;
        stats_.resident_bytes += e.delta->resident_bytes;
      } else {
        LOG(ERROR) << "loading fine-tune " << id << ": " << loaded.status();
        e.error = loaded.status();
        e.state = State::kFailed;
        e.failed_at = absl::Now();
        ++stats_.num_load_failures;
        used_bytes_ -= e.reserve_bytes;
        StartLoads();
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
  for (const auto& [id, e] : entries_) {
    s.num_pinned += e.pins > 0 ? 1 : 0;
    if (e.state == State::kResident) s.resident_ids.push_back(id);
  }
  s.num_waiting_for_room = static_cast<int64_t>(queued_.size());
  return s;
}

}  // namespace strata
