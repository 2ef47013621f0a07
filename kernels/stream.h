// The opaque CUDA stream handle, nameable by host code without CUDA headers. It is the same type as
// the runtime's cudaStream_t; nullptr is the legacy default stream.
#ifndef STRATA_KERNELS_STREAM_H_
#define STRATA_KERNELS_STREAM_H_

struct CUstream_st;

namespace strata {

using CudaStreamHandle = CUstream_st*;

}  // namespace strata

#endif  // STRATA_KERNELS_STREAM_H_
