#include "coordinator/access_log.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/json.h"
#include "common/log.h"

namespace strata {
namespace {

constexpr absl::Duration kCheckPathEvery = absl::Seconds(1);

int OpenForAppend(const std::string& path) {
  return ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
}

}  // namespace

absl::StatusOr<std::unique_ptr<AccessLog>> AccessLog::Open(const std::string& path,
                                                           AccessLogOptions options) {
  int fd = STDOUT_FILENO;
  if (path != "-") {
    fd = OpenForAppend(path);
    if (fd < 0) {
      return absl::ErrnoToStatus(errno, absl::StrCat("access log ", path));
    }
  }
  return std::unique_ptr<AccessLog>(new AccessLog(path, fd, options));
}

AccessLog::AccessLog(std::string path, int fd, AccessLogOptions options)
    : path_(std::move(path)), options_(options), fd_(fd), checked_(absl::Now()) {
  if (options_.writer_thread) writer_ = std::thread([this] { Run(); });
}

AccessLog::~AccessLog() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (writer_.joinable()) writer_.join();
  Flush();
  absl::MutexLock io(&io_mu_);
  if (fd_ != STDOUT_FILENO && fd_ >= 0) ::close(fd_);
}

void AccessLog::Append(std::string record) {
  record.push_back('\n');
  absl::MutexLock lock(&mu_);
  if (pending_bytes_ + record.size() > options_.max_pending_bytes) {
    dropped_.fetch_add(1);
    if (options_.dropped_counter != nullptr) options_.dropped_counter->Add();
    return;
  }
  pending_bytes_ += record.size();
  pending_.push_back(std::move(record));
}

void AccessLog::Flush() {
  absl::MutexLock io(&io_mu_);
  ReopenIfMoved();
  std::vector<std::string> records;
  {
    absl::MutexLock lock(&mu_);
    records.swap(pending_);
    pending_bytes_ = 0;
  }
  WriteOut(std::move(records));
}

void AccessLog::Run() {
  while (true) {
    std::vector<std::string> records;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]()
                       ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !pending_.empty(); };
      mu_.AwaitWithTimeout(absl::Condition(&ready), kCheckPathEvery);
      if (stop_) return;  // the destructor flushes
    }
    absl::MutexLock io(&io_mu_);
    if (absl::Now() - checked_ >= kCheckPathEvery) ReopenIfMoved();
    {
      absl::MutexLock lock(&mu_);
      records.swap(pending_);
      pending_bytes_ = 0;
    }
    WriteOut(std::move(records));
  }
}

void AccessLog::ReopenIfMoved() {
  checked_ = absl::Now();
  if (path_ == "-") return;
  struct stat open_file {
  }, named{};
  const bool same = fd_ >= 0 && ::fstat(fd_, &open_file) == 0 &&
                    ::stat(path_.c_str(), &named) == 0 && open_file.st_dev == named.st_dev &&
                    open_file.st_ino == named.st_ino;
  if (same) return;
  const int fd = OpenForAppend(path_);
  if (fd < 0) {
    // Keep writing to the file open before (if any); try again at the next check.
    LOG(WARNING) << "access log " << path_ << ": cannot open again: " << std::strerror(errno);
    return;
  }
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
  mid_line_ = false;  // a new file starts on a line of its own
}

void AccessLog::WriteOut(std::vector<std::string> records) {
  // After a record cut short, a new line first (so that only that one line is broken).
  if (mid_line_ && !records.empty() && fd_ >= 0 && ::write(fd_, "\n", 1) == 1) mid_line_ = false;
  size_t i = 0;
  size_t started = 0;  // bytes of records[i] already written
  while (i < records.size()) {
    // Up to 64 records a write; a short write goes on from where it stopped.
    iovec iov[64];
    int n = 0;
    for (size_t j = i; j < records.size() && n < 64; ++j, ++n) {
      iov[n].iov_base = records[j].data();
      iov[n].iov_len = records[j].size();
    }
    const ssize_t w = fd_ < 0 ? -1 : ::writev(fd_, iov, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (write_errors_.fetch_add(1) == 0 || !failing_) {
        LOG(WARNING) << "access log " << path_
                     << ": write failed, records dropped: " << std::strerror(errno);
      }
      failing_ = true;
      const int64_t lost = static_cast<int64_t>(records.size() - i);
      dropped_.fetch_add(lost);
      if (options_.dropped_counter != nullptr) options_.dropped_counter->Add(lost);
      mid_line_ = started > 0;
      return;
    }
    failing_ = false;
    size_t left = static_cast<size_t>(w);
    while (i < records.size() && left >= records[i].size()) {
      left -= records[i].size();
      ++i;
      started = 0;
      written_.fetch_add(1);
      if (options_.written_counter != nullptr) options_.written_counter->Add();
    }
    if (left > 0) {  // the rest of a record cut short
      records[i].erase(0, left);
      started += left;
    }
  }
}

AccessRecord::AccessRecord(absl::Time time, absl::string_view event) {
  text_ = absl::StrCat("{\"time\":\"",
                       absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", time, absl::UTCTimeZone()),
                       "\",\"event\":", JsonQuote(event));
}

AccessRecord& AccessRecord::Str(absl::string_view key, absl::string_view value, size_t max_bytes) {
  absl::StrAppend(&text_, ",", JsonQuote(key), ":", JsonQuote(value.substr(0, max_bytes)));
  return *this;
}

AccessRecord& AccessRecord::StrIfSet(absl::string_view key, absl::string_view value) {
  return value.empty() ? *this : Str(key, value);
}

AccessRecord& AccessRecord::Int(absl::string_view key, int64_t value) {
  absl::StrAppend(&text_, ",", JsonQuote(key), ":", value);
  return *this;
}

AccessRecord& AccessRecord::Ms(absl::string_view key, absl::Duration d) {
  absl::StrAppend(&text_, ",", JsonQuote(key), ":",
                  absl::StrFormat("%.3f", absl::ToDoubleMilliseconds(d)));
  return *this;
}

AccessRecord& AccessRecord::StrList(absl::string_view key, const std::vector<std::string>& values) {
  absl::StrAppend(&text_, ",", JsonQuote(key), ":[");
  for (size_t i = 0; i < values.size(); ++i) {
    absl::StrAppend(&text_, i > 0 ? "," : "", JsonQuote(values[i]));
  }
  text_.push_back(']');
  return *this;
}

AccessRecord& AccessRecord::Raw(absl::string_view key, absl::string_view json) {
  absl::StrAppend(&text_, ",", JsonQuote(key), ":", json);
  return *this;
}

std::string AccessRecord::Done() {
  text_.push_back('}');
  return std::move(text_);
}

std::string TraceIdOf(absl::string_view traceparent) {
  traceparent = absl::StripAsciiWhitespace(traceparent);
  // version "00": exactly 55 characters; a later version may append fields after a '-'.
  if (traceparent.size() < 55 || (traceparent.size() > 55 && traceparent[55] != '-')) return "";
  auto hex = [&](size_t from, size_t n) {
    for (size_t i = from; i < from + n; ++i) {
      const char c = traceparent[i];
      if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
    }
    return true;
  };
  if (!hex(0, 2) || traceparent.substr(0, 2) == "ff" || traceparent[2] != '-' || !hex(3, 32) ||
      traceparent[35] != '-' || !hex(36, 16) || traceparent[52] != '-' || !hex(53, 2)) {
    return "";
  }
  if (traceparent.substr(0, 2) == "00" && traceparent.size() != 55) return "";
  const absl::string_view id = traceparent.substr(3, 32);
  if (id == std::string(32, '0') || traceparent.substr(36, 16) == std::string(16, '0')) return "";
  return std::string(id);
}

}  // namespace strata
