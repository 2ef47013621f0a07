// Strata's one logging library: LOG, VLOG, CHECK and friends, writing one line per message to
// stderr.
//
//   LOG(INFO) << "worker " << id << " joined";
//   VLOG(2) << "step " << step << " batch " << batch_size;
//   CHECK_LT(slot, num_slots) << "slot index out of range";
//   CHECK_OK(status);
//
// Line format: `I1126 03:12:34.123456 4242 file.cc:42] message` (severity letter, month and day,
// time, thread id, source location). LOG(FATAL) and failed CHECKs log and then abort: they are for
// our own invariants only, never for bad input (which gets an absl::Status). Thread-safe; each
// message is written with one write(2). Levels are process-wide and set once at start by
// common/init.h from flags.
#ifndef STRATA_COMMON_LOG_H_
#define STRATA_COMMON_LOG_H_

#include <sstream>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace strata {

enum class LogSeverity : int { kInfo = 0, kWarning = 1, kError = 2, kFatal = 3 };

// Messages below this severity are dropped (FATAL is never dropped). Default kInfo.
void SetMinLogSeverity(LogSeverity severity);
LogSeverity MinLogSeverity();
// VLOG(n) is on for n <= level. Default 0.
void SetVLogLevel(int level);
bool VLogIsOn(int level);

// Parses "info", "warning", "error" or "fatal" (any case).
absl::Status ParseLogSeverity(absl::string_view text, LogSeverity* out);

// One formatted message, as given to sinks.
struct LogEntry {
  LogSeverity severity;
  absl::string_view file;  // basename of the source file
  int line;
  absl::Time time;
  absl::string_view message;  // without the prefix or trailing newline
};

// Receives every message that passes the severity filter, in addition to stderr. Send runs on the
// logging thread and must not log.
class LogSink {
 public:
  virtual ~LogSink() = default;
  virtual void Send(const LogEntry& entry) = 0;
};
// The sink must outlive its registration.
void AddLogSink(LogSink* sink);
void RemoveLogSink(LogSink* sink);

namespace log_internal {

// Collects one message; the destructor emits it.
class LogMessage {
 public:
  LogMessage(const char* file, int line, LogSeverity severity);
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  ~LogMessage();
  std::ostream& stream() { return stream_; }

 protected:
  void Emit();

 private:
  const char* file_;
  int line_;
  LogSeverity severity_;
  bool emitted_ = false;
  std::ostringstream stream_;
};

// LOG(FATAL) and failed CHECKs: emits, flushes and aborts.
class LogMessageFatal : public LogMessage {
 public:
  LogMessageFatal(const char* file, int line) : LogMessage(file, line, LogSeverity::kFatal) {}
  [[noreturn]] ~LogMessageFatal();
};

// Turns `stream << x` into void so that it can sit in a conditional expression.
struct Voidify {
  void operator&(std::ostream&) {}
};

// Builds "a vs. b" for CHECK_EQ and friends. Returns nullptr when the check passes.
template <typename A, typename B, typename Op>
std::string* CheckOpMessage(const A& a, const B& b, Op op, const char* expr) {
  if (op(a, b)) return nullptr;
  std::ostringstream os;
  os << "Check failed: " << expr << " (" << a << " vs. " << b << ") ";
  return new std::string(os.str());
}

// Owns the message of a failed check op until the fatal message takes it.
class CheckOpResult {
 public:
  explicit CheckOpResult(std::string* message) : message_(message) {}
  ~CheckOpResult() { delete message_; }
  explicit operator bool() const { return message_ != nullptr; }
  const std::string& message() const { return *message_; }

 private:
  std::string* message_;
};

// Returns nullptr for OK, else the message of a failed CHECK_OK.
std::string* StatusCheckMessage(const absl::Status& status, const char* expr);
inline const absl::Status& AsStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& AsStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

}  // namespace log_internal
}  // namespace strata

#define STRATA_LOG_INFO \
  ::strata::log_internal::LogMessage(__FILE__, __LINE__, ::strata::LogSeverity::kInfo)
#define STRATA_LOG_WARNING \
  ::strata::log_internal::LogMessage(__FILE__, __LINE__, ::strata::LogSeverity::kWarning)
#define STRATA_LOG_ERROR \
  ::strata::log_internal::LogMessage(__FILE__, __LINE__, ::strata::LogSeverity::kError)
#define STRATA_LOG_FATAL ::strata::log_internal::LogMessageFatal(__FILE__, __LINE__)

// LOG(INFO), LOG(WARNING), LOG(ERROR), LOG(FATAL).
#define LOG(severity) STRATA_LOG_##severity.stream()

#define LOG_IF(severity, condition) \
  !(condition) ? (void)0 : ::strata::log_internal::Voidify() & LOG(severity)

#define VLOG(level) LOG_IF(INFO, ::strata::VLogIsOn(level))

#define CHECK(condition)                                                      \
  (condition) ? (void)0                                                       \
              : ::strata::log_internal::Voidify() & STRATA_LOG_FATAL.stream() \
                                                        << "Check failed: " #condition " "

#define STRATA_CHECK_OP_(name, op, a, b)                                                      \
  while (::strata::log_internal::CheckOpResult _strata_check_result{                          \
      ::strata::log_internal::CheckOpMessage(                                                 \
          (a), (b), [](const auto& x, const auto& y) { return x op y; }, #a " " #op " " #b)}) \
  STRATA_LOG_FATAL.stream() << _strata_check_result.message()

#define CHECK_EQ(a, b) STRATA_CHECK_OP_(EQ, ==, a, b)
#define CHECK_NE(a, b) STRATA_CHECK_OP_(NE, !=, a, b)
#define CHECK_LT(a, b) STRATA_CHECK_OP_(LT, <, a, b)
#define CHECK_LE(a, b) STRATA_CHECK_OP_(LE, <=, a, b)
#define CHECK_GT(a, b) STRATA_CHECK_OP_(GT, >, a, b)
#define CHECK_GE(a, b) STRATA_CHECK_OP_(GE, >=, a, b)

// CHECK_OK(status or statusor): the status must be OK.
#define CHECK_OK(expr)                                                                            \
  while (::strata::log_internal::CheckOpResult _strata_check_result{                              \
      ::strata::log_internal::StatusCheckMessage(::strata::log_internal::AsStatus(expr), #expr)}) \
  STRATA_LOG_FATAL.stream() << _strata_check_result.message()

#ifdef NDEBUG
#define DCHECK(condition) \
  while (false) CHECK(condition)
#define DCHECK_EQ(a, b) \
  while (false) CHECK_EQ(a, b)
#define DCHECK_LT(a, b) \
  while (false) CHECK_LT(a, b)
#define DCHECK_LE(a, b) \
  while (false) CHECK_LE(a, b)
#else
#define DCHECK(condition) CHECK(condition)
#define DCHECK_EQ(a, b) CHECK_EQ(a, b)
#define DCHECK_LT(a, b) CHECK_LT(a, b)
#define DCHECK_LE(a, b) CHECK_LE(a, b)
#endif

#endif  // STRATA_COMMON_LOG_H_
