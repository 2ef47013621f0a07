#include <algorithm>

#include "kernels/cuda/axpy_kernel.h"

namespace strata {
namespace {

constexpr int kThreadsPerBlock = 256;
// Enough blocks to fill any current GPU several times over; larger n loops within each thread.
constexpr int64_t kMaxBlocks = 4096;

__global__ void AxpyKernel(int64_t n, float alpha, const float* __restrict__ x, const float* y,
                           float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = alpha * x[i] + y[i];
  }
}

}  // namespace

cudaError_t LaunchAxpyKernel(int64_t n, float alpha, const float* x, const float* y, float* out,
                             cudaStream_t stream) {
  const int64_t blocks =
      std::min<int64_t>((n + kThreadsPerBlock - 1) / kThreadsPerBlock, kMaxBlocks);
  AxpyKernel<<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0, stream>>>(n, alpha, x, y, out);
  return cudaGetLastError();
}

}  // namespace strata
