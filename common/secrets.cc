#include "common/secrets.h"

#include <algorithm>
#include <cstdint>
#include <random>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/log.h"
#include "common/mapped_file.h"
#include "common/status_macros.h"

namespace strata {

bool SecretsEqual(absl::string_view known, absl::string_view given) {
  // Every byte of `known` is compared whatever `given` is: the time tells only its length, which
  // the caller chose.
  unsigned char diff = known.size() != given.size() ? 1 : 0;
  for (size_t i = 0; i < known.size(); ++i) {
    diff |= static_cast<unsigned char>(known[i] ^ (i < given.size() ? given[i] : 0));
  }
  return diff == 0;
}

bool ValidSecret(absl::string_view s) {
  if (s.size() < 16 || s.size() > 256) return false;
  for (char c : s) {
    if (c <= ' ' || c > '~') return false;
  }
  return true;
}

std::string NewSecret() {
  std::random_device dev;  // the kernel's random source
  std::string out;
  for (int i = 0; i < 4; ++i) {
    absl::StrAppend(&out, absl::Hex((uint64_t{dev()} << 32) | dev(), absl::kZeroPad16));
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> LoadSecretFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  std::vector<std::string> secrets;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    const absl::string_view secret = absl::StripAsciiWhitespace(line);
    if (secret.empty()) continue;
    if (!ValidSecret(secret)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": line ", line_number,
                       ": a secret must be 16 to 256 printable ASCII characters without "
                       "spaces (for example: openssl rand -hex 32)"));
    }
    secrets.emplace_back(secret);
  }
  if (secrets.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": no secret (for example: openssl rand -hex 32 > ", path, ")"));
  }
  if (secrets.size() > kMaxClusterSecrets) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", secrets.size(), " secrets, at most ", kMaxClusterSecrets,
                     " (one a line: the one sent, then those still accepted)"));
  }
  return secrets;
}

ClusterSecret::ClusterSecret(std::vector<std::string> secrets)
    : ClusterSecret(std::string(), std::move(secrets)) {}

ClusterSecret::ClusterSecret(std::string path, std::vector<std::string> secrets)
    : path_(std::move(path)), secrets_(std::move(secrets)) {
  CHECK(!secrets_.empty());
}

ClusterSecret::~ClusterSecret() { watcher_.reset(); }  // before the members it reads go

absl::StatusOr<std::unique_ptr<ClusterSecret>> ClusterSecret::Open(const std::string& path,
                                                                   absl::Duration reload) {
  ASSIGN_OR_RETURN(std::vector<std::string> secrets, LoadSecretFile(path));
  std::unique_ptr<ClusterSecret> out(new ClusterSecret(path, std::move(secrets)));
  if (reload > absl::ZeroDuration()) out->Watch(reload);
  return out;
}

std::string ClusterSecret::Sent() const {
  absl::MutexLock lock(&mu_);
  return secrets_.front();
}

int ClusterSecret::Match(absl::string_view given) const {
  absl::MutexLock lock(&mu_);
  int found = -1;
  for (size_t i = 0; i < secrets_.size(); ++i) {
    const bool equal = SecretsEqual(secrets_[i], given);  // every one, whatever matched before
    if (equal && found < 0) found = static_cast<int>(i);
  }
  return found;
}

absl::Status ClusterSecret::Reload() {
  absl::MutexLock reloading(&reload_mu_);
  ASSIGN_OR_RETURN(std::vector<std::string> secrets, LoadSecretFile(path_));
  absl::MutexLock lock(&mu_);
  secrets_ = std::move(secrets);
  return absl::OkStatus();
}

void ClusterSecret::Watch(absl::Duration period) {
  watcher_ = std::make_unique<PeriodicThread>(period, [this] {
    std::vector<std::string> before;
    {
      absl::MutexLock lock(&mu_);
      before = secrets_;
    }
    if (absl::Status s = Reload(); !s.ok()) {
      LOG(WARNING) << "cluster secret not reloaded, the secrets before stay: " << s;
      return;
    }
    absl::MutexLock lock(&mu_);
    if (secrets_ != before) {
      LOG(INFO) << "cluster secret reloaded from " << path_ << ": " << secrets_.size()
                << " secret(s) accepted, "
                << (secrets_.front() == before.front() ? "the same one" : "a new one") << " sent";
    }
  });
}

absl::StatusOr<std::unique_ptr<ClusterSecret>> OpenClusterSecretFlag(const std::string& path,
                                                                     double reload_s) {
  if (path.empty()) return std::unique_ptr<ClusterSecret>();
  if (!(reload_s >= 0)) {
    return absl::InvalidArgumentError("--cluster_secret_reload_s must be 0 (never) or more");
  }
  absl::StatusOr<std::unique_ptr<ClusterSecret>> secret =
      ClusterSecret::Open(path, absl::Seconds(reload_s));
  if (!secret.ok()) {
    return absl::Status(secret.status().code(),
                        absl::StrCat("--cluster_secret_file: ", secret.status().message()));
  }
  return secret;
}

}  // namespace strata
