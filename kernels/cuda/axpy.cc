#include "kernels/axpy.h"

#include "kernels/cuda/axpy_kernel.h"
#include "kernels/cuda/runtime.h"

namespace strata {

absl::Status AxpyCuda(const AxpyParams& p, CudaStreamHandle stream) {
  if (absl::Status s = ValidateAxpy(p); !s.ok()) return s;
  if (p.n == 0) return absl::OkStatus();
  if (!IsDeviceMemory(p.x)) return absl::InvalidArgumentError("axpy: x is not device memory");
  if (!IsDeviceMemory(p.y)) return absl::InvalidArgumentError("axpy: y is not device memory");
  if (!IsDeviceMemory(p.out)) return absl::InvalidArgumentError("axpy: out is not device memory");
  return CudaStatus(LaunchAxpyKernel(p.n, p.alpha, p.x, p.y, p.out, stream), "axpy launch");
}

}  // namespace strata
