// Collectives: how the ranks of a tensor-parallel group combine partial results. The model runner
// calls these after each row-parallel projection; implementations are a single rank (no-op), and
// NCCL across the GPUs of one machine (later).
#ifndef STRATA_WORKER_COMM_COLLECTIVES_H_
#define STRATA_WORKER_COMM_COLLECTIVES_H_

#include <cstdint>

#include "absl/status/status.h"

namespace strata {

// One per rank; used from the rank's step thread only.
class Collectives {
 public:
  virtual ~Collectives() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // data[i] <- sum over ranks of data[i]; `data` is [count] f32 in the rank's compute memory.
  virtual absl::Status AllReduceSum(float* data, int64_t count) = 0;
  // out[r * count + i] <- in of rank r at i; out is [world_size * count], in is [count].
  virtual absl::Status AllGather(const float* in, int64_t count, float* out) = 0;
};

// The group of one: every collective is the identity.
class SingleRankCollectives final : public Collectives {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  absl::Status AllReduceSum(float*, int64_t) override { return absl::OkStatus(); }
  absl::Status AllGather(const float* in, int64_t count, float* out) override;
};

}  // namespace strata

#endif  // STRATA_WORKER_COMM_COLLECTIVES_H_
