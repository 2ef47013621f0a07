// The launcher of the kv_block_copy CUDA kernel, kept free of Abseil so that nvcc compiles only
// CUDA code. Called by KvBlockCopyCuda (kernels/cuda/kv_block_copy.cc), which validates the
// parameters.
#ifndef STRATA_KERNELS_CUDA_KV_BLOCK_COPY_KERNEL_H_
#define STRATA_KERNELS_CUDA_KV_BLOCK_COPY_KERNEL_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace strata {

// For each i < num_blocks and s < num_segments, copies segment_bytes (a multiple of 16) between
// segments[s] + block_ids[i] * segment_bytes and packed + (i * num_segments + s) * segment_bytes;
// gather: cache -> packed, otherwise packed -> cache. segments: [num_segments] device pointers,
// device; block_ids: [num_blocks] int32, device; packed: device, 16-byte aligned. Ids outside
// [0, cache_blocks) are skipped. Returns the launch error, if any.
cudaError_t LaunchKvBlockCopyKernel(bool gather, int64_t num_segments, int64_t segment_bytes,
                                    int64_t cache_blocks, int64_t num_blocks, void* const* segments,
                                    const int32_t* block_ids, void* packed, cudaStream_t stream);

}  // namespace strata

#endif  // STRATA_KERNELS_CUDA_KV_BLOCK_COPY_KERNEL_H_
