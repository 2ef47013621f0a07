// ShmCollectives: the ranks of a tensor-parallel group on one machine (processes, or threads in
// tests) combining results through shared host memory. CPU tensor parallelism runs on it.
//
// A group is two memfds that rank 0 creates (ShmGroup) and hands to the ranks it starts, which
// inherit them: the control segment, which every collective goes through, and the shared memory
// (SharedMemory) where each rank keeps its KV cache.
//
// Protocol. The control segment holds a header and two banks of exchange buffers, each bank one
// slot of slot_bytes per rank plus a result slot. A collective runs in operations of at most one
// slot each; operation k uses bank k % 2, so a rank may write the next operation's input while
// slower ranks still read the last one's output: a rank that reaches operation k + 2 has passed a
// barrier of operation k + 1, which every rank reaches only after it finished reading operation k.
//  - AllReduceSum: each rank writes its chunk to its slot; barrier; rank r sums its 1/world share
//    of the elements over slots 0 .. world-1 in rank order into the result slot; barrier; every
//    rank copies the result out. So every rank gets bitwise the same sums, and the sums do not
//    depend on timing.
//  - AllGather: each rank writes its slot; barrier; every rank copies every slot out.
//  - Broadcast: rank 0 writes the length and a chunk to its slot; barrier; the others read it.
// Barrier: an arrival counter and a generation word in the header. The last rank to arrive resets
// the counter and advances the generation; the others spin briefly, then sleep on the generation
// word (a shared futex; a sleeper count spares the last arrival the wake-up call when nobody
// sleeps). Abort (a rank failed, or the process that started the ranks saw one exit) sets a flag
// with a reason, then advances the generation and wakes every sleeper; a rank leaving a barrier
// always looks at the flag, so from then on every collective on every rank fails with UNAVAILABLE
// naming the reason.
//
// Thread contract: each rank's object is used by one thread (its step loop), except Abort.
#ifndef STRATA_WORKER_COMM_SHM_COLLECTIVES_H_
#define STRATA_WORKER_COMM_SHM_COLLECTIVES_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/unique_fd.h"
#include "worker/comm/collectives.h"

namespace strata {

// The control segment's header (shm_collectives.cc).
struct ShmControlHeader;

// The two memfds of one group. Owned by whoever created them (rank 0's process); ranks started as
// child processes inherit copies (SetInheritable).
class ShmGroup {
 public:
  // A new group of `world_size` ranks (1 .. 64) whose collectives move at most `slot_bytes` per
  // rank per operation (a multiple of 64, at least 4 KiB).
  static absl::StatusOr<ShmGroup> Create(int world_size, int64_t slot_bytes = int64_t{4} << 20);
  ShmGroup(ShmGroup&&) = default;
  ShmGroup& operator=(ShmGroup&&) = default;

  int control_fd() const { return control_.get(); }
  int memory_fd() const { return memory_.get(); }
  int world_size() const { return world_size_; }
  // Clears (true) or sets close-on-exec on both descriptors: ranks started with exec inherit them
  // only while it is clear.
  absl::Status SetInheritable(bool inheritable) const;

 private:
  ShmGroup(UniqueFd control, UniqueFd memory, int world_size)
      : control_(std::move(control)), memory_(std::move(memory)), world_size_(world_size) {}
  UniqueFd control_;
  UniqueFd memory_;
  int world_size_ = 0;
};

class ShmCollectives final : public Collectives {
 public:
  // Joins the group whose descriptors are `control_fd` and `memory_fd` (duplicated: the caller
  // keeps its own) as `rank`. INVALID_ARGUMENT when the segment is not a group's or has another
  // world size; FAILED_PRECONDITION when the group was aborted.
  static absl::StatusOr<std::unique_ptr<ShmCollectives>> Join(int control_fd, int memory_fd,
                                                              int rank, int world_size);
  ~ShmCollectives() override;

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  absl::Status AllReduceSum(float* data, int64_t count) override;
  absl::Status AllGather(const float* in, int64_t count, float* out) override;
  absl::Status Broadcast(std::string* bytes) override;
  absl::StatusOr<void*> SharedMemory(int64_t bytes) override;
  void Abort(absl::string_view why) override;

  // Why the group was aborted; empty while it was not.
  std::string AbortReason() const;

 private:
  ShmCollectives(int rank, int world_size, UniqueFd memory_fd, void* control,
                 int64_t control_bytes);
  absl::Status Barrier();
  absl::Status Aborted() const;
  // Rank r's slot, and the result slot (r == world), of the bank the next operation uses.
  char* Slot(int r) const;
  float* SlotFloats(int r) const { return reinterpret_cast<float*>(Slot(r)); }

  const int rank_;
  const int world_size_;
  UniqueFd memory_fd_;
  void* control_ = nullptr;
  int64_t control_bytes_ = 0;
  ShmControlHeader* header_ = nullptr;
  int64_t slot_bytes_ = 0;
  char* banks_ = nullptr;
  uint64_t operation_ = 0;
  void* memory_ = nullptr;
  int64_t memory_bytes_ = 0;
};

}  // namespace strata

#endif  // STRATA_WORKER_COMM_SHM_COLLECTIVES_H_
