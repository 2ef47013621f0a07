// delta: the compressed weight deltas of fine-tunes, and the ops that apply them.
//
// A fine-tune is served as its base model plus, for each weight matrix W [rows, cols] (rows are
// output features), a compressed delta Δ ≈ W_fine_tune - W_base (DeltaZip's scheme): optionally
// 2:4 sparse (of every 4 consecutive columns of a row, the 2 that matter most are kept), the kept
// values quantized symmetrically to `bits` bits (2, 4 or 8) with one f32 scale per row. A batch
// that mixes tenants computes y = x · W_baseᵀ for all its rows at once and then adds x · Δᵀ for
// each tenant's rows (DeltaMatMulCpu's `rows`).
//
// Packed layout of one delta (all row-major, host or device memory):
//   kept  = cols / 2 with 2:4 sparsity, else cols: values stored per row.
//   q     [rows, kept * bits / 8] u8. Value v of a row sits in bits [v*bits, v*bits + bits) of the
//         row's bytes, least significant first. Code c stands for (c - 2^(bits-1)) * scale[row];
//         the packer only uses codes 1 .. 2^bits - 1 (symmetric levels -L .. L, L = 2^(bits-1) -
//         1).
//   index [rows, cols / 8] u8, 2:4 only: group g (columns 4g .. 4g+3) is the nibble at byte g / 2
//         (low nibble for even g); its bits 0-1 and 2-3 are the column offsets (0..3, the first
//         smaller) of the group's two kept values, which are values 2g and 2g+1 of the row.
//   scale [rows] f32.
// cols must be a multiple of 8.
#ifndef STRATA_KERNELS_DELTA_H_
#define STRATA_KERNELS_DELTA_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace strata {

// A packed delta (see the file comment). The pointers are views; the memory space is the op's.
struct PackedDelta {
  int64_t rows = 0;
  int64_t cols = 0;
  int bits = 4;                    // 2, 4 or 8
  bool sparse_2_4 = true;          // index present
  const uint8_t* q = nullptr;      // [rows, QBytesPerRow()]
  const uint8_t* index = nullptr;  // [rows, cols / 8], 2:4 only
  const float* scale = nullptr;    // [rows]

  int64_t KeptPerRow() const { return sparse_2_4 ? cols / 2 : cols; }
  int64_t QBytesPerRow() const { return KeptPerRow() * bits / 8; }
  int64_t IndexBytesPerRow() const { return sparse_2_4 ? cols / 8 : 0; }
  // Bytes of q, index and scale together.
  int64_t PackedBytes() const {
    return rows * (QBytesPerRow() + IndexBytesPerRow() + static_cast<int64_t>(sizeof(float)));
  }
};

// INVALID_ARGUMENT naming the field: bits not 2/4/8, cols not a positive multiple of 8, rows < 0,
// a null buffer.
absl::Status ValidatePackedDelta(const PackedDelta& d);

struct DeltaPackParams {
  int64_t rows = 0;
  int64_t cols = 0;
  int bits = 4;
  bool sparse_2_4 = false;
  // [rows, cols], host, f32: the dense delta to compress.
  const float* delta = nullptr;
  // [cols], host, f32, or null: importance of each input column (for example the RMS of the
  // activations that meet it on calibration text). 2:4 selection keeps the two values of a group
  // with the largest |Δ| * importance (Wanda's criterion); null weighs columns equally. The scale
  // search ignores it: weighting its squared error by importance measured worse on the bundled
  // fine-tunes (docs/PERFORMANCE.md).
  const float* column_importance = nullptr;
  // Outputs, host: [rows, kept * bits / 8], [rows, cols / 8] (2:4 only; may be null otherwise) and
  // [rows].
  uint8_t* q = nullptr;
  uint8_t* index = nullptr;
  float* scale = nullptr;
  // Rows [row_begin, row_end) only (row_end 0 means rows): callers split the work across threads.
  int64_t row_begin = 0;
  int64_t row_end = 0;
  // Scratch of at least DeltaPackWorkspaceBytes(cols) bytes, host, 4-byte aligned.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Scratch PackDeltaCpu needs for rows of `cols` columns.
inline size_t DeltaPackWorkspaceBytes(int64_t cols) {
  return static_cast<size_t>(cols) * sizeof(float);
}

// Compresses a dense delta: 2:4 selection (if asked), then per row the scale, among a grid of
// clipping ratios of the row's largest kept magnitude, that gives the smallest squared error of
// the kept values, and round-to-nearest codes. Deterministic.
absl::Status PackDeltaCpu(const DeltaPackParams& p);

// out [row_end - row_begin, cols], host, f32: rows [row_begin, row_end) of the dense Δ (zeros at
// pruned positions), added to out's values when `accumulate`, else written over them.
absl::Status UnpackDeltaCpu(const PackedDelta& d, int64_t row_begin, int64_t row_end, float* out,
                            bool accumulate);

struct DeltaMatMulParams {
  // Rows of x and y taking part.
  int64_t m = 0;
  // [m], host, or null: the rows of x and y to use (row rows[i] for i < m); null means 0 .. m-1.
  // This is how one tenant's tokens are picked out of a mixed batch without copying them.
  const int32_t* rows = nullptr;
  // [*, delta.cols], host, f32, row stride ldx (0 means delta.cols).
  const float* x = nullptr;
  int64_t ldx = 0;
  PackedDelta delta;  // host
  // [*, delta.rows], host, f32, row stride ldy (0 means delta.rows): y += x · Δᵀ. Must not overlap
  // x.
  float* y = nullptr;
  int64_t ldy = 0;
  // Only output columns [n_begin, n_end) of y (rows of Δ) are updated (n_end 0 means delta.rows):
  // callers split the work across threads.
  int64_t n_begin = 0;
  int64_t n_end = 0;
};

// y[rows[i], j] += Σ_k x[rows[i], k] · Δ[j, k]. Decodes each row of Δ once per call, in chunks on
// the stack (through per-byte tables), and streams it past the m rows of x with AVX2/FMA dots
// where the CPU has them. Single-threaded and meant for few rows (decode steps): callers split by
// columns, and for many rows unpack panels of Δ (UnpackDeltaCpu) and multiply with MatMulCpu.
absl::Status DeltaMatMulCpu(const DeltaMatMulParams& p);

// For tests and benchmarks: restricts DeltaMatMulCpu's dot products to one instruction set
// ("scalar", "avx2"; anything else: the best available). False, changing nothing, when the CPU
// lacks it.
bool SetDeltaCpuIsaForTesting(absl::string_view isa);

}  // namespace strata

#endif  // STRATA_KERNELS_DELTA_H_
