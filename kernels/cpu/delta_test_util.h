// Packing for the delta ops' tests (testonly), CPU and CUDA alike: a delta packed by PackDeltaCpu
// into buffers it owns, poisoned first so that a byte the packer leaves unwritten shows.
#ifndef STRATA_KERNELS_CPU_DELTA_TEST_UTIL_H_
#define STRATA_KERNELS_CPU_DELTA_TEST_UTIL_H_

#include <cstdint>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/delta.h"

namespace strata::delta_test {

// A packed delta with its own buffers.
struct Packed {
  std::vector<uint8_t> q, index;
  std::vector<float> scale;
  PackedDelta view;
};

inline Packed Pack(const std::vector<float>& delta, int64_t rows, int64_t cols, int bits,
                   bool sparse, const float* importance = nullptr) {
  Packed out;
  out.view.rows = rows;
  out.view.cols = cols;
  out.view.bits = bits;
  out.view.sparse_2_4 = sparse;
  out.q.assign(rows * out.view.QBytesPerRow(), 0xcd);
  out.index.assign(rows * out.view.IndexBytesPerRow() + 1, 0xcd);
  out.scale.assign(rows, std::numeric_limits<float>::quiet_NaN());
  std::vector<float> workspace(DeltaPackWorkspaceBytes(cols) / sizeof(float));
  DeltaPackParams p;
  p.rows = rows;
  p.cols = cols;
  p.bits = bits;
  p.sparse_2_4 = sparse;
  p.delta = delta.data();
  p.column_importance = importance;
  p.q = out.q.data();
  p.index = sparse ? out.index.data() : nullptr;
  p.scale = out.scale.data();
  p.workspace = workspace.data();
  p.workspace_bytes = workspace.size() * sizeof(float);
  EXPECT_TRUE(PackDeltaCpu(p).ok());
  out.view.q = out.q.data();
  out.view.index = sparse ? out.index.data() : nullptr;
  out.view.scale = out.scale.data();
  return out;
}

}  // namespace strata::delta_test

#endif  // STRATA_KERNELS_CPU_DELTA_TEST_UTIL_H_
