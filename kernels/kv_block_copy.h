// kv_block_copy: moves whole KV blocks between a paged KV cache and a packed buffer, the device
// side of a tier copy (memtier's device tier packs blocks before they go down to host memory and
// unpacks them when they come back).
//
// The cache is `num_segments` arrays, K and V of each layer on this rank, each [cache_blocks,
// segment_bytes]. A packed block is its segments back to back, [num_segments, segment_bytes], so a
// packed buffer of n blocks is [n, num_segments, segment_bytes]: exactly the raw payload of
// memtier's KvBlockLayout.
#ifndef STRATA_KERNELS_KV_BLOCK_COPY_H_
#define STRATA_KERNELS_KV_BLOCK_COPY_H_

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/stream.h"

namespace strata {

enum class KvBlockCopyDirection {
  kGather,   // cache -> packed
  kScatter,  // packed -> cache
};

struct KvBlockCopyParams {
  KvBlockCopyDirection direction = KvBlockCopyDirection::kGather;
  // Segments (K and V per layer) and the bytes of one block in one segment; segment_bytes a
  // positive multiple of 16 (the CUDA kernel moves 16-byte words).
  int64_t num_segments = 0;
  int64_t segment_bytes = 0;
  // Blocks each segment array holds; every id in block_ids must be below it.
  int64_t cache_blocks = 0;
  // Blocks to move; >= 0.
  int64_t num_blocks = 0;
  // [num_segments] base pointers of the segment arrays, each [cache_blocks, segment_bytes]. The
  // array itself and what it points to: host memory for the CPU op, device memory for the CUDA op.
  void* const* segments = nullptr;
  // [num_blocks] int32 cache block ids; same memory space. Ids may repeat when gathering, must not
  // when scattering.
  const int32_t* block_ids = nullptr;
  // [num_blocks, num_segments, segment_bytes]; same memory space; 16-byte aligned.
  void* packed = nullptr;
};

// Checks the parameters every implementation shares: INVALID_ARGUMENT naming the field. Block ids
// are checked by the CPU op only (the CUDA op's ids live on the device).
absl::Status ValidateKvBlockCopy(const KvBlockCopyParams& p);

// The CPU reference (also the CPU engine's implementation).
absl::Status KvBlockCopyCpu(const KvBlockCopyParams& p);

// Enqueues the CUDA kernel on `stream`; returns once launched. Defined only where the build has
// CUDA (STRATA_HAVE_CUDA); `packed` and `segments` must be device memory (INVALID_ARGUMENT
// otherwise).
absl::Status KvBlockCopyCuda(const KvBlockCopyParams& p, CudaStreamHandle stream);

}  // namespace strata

#endif  // STRATA_KERNELS_KV_BLOCK_COPY_H_
