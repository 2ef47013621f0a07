// Host-side bookkeeping of fine-tune deltas on the GPU runner, kept apart from CUDA so that it is
// tested on any machine: where each fine-tune's delta lives in the runner's device region
// (DeltaResidency), and how one step's tokens divide among fine-tunes (PlanDeltaStep).
#ifndef STRATA_WORKER_MODEL_GPU_DELTA_PLAN_H_
#define STRATA_WORKER_MODEL_GPU_DELTA_PLAN_H_

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "worker/model/delta.h"

namespace strata {

// Which deltas (by DeltaWeights::serial) occupy a device region of `capacity` bytes, and where:
// first fit at 256-byte aligned offsets, evicting the least recently used entries that the current
// step does not use when nothing fits. Pure bookkeeping (the caller copies the bytes); one thread.
class DeltaResidency {
 public:
  explicit DeltaResidency(int64_t capacity) : capacity_(capacity) {}

  struct Placement {
    int64_t offset = 0;
    // The entry was not resident: the caller must upload it to `offset`.
    bool upload = false;
  };
  // Marks `serial` used by step `step` (steps count up) and returns where it is, placing it first
  // if needed. RESOURCE_EXHAUSTED when `bytes` exceeds the capacity, or when only entries that
  // this step uses stand in the way.
  absl::StatusOr<Placement> Place(uint64_t serial, int64_t bytes, int64_t step);

  // Forgets every entry (the caller then places a step's deltas into an empty region: what it
  // does when the gaps left between them are too small, however much is free in all).
  void Clear() {
    evictions_ += static_cast<int64_t>(entries_.size());
    entries_.clear();
    by_offset_.clear();
    used_ = 0;
  }

  bool resident(uint64_t serial) const { return entries_.contains(serial); }
  int64_t num_resident() const { return static_cast<int64_t>(entries_.size()); }
  int64_t used_bytes() const { return used_; }
  int64_t capacity() const { return capacity_; }
  int64_t uploads() const { return uploads_; }
  int64_t evictions() const { return evictions_; }

 private:
  struct Entry {
    int64_t offset = 0;
    int64_t bytes = 0;
    int64_t last_step = 0;
  };
  // The lowest aligned offset with `bytes` free, or -1.
  int64_t FindGap(int64_t bytes) const;

  int64_t capacity_;
  int64_t used_ = 0;
  int64_t uploads_ = 0;
  int64_t evictions_ = 0;
  absl::flat_hash_map<uint64_t, Entry> entries_;
  std::map<int64_t, int64_t> by_offset_;  // offset -> bytes (aligned up)
};

// How one step's tokens divide among the fine-tunes in it. Token t belongs to the delta of its
// sequence (seq_deltas[token_seq[t]]; none when seq_deltas is empty or the entry null).
struct DeltaStepPlan {
  struct Segment {
    const DeltaWeights* delta = nullptr;
    // Into `indices`: the segment's token indices (ascending) and, at the same positions, their
    // token ids.
    int64_t rows_at = 0;
    int64_t ids_at = 0;
    int64_t num_rows = 0;
    // Into `indices`: the segment's logit rows (indices i into logit_tokens, ascending), each
    // stored as i % logit_chunk (its row within the chunk of logit_chunk rows that holds it);
    // logit_rows keeps the plain indices, to find a chunk's range.
    int64_t logits_at = 0;
    std::vector<int32_t> logit_rows;
    // Maximal runs [begin, end) of consecutive token indices of the segment.
    std::vector<std::pair<int32_t, int32_t>> runs;
  };
  std::vector<Segment> segments;  // in order of first appearance
  std::vector<int32_t> indices;
  // Per token: its segment, or -1 for the base (empty when there are no segments).
  std::vector<int32_t> token_segment;

  bool empty() const { return segments.empty(); }
  // The segment's logit rows in [offset, offset + count): their position in logit_rows and their
  // number.
  static std::pair<int64_t, int64_t> LogitRange(const Segment& s, int64_t offset, int64_t count);
};

// tokens, token_seq: one entry per token; seq_deltas: one per sequence, or empty.
DeltaStepPlan PlanDeltaStep(absl::Span<const int32_t> tokens, absl::Span<const int32_t> token_seq,
                            absl::Span<const DeltaWeights* const> seq_deltas,
                            absl::Span<const int32_t> logit_tokens, int64_t logit_chunk);

}  // namespace strata

#endif  // STRATA_WORKER_MODEL_GPU_DELTA_PLAN_H_
