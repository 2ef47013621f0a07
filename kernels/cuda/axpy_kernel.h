// The launcher of the axpy CUDA kernel, kept free of Abseil so that nvcc compiles only CUDA code.
// Called by AxpyCuda (kernels/cuda/axpy.cc), which validates the parameters first.
#ifndef STRATA_KERNELS_CUDA_AXPY_KERNEL_H_
#define STRATA_KERNELS_CUDA_AXPY_KERNEL_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace strata {

// out[i] = alpha * x[i] + y[i] for i in [0, n). x, y, out: [n], device, float32; n > 0.
// Returns the launch error, if any.
cudaError_t LaunchAxpyKernel(int64_t n, float alpha, const float* x, const float* y, float* out,
                             cudaStream_t stream);

}  // namespace strata

#endif  // STRATA_KERNELS_CUDA_AXPY_KERNEL_H_
