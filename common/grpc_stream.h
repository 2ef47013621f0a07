// QueuedServerWriter: a server-streaming reactor (gRPC callback API) that any thread may write to.
//
// gRPC allows one outstanding write per stream; this class queues messages while a write is in
// flight, optionally coalescing them (Merge), and finishes the stream once the queue has drained.
//
// Lifetime protocol. The owner (the component producing messages) may call Write and RequestFinish
// from any one thread until it has called RequestFinish; after that it must not touch the object.
// The stream deletes itself in OnDone, which gRPC calls only after Finish, and this class calls
// Finish only after RequestFinish. Every decision to start a write or finish is taken under the
// stream's lock together with the state change that caused it, so exactly one thread issues each
// gRPC operation and the thread that issues Finish is the last one to touch the object.
// When a write fails (the client went away), OnWriteFailed runs once on a gRPC thread, unless the
// owner has already asked to finish; the owner is expected to respond with RequestFinish.
#ifndef STRATA_COMMON_GRPC_STREAM_H_
#define STRATA_COMMON_GRPC_STREAM_H_

#include <cstddef>
#include <deque>
#include <optional>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/support/server_callback.h"

namespace strata {

template <typename Message>
class QueuedServerWriter : public grpc::ServerWriteReactor<Message> {
 public:
  // Queues `message` (merging it into the last queued one when Merge allows). False when the stream
  // has failed or is finishing: the message is dropped.
  bool Write(Message message) ABSL_LOCKS_EXCLUDED(mu_) {
    Action action;
    {
      absl::MutexLock lock(&mu_);
      if (failed_ || finish_.has_value()) return false;
      if (queue_.empty() || !Merge(queue_.back(), message)) queue_.push_back(std::move(message));
      action = DecideLocked();
    }
    Act(action);
    return true;
  }

  // Finishes the stream with `status` once queued messages are written (at once if it failed).
  // The caller must not touch the object afterwards.
  void RequestFinish(grpc::Status status) ABSL_LOCKS_EXCLUDED(mu_) {
    FinishWith(std::move(status), /*drop_queued=*/false);
  }

  // Drops whatever is still queued and finishes with `status` as soon as no write is in flight (for
  // a reader that stopped reading). The caller must not touch the object afterwards.
  void Abort(grpc::Status status) ABSL_LOCKS_EXCLUDED(mu_) {
    FinishWith(std::move(status), /*drop_queued=*/true);
  }

  // Messages waiting to be written (not counting the one in flight).
  size_t num_queued() ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return queue_.size();
  }

  void OnWriteDone(bool ok) final ABSL_LOCKS_EXCLUDED(mu_) {
    Action action;
    bool notify = false;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        failed_ = true;
        queue_.clear();
        notify = !finish_.has_value();
      }
      action = DecideLocked();
      if (ok) OnWrittenLocked(queue_.size());
    }
    // With `notify`, nothing else can be pending (the queue is empty and no finish was requested),
    // so the owner's RequestFinish, possibly racing with this call, is what finishes the stream.
    if (notify) {
      OnWriteFailed();
      return;
    }
    Act(action);
  }

  void OnDone() final {
    OnStreamDone();
    delete this;
  }

 protected:
  QueuedServerWriter() = default;
  ~QueuedServerWriter() override = default;

  // Folds `next` into `queued` (both unsent) and returns true, or returns false to queue it
  // separately. Called under the stream's lock.
  virtual bool Merge(Message& queued, Message& next) {
    (void)queued;
    (void)next;
    return false;
  }
  // A write failed: the client is gone. Runs on a gRPC thread, at most once.
  virtual void OnWriteFailed() {}
  // A write succeeded; `queued` messages wait behind the next one in flight (if any). Runs on a
  // gRPC thread under the stream's lock: it must not call the stream's methods.
  virtual void OnWrittenLocked(size_t queued) { (void)queued; }
  // Runs right before the object deletes itself.
  virtual void OnStreamDone() {}

 private:
  enum class Action { kNone, kWrite, kFinish };

  void FinishWith(grpc::Status status, bool drop_queued) ABSL_LOCKS_EXCLUDED(mu_) {
    Action action;
    {
      absl::MutexLock lock(&mu_);
      if (finish_.has_value()) return;
      if (drop_queued) queue_.clear();
      finish_ = std::move(status);
      action = DecideLocked();
    }
    Act(action);
  }

  Action DecideLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finishing_) return Action::kNone;
    if (!failed_ && !queue_.empty()) {
      current_ = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
      return Action::kWrite;
    }
    if (finish_.has_value()) {
      finishing_ = true;
      return Action::kFinish;
    }
    return Action::kNone;
  }

  void Act(Action action) {
    switch (action) {
      case Action::kWrite:
        this->StartWrite(&current_);
        break;
      case Action::kFinish:
        // finish_ is no longer written by anyone once finishing_ is set.
        this->Finish(*finish_);
        break;
      case Action::kNone:
        break;
    }
  }

  absl::Mutex mu_;
  std::deque<Message> queue_ ABSL_GUARDED_BY(mu_);
  Message current_;  // the message in flight; only the thread that set writing_ touches it
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool failed_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<grpc::Status> finish_;  // set once under mu_, then read-only
};

}  // namespace strata

#endif  // STRATA_COMMON_GRPC_STREAM_H_
