// DeltaCache: the fine-tunes one worker serves, each a delta file on disk (worker/model/delta.h)
// or a LoRA adapter's directory (worker/model/lora.h), loaded into memory on demand and kept under
// a byte budget.
//
// Tiers. A registered fine-tune lives in its delta file (the disk tier) and, once a request needs
// it, in this cache's memory (host memory, which is the device on a CPU build). Thousands can be
// registered while the budget holds the hot few: when a load needs room, the least recently used
// deltas that no sequence holds are evicted; a load that cannot get room waits until a sequence
// lets go of one. Registration reads only the file's header, so a wrong base, a malformed header
// or a delta larger than the whole budget is refused at start, not at the first request.
//
// Protocol. The engine calls Prefetch when a request arrives (the load overlaps the request's wait
// in the queue, like the KV prefix prefetch), then Acquire when it would admit the request: the
// delta, now pinned, or null while it is still loading (the request waits, others go ahead). Each
// successful Acquire is paired with one Release. A failed load (file gone, checksum mismatch) is
// reported to every Acquire of that fine-tune until the next Prefetch tries again.
//
// Changes while serving. Fine-tunes may be registered, replaced (a new file under the same id) and
// unregistered at any time (a worker rescanning its --fine_tune_dir). A delta that sequences hold
// stays in memory for them until the last Release (it leaves the cache's budget only then); an
// id unregistered or replaced is what Has, Revision and Acquire see at once.
//
// Thread contract: every method may be called from any thread (the worker's step loop calls
// most; the rescan registers and unregisters); loads run on the cache's own loader thread, which
// calls the notify callback after each load ends (never under the cache's lock).
#ifndef STRATA_WORKER_ENGINE_DELTA_CACHE_H_
#define STRATA_WORKER_ENGINE_DELTA_CACHE_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "worker/model/delta.h"
#include "worker/model/weights.h"

namespace strata {

struct DeltaCacheStats {
  int64_t capacity_bytes = 0;
  int64_t resident_bytes = 0;
  int64_t num_registered = 0;
  int64_t num_resident = 0;
  int64_t num_pinned = 0;
  // Loads waiting for room (every resident delta pinned).
  int64_t num_waiting_for_room = 0;
  // The fine-tunes resident now, sorted.
  std::vector<std::string> resident_ids;
  // Registrations, replacements and unregistrations since start.
  int64_t num_registry_changes = 0;
  // Counters since start.
  int64_t num_loads = 0;
  int64_t num_load_failures = 0;
  int64_t num_hits = 0;  // Acquire found it resident
  int64_t num_evictions = 0;
  double load_seconds = 0;
};

class DeltaCache {
 public:
  // `base` must outlive the cache; `base_fingerprint` is BaseFingerprint of its files.
  DeltaCache(const ModelWeights* base, std::string base_fingerprint, int64_t capacity_bytes,
             absl::Duration retry_after = absl::Seconds(10));
  // Waits for a load in progress, then stops the loader thread.
  ~DeltaCache();
  DeltaCache(const DeltaCache&) = delete;
  DeltaCache& operator=(const DeltaCache&) = delete;

  // Registers fine-tune `id` (1 to 128 bytes of [A-Za-z0-9._-]) as the delta file or LoRA adapter
  // directory `path` (an adapter's configuration and tensor shapes are checked against the base
  // here). INVALID_ARGUMENT for a bad id, a malformed file, or a delta larger than the budget;
  // ALREADY_EXISTS for a second registration of an id; FAILED_PRECONDITION for a delta of another
  // base; NOT_FOUND when the file does not exist.
  absl::Status Register(const std::string& id, const std::string& path);
  // Registers `path` as `id` in place of what `id` was (or as a new id): checked as Register
  // first, and on an error the registration before stays (so does a delta of it in memory). The
  // same path with the same revision (data checksum) changes nothing but lets a failed load be
  // tried again at once.
  absl::Status Replace(const std::string& id, const std::string& path);
  // Unregisters `id` (NOT_FOUND if it is not registered). Sequences holding its delta keep it
  // until they release it; a load in progress is dropped when it ends.
  absl::Status Unregister(const std::string& id);
  bool Has(const std::string& id) const;
  // The registered delta's revision (its data checksum); empty for an unknown id.
  std::string Revision(const std::string& id) const;
  // Registered ids, sorted.
  std::vector<std::string> Ids() const;
  // Registered ids with their revisions, sorted by id (one snapshot).
  std::vector<std::pair<std::string, std::string>> Revisions() const;

  // Starts loading `id` unless it is resident or loading already (a failed one once retry_after
  // has passed since it failed).
  void Prefetch(const std::string& id);
  // The resident delta of `id`, pinned (Release it once), or null while it loads (Prefetch is
  // implied). The load's error when the last one failed; NOT_FOUND for an unregistered id;
  // ABORTED when `revision` is given and `id` is registered under another one now (replaced
  // since the caller looked: what it computed for the old one does not hold).
  absl::StatusOr<const DeltaWeights*> Acquire(const std::string& id,
                                              const std::string* revision = nullptr);
  // Unpins a delta Acquire returned (whether or not its id is still registered as it).
  void Release(const DeltaWeights* delta);

  // `notify` runs on the loader thread after each load ends; null stops it, and once SetNotify
  // returns no earlier callback is running or will run. Any thread.
  void SetNotify(std::function<void()> notify);
  // Any thread.
  DeltaCacheStats GetStats() const;

 private:
  enum class State { kOnDisk, kQueued, kLoading, kResident, kFailed };
  struct Entry {
    std::string id;
    std::string path;
    std::string revision;
    int64_t reserve_bytes = 0;  // the file's tensor bytes: the room a load asks for
    State state = State::kOnDisk;
    std::unique_ptr<DeltaWeights> delta;
    absl::Status error;
    absl::Time failed_at = absl::InfinitePast();
    int64_t pins = 0;
    int64_t last_use = 0;
    // Unregistered or replaced while pinned or loading: out of entries_, freed once neither.
    bool removed = false;
  };
  // The checks of Register, outside the lock: the entry `path` would be.
  absl::StatusOr<std::shared_ptr<Entry>> Check(const std::string& id,
                                               const std::string& path) const;
  // Takes `e` out of the cache (it is out of entries_ already): freed now, or marked removed.
  void RemoveLocked(const std::shared_ptr<Entry>& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops a resident delta's memory (`e` may be gone afterwards: a removed entry is).
  void FreeLocked(Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Starts queued loads, in order, while evicting unpinned deltas makes room for them.
  void StartLoads() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void LoaderLoop();

  const ModelWeights* base_;
  const std::string base_fingerprint_;
  const int64_t capacity_bytes_;
  const absl::Duration retry_after_;

  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Entry>> entries_ ABSL_GUARDED_BY(mu_);
  // Every resident delta (removed ones too, while pinned), by address: what Release finds.
  absl::flat_hash_map<const DeltaWeights*, std::shared_ptr<Entry>> resident_ ABSL_GUARDED_BY(mu_);
  // Waiting for room, in arrival order, and handed to the loader thread.
  std::deque<std::shared_ptr<Entry>> queued_ ABSL_GUARDED_BY(mu_);
  std::deque<std::shared_ptr<Entry>> to_load_ ABSL_GUARDED_BY(mu_);
  // Resident plus reserved for loads in progress.
  int64_t used_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t tick_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Held while the callback runs (never with mu_), so that SetNotify waits for a call in progress.
  absl::Mutex notify_mu_;
  std::function<void()> notify_ ABSL_GUARDED_BY(notify_mu_);
  DeltaCacheStats stats_ ABSL_GUARDED_BY(mu_);
  std::thread loader_;
};

}  // namespace strata

#endif  // STRATA_WORKER_ENGINE_DELTA_CACHE_H_
