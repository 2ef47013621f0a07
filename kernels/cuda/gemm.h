// GEMMs of every linear layer on the GPU, through cuBLASLt: y = x · Wᵀ (+ bias), W stored as
// Hugging Face stores it, [out_features, in_features] row-major, activations row-major. Operands
// are f32, f16 or bf16 with f32 accumulation (f32 operands compute in full f32, no TF32, so that
// the GPU can be checked against the CPU exactly enough). The matmul descriptors and the
// heuristic's algorithm are cached per shape, so a call allocates nothing and can be captured in a
// CUDA graph.
#ifndef STRATA_KERNELS_CUDA_GEMM_H_
#define STRATA_KERNELS_CUDA_GEMM_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/ops_kernel.h"
#include "kernels/stream.h"

namespace strata {

struct GemmArgs {
  int64_t m = 0;            // rows of x and y (tokens)
  int64_t n = 0;            // out_features
  int64_t k = 0;            // in_features
  const void* x = nullptr;  // [m, k], row stride ldx (0: k), device, act
  int64_t ldx = 0;
  const void* w = nullptr;     // [n, k] row-major, device, act
  const void* bias = nullptr;  // [n], device, out_type; may be null
  void* y = nullptr;           // [m, n], row stride ldy (0: n), device, out_type
  int64_t ldy = 0;
  gpu::ActType act = gpu::ActType::kBF16;
  gpu::ActType out_type = gpu::ActType::kBF16;
  // Where the GEMV kernel takes it: gpu::GemvArgs::l2_prefetch (a cache hint).
  bool gemv_l2_prefetch = false;
  // False: cuBLASLt whatever set_small_m_gemv says (a projection measured without the GEMV).
  bool allow_gemv = true;
  // The GEMV for rows longer than kGemvMaxK too (down_proj's, measured against cuBLASLt's split-K).
  bool gemv_long_rows = false;
};

class CublasLtGemm {
 public:
  // workspace_bytes of device memory for cuBLASLt's split-K and stream-K algorithms.
  static absl::StatusOr<std::unique_ptr<CublasLtGemm>> Create(size_t workspace_bytes = 32 << 20);
  ~CublasLtGemm();
  CublasLtGemm(const CublasLtGemm&) = delete;
  CublasLtGemm& operator=(const CublasLtGemm&) = delete;

  // INVALID_ARGUMENT for bad shapes or null pointers; INTERNAL when cuBLASLt finds no algorithm or
  // fails.
  absl::Status Run(const GemmArgs& a, CudaStreamHandle stream);

  // Route m <= gemv_max_m (decode; 8 unless set lower) with k <= kGemvMaxK to Strata's own GEMV
  // kernel (gpu::LaunchGemv) instead of cuBLASLt, where its alignment rules hold. Off by default.
  // The GEMV kernel wins for k up to 8192 (measured on an H200 for Llama-3-8B's projections);
  // cuBLASLt's split-K is faster for the long rows of down_proj (k = 14336).
  static constexpr int64_t kGemvMaxK = 8192;
  void set_small_m_gemv(bool on);
  bool small_m_gemv() const;
  // Whether Run routes an m x k product (allow_gemv, k within kGemvMaxK unless `long_rows`) to the
  // GEMV, alignment aside: for callers that launch the GEMV's fused forms themselves on the same
  // rule.
  bool RoutesToGemv(int64_t m, int64_t k, bool long_rows = false) const;
  void set_gemv_max_m(int64_t m);  // clamped to [0, 8], the kernel's limit
  // The GEMV kernel's variant (gpu::GemvArgs::variant; 0 unless set).
  void set_gemv_variant(int variant);

 private:
  struct Impl;
  explicit CublasLtGemm(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata

#endif  // STRATA_KERNELS_CUDA_GEMM_H_
