// Collectives: how the ranks of a tensor-parallel group combine partial results and share the step
// plan. The model runner calls them after each row-parallel projection and at the start of every
// step; implementations are a single rank (no-op), ranks sharing host memory on one machine
// (ShmCollectives, for CPU tensor parallelism), and NCCL across the GPUs of one machine (later).
//
// Every rank calls the same collectives in the same order with the same counts; that contract is
// the caller's (rank 0's step plan makes it so), and breaking it is a bug that hangs or corrupts
// the group. A failed collective (a peer gone, the group aborted) leaves the group unusable: every
// later call fails too.
#ifndef STRATA_WORKER_COMM_COLLECTIVES_H_
#define STRATA_WORKER_COMM_COLLECTIVES_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace strata {

// One per rank; used from the rank's step thread only (except Abort).
class Collectives {
 public:
  virtual ~Collectives() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // data[i] <- sum over ranks of data[i]; `data` is [count] f32 in the rank's compute memory.
  // Every rank ends with bitwise the same sums.
  virtual absl::Status AllReduceSum(float* data, int64_t count) = 0;
  // out[r * count + i] <- in of rank r at i; out is [world_size * count], in is [count].
  virtual absl::Status AllGather(const float* in, int64_t count, float* out) = 0;
  // Rank 0's *bytes reach every rank: on the others *bytes is replaced by them.
  virtual absl::Status Broadcast(std::string* bytes) = 0;
  // Host memory every rank of the group maps at once: rank 0 sizes it to `bytes`, the others map
  // the same memory (asking for no more than rank 0 sized). Each rank's CPU KV cache lives there so
  // that rank 0 can move whole blocks, all ranks' shares, between tiers. One size per group: a
  // second call must ask for the same bytes. UNIMPLEMENTED where ranks share no memory.
  virtual absl::StatusOr<void*> SharedMemory(int64_t bytes) = 0;
  // Marks the group failed (`why` says how): every collective in progress on any rank returns
  // UNAVAILABLE naming it (even one whose data had just arrived), and so does every later call.
  // Callable from any thread.
  virtual void Abort(absl::string_view why) = 0;
};

// The group of one: every collective is the identity.
class SingleRankCollectives final : public Collectives {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  absl::Status AllReduceSum(float*, int64_t) override { return absl::OkStatus(); }
  absl::Status AllGather(const float* in, int64_t count, float* out) override;
  absl::Status Broadcast(std::string*) override { return absl::OkStatus(); }
  absl::StatusOr<void*> SharedMemory(int64_t) override {
    return absl::UnimplementedError("a single rank shares no memory");
  }
  void Abort(absl::string_view) override {}
};

}  // namespace strata

#endif  // STRATA_WORKER_COMM_COLLECTIVES_H_
