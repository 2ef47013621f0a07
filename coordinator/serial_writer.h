// Ordered writes of several threads to one socket, with no lock held across a write.
#ifndef STRATA_COORDINATOR_SERIAL_WRITER_H_
#define STRATA_COORDINATOR_SERIAL_WRITER_H_

#include <cstddef>
#include <functional>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace strata {

// Writes from several threads to one socket (an HTTP stream's choices), in the order they are
// handed over, with no lock held across a write: the thread that finds nothing being written writes
// until nothing is left; the others append and go back to their calls, waiting only while more than
// kMaxPendingBytes wait to go out (a slow client slows the readers, as a blocking write would).
// After a write fails every Append is refused, and on_failure has run once (on the writer).
class SerialWriter {
 public:
  static constexpr size_t kMaxPendingBytes = size_t{4} << 20;

  // Each slice of a write must go out within write_timeout (WriteAllPaced) and before wake_fd is
  // readable.
  SerialWriter(int fd, int wake_fd, absl::Duration write_timeout, std::function<void()> on_failure)
      : fd_(fd),
        wake_fd_(wake_fd),
        write_timeout_(write_timeout),
        on_failure_(std::move(on_failure)) {}
  SerialWriter(const SerialWriter&) = delete;
  SerialWriter& operator=(const SerialWriter&) = delete;

  // Appends what `fill` writes into its argument; `fill` runs under the writer's lock, so what it
  // reads and sets is ordered with the bytes (the stream's head goes out first). False once a
  // write has failed (`fill` not run).
  bool Append(absl::FunctionRef<void(std::string*)> fill) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  bool Room() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return failed_ || pending_.size() < kMaxPendingBytes;
  }

  const int fd_;
  const int wake_fd_;
  const absl::Duration write_timeout_;
  const std::function<void()> on_failure_;
  mutable absl::Mutex mu_;
  std::string pending_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool failed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace strata

#endif  // STRATA_COORDINATOR_SERIAL_WRITER_H_
