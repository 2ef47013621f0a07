#include "common/log.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"

namespace strata {
namespace {

std::atomic<int> g_min_severity{static_cast<int>(LogSeverity::kInfo)};
std::atomic<int> g_vlog_level{0};

absl::Mutex g_sinks_mu;
std::vector<LogSink*>& Sinks() ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_sinks_mu) {
  static auto* sinks = new std::vector<LogSink*>();
  return *sinks;
}
std::atomic<bool> g_have_sinks{false};

constexpr char kSeverityLetters[] = {'I', 'W', 'E', 'F'};

absl::string_view Basename(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash == nullptr ? path : slash + 1;
}

pid_t ThreadId() {
  thread_local pid_t tid = static_cast<pid_t>(syscall(SYS_gettid));
  return tid;
}

}  // namespace

void SetMinLogSeverity(LogSeverity severity) {
  g_min_severity.store(static_cast<int>(severity), std::memory_order_relaxed);
}

LogSeverity MinLogSeverity() {
  return static_cast<LogSeverity>(g_min_severity.load(std::memory_order_relaxed));
}

void SetVLogLevel(int level) { g_vlog_level.store(level, std::memory_order_relaxed); }

bool VLogIsOn(int level) { return level <= g_vlog_level.load(std::memory_order_relaxed); }

absl::Status ParseLogSeverity(absl::string_view text, LogSeverity* out) {
  const std::string lower = absl::AsciiStrToLower(text);
  if (lower == "info") {
    *out = LogSeverity::kInfo;
  } else if (lower == "warning") {
    *out = LogSeverity::kWarning;
  } else if (lower == "error") {
    *out = LogSeverity::kError;
  } else if (lower == "fatal") {
    *out = LogSeverity::kFatal;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("log severity must be info, warning, error or fatal, not \"", text, "\""));
  }
  return absl::OkStatus();
}

void AddLogSink(LogSink* sink) {
  absl::MutexLock lock(&g_sinks_mu);
  Sinks().push_back(sink);
  g_have_sinks.store(true);
}

void RemoveLogSink(LogSink* sink) {
  absl::MutexLock lock(&g_sinks_mu);
  auto& sinks = Sinks();
  sinks.erase(std::remove(sinks.begin(), sinks.end(), sink), sinks.end());
  g_have_sinks.store(!sinks.empty());
}

namespace log_internal {

LogMessage::LogMessage(const char* file, int line, LogSeverity severity)
    : file_(file), line_(line), severity_(severity) {}

LogMessage::~LogMessage() { Emit(); }

void LogMessage::Emit() {
  if (emitted_) return;
  emitted_ = true;
  if (severity_ != LogSeverity::kFatal && severity_ < MinLogSeverity()) return;
  const absl::Time now = absl::Now();
  const std::string message = stream_.str();
  const absl::string_view file = Basename(file_);
  std::string line =
      absl::StrCat(absl::string_view(&kSeverityLetters[static_cast<int>(severity_)], 1),
                   absl::FormatTime("%m%d %H:%M:%E6S", now, absl::LocalTimeZone()), " ", ThreadId(),
                   " ", file, ":", line_, "] ", message, "\n");
  // One write so that concurrent messages do not interleave.
  const char* data = line.data();
  size_t left = line.size();
  while (left > 0) {
    const ssize_t n = ::write(STDERR_FILENO, data, left);
    if (n <= 0) break;
    data += n;
    left -= static_cast<size_t>(n);
  }
  if (g_have_sinks.load(std::memory_order_acquire)) {
    const LogEntry entry{severity_, file, line_, now, message};
    absl::MutexLock lock(&g_sinks_mu);
    for (LogSink* sink : Sinks()) sink->Send(entry);
  }
}

LogMessageFatal::~LogMessageFatal() {
  Emit();
  std::abort();
}

std::string* StatusCheckMessage(const absl::Status& status, const char* expr) {
  if (status.ok()) return nullptr;
  return new std::string(absl::StrCat("Check failed: ", expr, " is OK (", status.ToString(), ") "));
}

}  // namespace log_internal
}  // namespace strata
