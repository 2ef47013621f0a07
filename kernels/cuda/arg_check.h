// Argument checks of the CUDA ops' host wrappers (kernels/cuda/ops.cc, delta.cc): a refusal is
// INVALID_ARGUMENT naming the op and what is wrong with which field, and a launch error becomes a
// Status naming the op.
#ifndef STRATA_KERNELS_CUDA_ARG_CHECK_H_
#define STRATA_KERNELS_CUDA_ARG_CHECK_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/runtime.h"

namespace strata::cuda_args {

inline absl::Status Bad(const char* op, const char* what) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", what));
}

inline absl::Status Launched(cudaError_t e, const char* op) {
  return CudaStatus(e, absl::StrCat(op, " launch"));
}

}  // namespace strata::cuda_args

// Returns Bad(op, what) from the enclosing function unless `cond` holds.
#define STRATA_REQUIRE(cond, op, what) \
  if (!(cond)) return ::strata::cuda_args::Bad(op, what)

#endif  // STRATA_KERNELS_CUDA_ARG_CHECK_H_
