// matmul: y = x · Wᵀ (+ bias), the projection of every linear layer. W is stored as Hugging Face
// stores it, [out_features, in_features], in f32, bf16 or f16; activations are f32.
#ifndef STRATA_KERNELS_MATMUL_H_
#define STRATA_KERNELS_MATMUL_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "kernels/dtype.h"

namespace strata {

struct MatMulParams {
  int64_t m = 0;  // rows of x and y (tokens)
  int64_t n = 0;  // out_features
  int64_t k = 0;  // in_features
  // [m, k], host, f32, row-major.
  const float* x = nullptr;
  // [n, k], host, w_dtype (f32, bf16 or f16), row-major.
  const void* w = nullptr;
  DType w_dtype = DType::kF32;
  // [n], host, f32, or nullptr.
  const float* bias = nullptr;
  // [m, n], host, f32, row-major with row stride ldy (>= n; 0 means n). Must not overlap x or w.
  float* y = nullptr;
  int64_t ldy = 0;
  // Only output columns [n_begin, n_end) are computed (n_end 0 means n): callers split a projection
  // across threads by columns.
  int64_t n_begin = 0;
  int64_t n_end = 0;
};

// Small m (up to 8 rows, decode) runs a direct kernel that streams each weight row once and
// converts 16-bit weights in registers, chosen at run time for AVX-512, AVX2 (+FMA, F16C) or plain
// x86-64; larger m goes to the CPU BLAS. Either way one call is single-threaded unless the BLAS
// threads itself: callers split large problems by columns (n_begin / n_end).
//
// Rows up to which MatMulCpu takes the direct kernel. Each row's sums there are the same whatever
// the other rows (the BLAS's blocking may sum in another order).
inline constexpr int64_t kMatMulCpuGemvMaxRows = 8;

// Bytes of scratch memory MatMulCpu needs for these parameters.
size_t MatMulCpuWorkspaceBytes(const MatMulParams& p);

// For tests and benchmarks: restricts the direct kernel to one instruction set ("scalar", "avx2",
// "avx512"; anything else: the best available). False, changing nothing, when the CPU lacks it.
bool SetMatMulCpuIsaForTesting(absl::string_view isa);

// Threads the CPU BLAS may use inside one MatMulCpu call (process-wide). n <= 0 keeps the default.
void SetMatMulCpuThreads(int n);

// INVALID_ARGUMENT for bad shapes, a null pointer, an unsupported dtype or a small workspace.
absl::Status MatMulCpu(const MatMulParams& p, void* workspace, size_t workspace_bytes);

}  // namespace strata

#endif  // STRATA_KERNELS_MATMUL_H_
