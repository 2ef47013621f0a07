#include "coordinator/serial_writer.h"

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
    // A batch may be megabytes to a slow client, which must only keep reading.
    if (!WriteAllPaced(fd_, batch, wake_fd_, write_timeout_)) {
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
