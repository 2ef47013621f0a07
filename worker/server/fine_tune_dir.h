// A worker's --fine_tune_dir: the fine-tunes in it (each *.delta.safetensors file under its name
// without the suffix, each subdirectory holding a PEFT LoRA adapter under its own name), read at
// start and, with FineTuneDirWatcher, again while the worker serves, so that fine-tunes are added,
// replaced and removed by putting files in the directory (a Kubernetes volume, say) without a
// restart.
//
// A change is taken once the file has stopped changing: a new or changed entry is registered at
// the first rescan that finds it as the one before did (size, modification time and inode of its
// files), so that a file being copied in is not read half-written; one is removed at the second
// rescan that finds it gone. Moving a finished file in
// (rename) is still the way to add one. Names starting with "." are ignored (a Kubernetes
// volume's own "..data" entries).
#ifndef STRATA_WORKER_SERVER_FINE_TUNE_DIR_H_
#define STRATA_WORKER_SERVER_FINE_TUNE_DIR_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "common/periodic.h"

namespace strata {

struct FineTuneFile {
  std::string id;
  std::string path;
  // What the entry's files look like now (sizes, modification times, inodes): a change to it is a
  // change to the fine-tune.
  std::string stamp;
};

// The fine-tunes in `dir`, sorted by id. INVALID_ARGUMENT naming the directory when it cannot be
// read.
absl::StatusOr<std::vector<FineTuneFile>> ScanFineTuneDir(const std::string& dir);

class FineTuneDirWatcher {
 public:
  // How a change is made: register `path` as `id` (in place of what it was when `replace`), and
  // unregister `id`. The engine's RegisterFineTune and UnregisterFineTune.
  struct Registrar {
    std::function<absl::Status(const std::string& id, const std::string& path, bool replace)> add;
    std::function<absl::Status(const std::string& id)> remove;
  };
  struct Changes {
    int added = 0;
    int replaced = 0;
    int removed = 0;
    int refused = 0;  // a new or changed entry that could not be registered (logged)
  };

  // `registered`: what the directory held when the worker registered its fine-tunes at start.
  // `metrics` (may be null) gets strata_worker_fine_tune_changes_total{change}.
  FineTuneDirWatcher(std::string dir, std::vector<FineTuneFile> registered, Registrar registrar,
                     MetricsRegistry* metrics);
  ~FineTuneDirWatcher();

  // Reads the directory once and applies what changed (an unreadable directory changes nothing).
  // `at_once`: new entries are registered at this look, unsettled (the first scan at start).
  // Thread-safe (one rescan at a time).
  Changes Rescan(bool at_once = false);
  // Rescans every `period` on a thread of its own until destroyed.
  void Watch(absl::Duration period);

 private:
  void Count(const char* change, int n);

  const std::string dir_;
  const Registrar registrar_;
  MetricsRegistry* const metrics_;
  absl::Mutex mu_;
  // Registered from the directory: the stamp each was registered with.
  std::map<std::string, FineTuneFile> registered_ ABSL_GUARDED_BY(mu_);
  // New or changed entries seen once, not yet registered: the stamp they were seen with.
  std::map<std::string, std::string> settling_ ABSL_GUARDED_BY(mu_);
  // Entries refused, by the stamp they were refused at (tried again once it changes).
  std::map<std::string, std::string> refused_ ABSL_GUARDED_BY(mu_);
  // Registered entries one rescan found gone: removed if the next finds them gone too (a
  // listing that briefly misses files, a remount say, removes nothing).
  std::set<std::string> missing_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<PeriodicThread> watcher_;
};

}  // namespace strata

#endif  // STRATA_WORKER_SERVER_FINE_TUNE_DIR_H_
