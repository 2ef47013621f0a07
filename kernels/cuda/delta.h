// The CUDA twins of kernels/delta.h's ops: DeltaGemvCuda and DeltaMmaCuda (DeltaMatMulCpu for a
// tenant's few rows, on CUDA cores or, for f16 and bf16 activations, on tensor cores),
// UnpackDeltaCuda (UnpackDeltaCpu, to any activation type, for chosen rows) and AddRowsCuda (f32
// rows or a bias added to chosen rows).
// Each validates its arguments (INVALID_ARGUMENT naming the field) and launches asynchronously on
// `stream`; the argument structs are in kernels/cuda/delta_kernel.h. Many rows of one fine-tune
// are better served by unpacking panels of its delta for a cuBLASLt GEMM over the gathered rows,
// whose f32 product AddRowsCuda then adds back (the GPU runner does this).
#ifndef STRATA_KERNELS_CUDA_DELTA_H_
#define STRATA_KERNELS_CUDA_DELTA_H_

#include "absl/status/status.h"
#include "kernels/cuda/delta_kernel.h"
#include "kernels/delta.h"
#include "kernels/stream.h"

namespace strata {

// A PackedDelta whose buffers are in device memory, as the kernels' view.
gpu::DeltaView ToDeltaView(const PackedDelta& d);

absl::Status DeltaGemvCuda(const gpu::DeltaGemvArgs& a, CudaStreamHandle stream);
absl::Status DeltaMmaCuda(const gpu::DeltaGemvArgs& a, CudaStreamHandle stream);
absl::Status UnpackDeltaCuda(const gpu::UnpackDeltaArgs& a, CudaStreamHandle stream);
absl::Status AddRowsCuda(const gpu::AddRowsArgs& a, CudaStreamHandle stream);

}  // namespace strata

#endif  // STRATA_KERNELS_CUDA_DELTA_H_
