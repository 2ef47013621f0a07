#include "kernels/kv_block_copy.h"

#include "kernels/cuda/kv_block_copy_kernel.h"
#include "kernels/cuda/runtime.h"

namespace strata {

absl::Status KvBlockCopyCuda(const KvBlockCopyParams& p, CudaStreamHandle stream) {
  if (absl::Status s = ValidateKvBlockCopy(p); !s.ok()) return s;
  if (p.num_blocks == 0) return absl::OkStatus();
  if (!IsDeviceMemory(p.packed)) {
    return absl::InvalidArgumentError("kv_block_copy: packed is not device memory");
  }
  if (!IsDeviceMemory(p.segments)) {
    return absl::InvalidArgumentError("kv_block_copy: segments is not device memory");
  }
  if (!IsDeviceMemory(p.block_ids)) {
    return absl::InvalidArgumentError("kv_block_copy: block_ids is not device memory");
  }
  return CudaStatus(
      LaunchKvBlockCopyKernel(p.direction == KvBlockCopyDirection::kGather, p.num_segments,
                              p.segment_bytes, p.cache_blocks, p.num_blocks, p.segments,
                              p.block_ids, p.packed, static_cast<cudaStream_t>(stream)),
      "kv_block_copy launch");
}

}  // namespace strata
