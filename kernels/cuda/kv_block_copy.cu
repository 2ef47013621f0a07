#include <algorithm>

#include "kernels/cuda/kv_block_copy_kernel.h"

namespace strata {
namespace {

constexpr int kThreadsPerBlock = 256;

// One CUDA block per (block, segment) pair, 16-byte words strided over its threads.
__global__ void KvBlockCopyKernel(bool gather, int64_t num_segments, int64_t words,
                                  int64_t cache_blocks, void* const* segments,
                                  const int32_t* block_ids, uint4* packed) {
  const int64_t i = blockIdx.x / num_segments;
  const int64_t s = blockIdx.x % num_segments;
  const int32_t id = block_ids[i];
  if (id < 0 || id >= cache_blocks) return;
  uint4* cache = static_cast<uint4*>(segments[s]) + static_cast<int64_t>(id) * words;
  uint4* pack = packed + (i * num_segments + s) * words;
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) {
    if (gather) {
      pack[w] = cache[w];
    } else {
      cache[w] = pack[w];
    }
  }
}

}  // namespace

cudaError_t LaunchKvBlockCopyKernel(bool gather, int64_t num_segments, int64_t segment_bytes,
                                    int64_t cache_blocks, int64_t num_blocks, void* const* segments,
                                    const int32_t* block_ids, void* packed, cudaStream_t stream) {
  const int64_t grid = num_blocks * num_segments;
  if (grid > 0x7fffffff) return cudaErrorInvalidValue;
  KvBlockCopyKernel<<<static_cast<unsigned>(grid), kThreadsPerBlock, 0, stream>>>(
      gather, num_segments, segment_bytes / 16, cache_blocks, segments, block_ids,
      static_cast<uint4*>(packed));
  return cudaGetLastError();
}

}  // namespace strata
