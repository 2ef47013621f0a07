#include "kernels/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace strata {
namespace {

// Rows of W converted to f32 at a time for bf16/f16 weights.
constexpr int64_t kPanelRows = 64;

int64_t End(const MatMulParams& p) { return p.n_end == 0 ? p.n : p.n_end; }

// Converts rows [r0, r0 + rows) of a 16-bit W into f32.
void ConvertPanel(const MatMulParams& p, int64_t r0, int64_t rows, float* out) {
  const auto* w = static_cast<const uint16_t*>(p.w) + r0 * p.k;
  const int64_t count = rows * p.k;
  if (p.w_dtype == DType::kBF16) {
    for (int64_t i = 0; i < count; ++i) out[i] = Bf16ToFloat(w[i]);
  } else {
    for (int64_t i = 0; i < count; ++i) out[i] = F16ToFloat(w[i]);
  }
}

}  // namespace

void SetMatMulCpuThreads(int n) {
  if (n > 0) openblas_set_num_threads(n);
}

size_t MatMulCpuWorkspaceBytes(const MatMulParams& p) {
  if (p.w_dtype == DType::kF32) return 0;
  return static_cast<size_t>(kPanelRows * p.k) * sizeof(float);
}

absl::Status MatMulCpu(const MatMulParams& p, void* workspace, size_t workspace_bytes) {
  if (p.m < 0 || p.n <= 0 || p.k <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("matmul: bad shape m=", p.m, " n=", p.n, " k=", p.k));
  }
  const int64_t ldy = p.ldy == 0 ? p.n : p.ldy;
  const int64_t n_end = End(p);
  if (ldy < p.n) return absl::InvalidArgumentError("matmul: ldy < n");
  if (p.n_begin < 0 || n_end > p.n || p.n_begin > n_end) {
    return absl::InvalidArgumentError("matmul: bad column range");
  }
  if (p.m == 0 || p.n_begin == n_end) return absl::OkStatus();
  if (p.x == nullptr || p.w == nullptr || p.y == nullptr) {
    return absl::InvalidArgumentError("matmul: x, w and y must not be null");
  }
  if (p.w_dtype != DType::kF32 && p.w_dtype != DType::kBF16 && p.w_dtype != DType::kF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("matmul: unsupported weight dtype ", DTypeName(p.w_dtype)));
  }
  if (workspace_bytes < MatMulCpuWorkspaceBytes(p) || (workspace == nullptr && workspace_bytes)) {
    return absl::InvalidArgumentError("matmul: workspace too small");
  }
  const int64_t cols = n_end - p.n_begin;
  if (p.w_dtype == DType::kF32) {
    const float* w = static_cast<const float*>(p.w) + p.n_begin * p.k;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, p.m, cols, p.k, 1.0f, p.x, p.k, w, p.k,
                0.0f, p.y + p.n_begin, ldy);
  } else {
    float* panel = static_cast<float*>(workspace);
    for (int64_t r0 = p.n_begin; r0 < n_end; r0 += kPanelRows) {
      const int64_t rows = std::min(kPanelRows, n_end - r0);
      ConvertPanel(p, r0, rows, panel);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, p.m, rows, p.k, 1.0f, p.x, p.k, panel,
                  p.k, 0.0f, p.y + r0, ldy);
    }
  }
  if (p.bias != nullptr) {
    for (int64_t i = 0; i < p.m; ++i) {
      float* row = p.y + i * ldy;
      for (int64_t j = p.n_begin; j < n_end; ++j) row[j] += p.bias[j];
    }
  }
  return absl::OkStatus();
}

}  // namespace strata
