// The CUDA twins of the fine-tune delta ops (kernels/delta.h): applying a packed delta to the rows
// of a batch that belong to one fine-tune, unpacking it (to a dense panel for a GEMM, or single
// rows for the embedding), and adding f32 rows (biases, panel products) to chosen rows. Plain
// argument structs and launchers, free of Abseil so that nvcc compiles only CUDA code; callers go
// through kernels/cuda/delta.h, which validates the arguments. All pointers are device memory;
// every launcher is asynchronous on `stream` and returns the launch error. Products and sums
// accumulate in f32.
#ifndef STRATA_KERNELS_CUDA_DELTA_KERNEL_H_
#define STRATA_KERNELS_CUDA_DELTA_KERNEL_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/ops_kernel.h"

namespace strata::gpu {

// A packed delta in device memory, laid out as kernels/delta.h describes (PackedDelta's fields).
// The kernels read q in loads of up to 8 bytes and need q 8-byte aligned.
struct DeltaView {
  int64_t rows = 0;
  int64_t cols = 0;  // a multiple of 8
  int bits = 4;      // 2, 4 or 8
  bool sparse_2_4 = false;
  const uint8_t* q = nullptr;      // [rows, kept * bits / 8]
  const uint8_t* index = nullptr;  // [rows, cols / 8], 2:4 only
  const float* scale = nullptr;    // [rows]
};

// y[r(i), j] += Σ_k x[r(i), k] · Δ[j, k] for i < m and every row j of Δ, where r(i) = rows[i] +
// row_offset (rows null: i + row_offset). For a tenant's few rows: LaunchDeltaGemv (CUDA cores,
// any activation type: each warp decodes one row of Δ once per 8 rows of x and streams it past
// them) or LaunchDeltaMma (tensor cores, 16-bit activations).
struct DeltaGemvArgs {
  int64_t m = 0;
  const int32_t* rows = nullptr;  // [m] or null
  int64_t row_offset = 0;
  const void* x = nullptr;  // [*, delta.cols], row stride ldx, act; 16-byte aligned rows
  int64_t ldx = 0;
  ActType act = ActType::kBF16;
  DeltaView delta;
  void* y = nullptr;  // [*, delta.rows], row stride ldy, out_type; must not overlap x
  int64_t ldy = 0;
  ActType out_type = ActType::kBF16;
  // LaunchDeltaMma only: where there are too few output tiles to fill the GPU, the columns split
  // over up to split_counters_count tiles' worth of blocks, whose partial products meet in
  // split_workspace (f32) and are summed in a fixed order by the last block of each tile
  // (deterministic). The counters must be zero before the first launch; each launch leaves them
  // zero. Null: no split.
  float* split_workspace = nullptr;
  int64_t split_workspace_floats = 0;
  uint32_t* split_counters = nullptr;
  int64_t split_counters_count = 0;
};
cudaError_t LaunchDeltaGemv(const DeltaGemvArgs& a, cudaStream_t stream);

// The same product on the tensor cores, for f16 and bf16 activations (act; out_type any): blocks
// of 64 rows of x by 64 rows of Δ decode each stretch of Δ into shared memory once and multiply it
// with wmma (f32 accumulation), so that Δ is read once per 64 rows of x instead of being streamed
// past them by CUDA-core FMAs. For a tenant's decode rows (up to 64 at once) and the small prompts
// of a mixed step.
cudaError_t LaunchDeltaMma(const DeltaGemvArgs& a, cudaStream_t stream);

// Dense rows of Δ: out row d(i) = Δ row s(i) for i < num_rows, where s(i) = src_rows[i] (null:
// row_begin + i) and d(i) = dst_rows[i] (null: i); written over out's values, or added to them
// when `accumulate`. A source row outside [0, delta.rows) leaves its out row untouched. Used for
// panels of Δ that a GEMM multiplies, and for the embedding's rows of a fine-tune's tokens.
struct UnpackDeltaArgs {
  DeltaView delta;
  int64_t num_rows = 0;
  int64_t row_begin = 0;
  const int32_t* src_rows = nullptr;  // [num_rows] or null
  const int32_t* dst_rows = nullptr;  // [num_rows] or null
  void* out = nullptr;                // [*, delta.cols], row stride ld_out, out_type
  int64_t ld_out = 0;
  ActType out_type = ActType::kBF16;
  bool accumulate = false;
};
cudaError_t LaunchUnpackDelta(const UnpackDeltaArgs& a, cudaStream_t stream);

// y[rows[i], j] += src[i * ld_src + j] for i < m, j < n (rows null: row i); ld_src 0 adds the
// same row to each (a bias). How a fine-tune's bias deltas, and the products of its delta panels
// (gathered rows, f32), reach their rows of the batch.
struct AddRowsArgs {
  int64_t m = 0;
  int64_t n = 0;
  const int32_t* rows = nullptr;  // [m] or null
  const float* src = nullptr;     // [m, n] with row stride ld_src, or [n] when ld_src is 0; f32
  int64_t ld_src = 0;
  void* y = nullptr;  // [*, n], row stride ldy, type
  int64_t ldy = 0;
  ActType type = ActType::kBF16;
};
cudaError_t LaunchAddRows(const AddRowsArgs& a, cudaStream_t stream);

// For tests, on the host: columns [8 * unit, 8 * unit + 8) of row `row` of Δ, decoded by the very
// code the kernels run (as code minus zero point, before the row's scale; pruned columns 0). `d`'s
// buffers are host memory here.
void DecodeDeltaUnitForTesting(const DeltaView& d, int64_t row, int64_t unit, float out[8]);

}  // namespace strata::gpu

#endif  // STRATA_KERNELS_CUDA_DELTA_KERNEL_H_
