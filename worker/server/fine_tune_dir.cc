#include "worker/server/fine_tune_dir.h"

#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"
#include "worker/model/lora.h"

namespace strata {
namespace {

constexpr absl::string_view kDeltaSuffix = ".delta.safetensors";

// A file's size, modification time and inode ("" when it cannot be read).
std::string FileStamp(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return "";
  return absl::StrCat(st.st_size, ":", st.st_mtim.tv_sec, ".", st.st_mtim.tv_nsec, ":", st.st_ino);
}

// A directory's regular files' stamps, by name.
std::string DirStamp(const std::string& dir) {
  std::vector<std::string> parts;
  std::error_code ec;
  for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    parts.push_back(absl::StrCat(name, "=", FileStamp(it->path().string())));
  }
  std::sort(parts.begin(), parts.end());
  return absl::StrJoin(parts, ";");
}

}  // namespace

absl::StatusOr<std::vector<FineTuneFile>> ScanFineTuneDir(const std::string& dir) {
  std::vector<FineTuneFile> found;
  std::error_code ec;
  // increment(ec), not the range-for's throwing ++: a directory error is a message, not a crash.
  for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const std::string path = it->path().string();
    if (absl::StartsWith(name, ".")) continue;
    if (name.size() > kDeltaSuffix.size() && absl::EndsWith(name, kDeltaSuffix)) {
      found.push_back({name.substr(0, name.size() - kDeltaSuffix.size()), path, FileStamp(path)});
    } else if (IsLoraAdapter(path)) {
      found.push_back({name, path, DirStamp(path)});
    }
  }
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat("--fine_tune_dir ", dir, ": ", ec.message()));
  }
  std::sort(found.begin(), found.end(),
            [](const FineTuneFile& a, const FineTuneFile& b) { return a.id < b.id; });
  return found;
}

FineTuneDirWatcher::FineTuneDirWatcher(std::string dir, std::vector<FineTuneFile> registered,
                                       Registrar registrar, MetricsRegistry* metrics)
    : dir_(std::move(dir)), registrar_(std::move(registrar)), metrics_(metrics) {
  for (FineTuneFile& f : registered) {
    std::string id = f.id;
    registered_.emplace(std::move(id), std::move(f));
  }
  for (const char* change : {"added", "replaced", "removed", "refused"}) Count(change, 0);
}

FineTuneDirWatcher::~FineTuneDirWatcher() { watcher_.reset(); }

void FineTuneDirWatcher::Count(const char* change, int n) {
  if (metrics_ == nullptr) return;
  metrics_
      ->GetCounter("strata_worker_fine_tune_changes_total",
                   "Changes to the fine-tunes served, found by rescanning --fine_tune_dir: added, "
                   "replaced (a new file under the same name), removed, and refused (a new or "
                   "changed file that could not be registered; logged).",
                   {{"change", change}})
      ->Add(n);
}

FineTuneDirWatcher::Changes FineTuneDirWatcher::Rescan(bool at_once) {
  absl::MutexLock lock(&mu_);
  Changes changes;
  absl::StatusOr<std::vector<FineTuneFile>> scan = ScanFineTuneDir(dir_);
  if (!scan.ok()) {
    LOG(WARNING) << "fine-tunes not rescanned: " << scan.status();
    return changes;
  }
  std::map<std::string, const FineTuneFile*> seen;
  for (const FineTuneFile& f : *scan) {
    seen.emplace(f.id, &f);
    missing_.erase(f.id);
    auto reg = registered_.find(f.id);
    if (reg != registered_.end() && reg->second.stamp == f.stamp && reg->second.path == f.path) {
      settling_.erase(f.id);
      refused_.erase(f.id);
      continue;
    }
    if (auto r = refused_.find(f.id); r != refused_.end() && r->second == f.stamp) continue;
    // Registered at the second look that finds it unchanged (not while it is being written).
    if (auto s = settling_.find(f.id); !at_once && (s == settling_.end() || s->second != f.stamp)) {
      settling_[f.id] = f.stamp;
      continue;
    }
    settling_.erase(f.id);
    const bool replace = reg != registered_.end();
    if (absl::Status s = registrar_.add(f.id, f.path, replace); !s.ok()) {
      LOG(WARNING) << "fine-tune " << f.id << " (" << f.path << ") not "
                   << (replace ? "replaced (the one before stays)" : "added") << ": " << s;
      refused_[f.id] = f.stamp;
      ++changes.refused;
      continue;
    }
    LOG(INFO) << "fine-tune " << f.id << " " << (replace ? "replaced" : "added") << " from "
              << f.path;
    refused_.erase(f.id);
    registered_[f.id] = f;
    ++(replace ? changes.replaced : changes.added);
  }
  for (auto it = registered_.begin(); it != registered_.end();) {
    if (seen.contains(it->first) || missing_.insert(it->first).second) {
      ++it;  // there, or gone at this look only
      continue;
    }
    missing_.erase(it->first);
    if (absl::Status s = registrar_.remove(it->first); !s.ok()) {
      LOG(WARNING) << "fine-tune " << it->first << " is gone from " << dir_
                   << " but not removed: " << s;
    } else {
      LOG(INFO) << "fine-tune " << it->first << " removed (gone from " << dir_ << ")";
      ++changes.removed;
    }
    it = registered_.erase(it);
  }
  for (auto* m : {&settling_, &refused_}) {
    for (auto it = m->begin(); it != m->end();) {
      it = seen.contains(it->first) ? std::next(it) : m->erase(it);
    }
  }
  Count("added", changes.added);
  Count("replaced", changes.replaced);
  Count("removed", changes.removed);
  Count("refused", changes.refused);
  return changes;
}

void FineTuneDirWatcher::Watch(absl::Duration period) {
  watcher_ = std::make_unique<PeriodicThread>(period, [this] { Rescan(); });
}

}  // namespace strata
