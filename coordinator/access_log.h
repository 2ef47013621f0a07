// The coordinator's access log (--access_log): one JSON object a line for each Generate call
// (either API) and each HTTP request, written by a thread of its own so that serving never waits
// on the disk. Prompts and outputs are never logged, only their sizes.
//
// A record is built by the caller (AccessRecord below) and handed over whole; while more than
// max_pending_bytes wait to be written further records are dropped and counted (a slow disk
// costs lines, not latency). A file is appended to and opened again when its path no longer names
// it (moved away by logrotate, removed), checked every second; "-" is standard output.
#ifndef STRATA_COORDINATOR_ACCESS_LOG_H_
#define STRATA_COORDINATOR_ACCESS_LOG_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"

namespace strata {

struct AccessLogOptions {
  // Bytes of records waiting to be written past which new ones are dropped.
  size_t max_pending_bytes = size_t{8} << 20;
  // Without a writer thread records wait for Flush (tests).
  bool writer_thread = true;
  // Counted as records are written and dropped, when set (strata_coordinator_access_log_records_
  // total{outcome}). Not owned.
  Counter* written_counter = nullptr;
  Counter* dropped_counter = nullptr;
};

class AccessLog {
 public:
  // Opens `path` for appending ("-": standard output). NOT_FOUND / PERMISSION_DENIED / ... naming
  // it when it cannot be opened.
  static absl::StatusOr<std::unique_ptr<AccessLog>> Open(const std::string& path,
                                                         AccessLogOptions options = {});
  // Writes what is pending, then closes.
  ~AccessLog();
  AccessLog(const AccessLog&) = delete;
  AccessLog& operator=(const AccessLog&) = delete;

  // One record (a JSON object without its newline). Never blocks on I/O.
  void Append(std::string record);
  // Writes every pending record now (and checks the path first).
  void Flush();
  int64_t written() const { return written_.load(); }
  int64_t dropped() const { return dropped_.load(); }
  int64_t write_errors() const { return write_errors_.load(); }

 private:
  AccessLog(std::string path, int fd, AccessLogOptions options);
  void WriteOut(std::vector<std::string> records) ABSL_EXCLUSIVE_LOCKS_REQUIRED(io_mu_);
  void ReopenIfMoved() ABSL_EXCLUSIVE_LOCKS_REQUIRED(io_mu_);
  void Run();

  const std::string path_;
  const AccessLogOptions options_;
  absl::Mutex io_mu_;  // the file; taken before mu_ when both are
  int fd_ ABSL_GUARDED_BY(io_mu_);
  absl::Time checked_ ABSL_GUARDED_BY(io_mu_);
  // A write failed partway through a record: the next write starts a new line first.
  bool mid_line_ ABSL_GUARDED_BY(io_mu_) = false;
  bool failing_ ABSL_GUARDED_BY(io_mu_) = false;  // the last write failed (logged once a spell)
  absl::Mutex mu_;
  std::vector<std::string> pending_ ABSL_GUARDED_BY(mu_);
  size_t pending_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::atomic<int64_t> written_{0}, dropped_{0}, write_errors_{0};
  std::thread writer_;
};

// Builds one record: {"time": ..., "event": ..., then fields in the order added}.
class AccessRecord {
 public:
  // `time`: when the call or request arrived (RFC 3339, UTC, milliseconds).
  AccessRecord(absl::Time time, absl::string_view event);
  // Values are cut at `max_bytes` (a caller's request id or model name may be anything).
  AccessRecord& Str(absl::string_view key, absl::string_view value, size_t max_bytes = 256);
  // Left out when empty.
  AccessRecord& StrIfSet(absl::string_view key, absl::string_view value);
  AccessRecord& Int(absl::string_view key, int64_t value);
  // Milliseconds, to the microsecond.
  AccessRecord& Ms(absl::string_view key, absl::Duration d);
  AccessRecord& StrList(absl::string_view key, const std::vector<std::string>& values);
  // A JSON value written as given.
  AccessRecord& Raw(absl::string_view key, absl::string_view json);
  // The record; the builder is spent.
  std::string Done();

 private:
  std::string text_;
};

// The trace id of a W3C traceparent header ("00-<32 hex>-<16 hex>-<2 hex>"), or empty when it
// is not one (or its trace id is all zeros).
std::string TraceIdOf(absl::string_view traceparent);

}  // namespace strata

#endif  // STRATA_COORDINATOR_ACCESS_LOG_H_
