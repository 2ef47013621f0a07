#include "coordinator/serial_writer.h"

#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "common/tcp.h"

namespace strata {

bool SerialWriter::Append(absl::FunctionRef<void(std::string*)> fill) {
  {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(this, &SerialWriter::Room));
    if (failed_) return false;
    fill(&pending_);
    if (writing_ || pending_.empty()) return true;  // the thread writing takes it
    writing_ = true;
  }
  while (true) {
    std::string batch;
    {
      absl::MutexLock lock(&mu_);
      if (pending_.empty()) {
        writing_ = false;
        return true;
      }
      batch.swap(pending_);
    }
    // In slices, each with its own deadline: a batch may be megabytes to a slow client, which
    // must only keep reading, not read it all within one timeout.
    bool ok = true;
    for (size_t at = 0; ok && at < batch.size(); at += kSliceBytes) {
      const absl::string_view slice = absl::string_view(batch).substr(at, kSliceBytes);
      ok = WriteAll(fd_, slice, wake_fd_, absl::Now() + write_timeout_);
    }
    if (!ok) {
      {
        absl::MutexLock lock(&mu_);
        failed_ = true;
        writing_ = false;
        pending_.clear();
      }
      on_failure_();
      return false;
    }
  }
}

}  // namespace strata
