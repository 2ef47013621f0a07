// axpy: out = alpha * x + y, elementwise over float32 vectors. The trivial op that proves the
// kernel path end to end: a host-only header, a CPU reference (kernels/cpu/axpy.cc), a CUDA kernel
// (kernels/cuda/axpy.cu) and a differential test of one against the other.
#ifndef STRATA_KERNELS_AXPY_H_
#define STRATA_KERNELS_AXPY_H_

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/stream.h"

namespace strata {

struct AxpyParams {
  // Elements in x, y and out; >= 0.
  int64_t n = 0;
  float alpha = 1.0f;
  // [n], float32; host memory for AxpyCpu, device memory for AxpyCuda.
  const float* x = nullptr;
  // [n], float32; same memory space as x.
  const float* y = nullptr;
  // [n], float32; same memory space as x. May alias y (in-place y += alpha * x), must not partially
  // overlap x or y.
  float* out = nullptr;
};

// Checks the parameters shared by every implementation: INVALID_ARGUMENT naming the field.
absl::Status ValidateAxpy(const AxpyParams& p);

// The CPU reference.
absl::Status AxpyCpu(const AxpyParams& p);

// Enqueues the CUDA kernel on `stream`; returns once launched. Defined only where the build has
// CUDA (STRATA_HAVE_CUDA); the pointers must be device memory (INVALID_ARGUMENT otherwise).
absl::Status AxpyCuda(const AxpyParams& p, CudaStreamHandle stream);

}  // namespace strata

#endif  // STRATA_KERNELS_AXPY_H_
