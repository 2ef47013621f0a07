#include "kernels/kv_block_copy.h"

#include <cstdint>

namespace strata {

absl::Status ValidateKvBlockCopy(const KvBlockCopyParams& p) {
  if (p.num_blocks < 0) return absl::InvalidArgumentError("kv_block_copy: num_blocks must be >= 0");
  if (p.num_segments <= 0) {
    return absl::InvalidArgumentError("kv_block_copy: num_segments must be positive");
  }
  if (p.segment_bytes <= 0 || p.segment_bytes % 16 != 0) {
    return absl::InvalidArgumentError(
        "kv_block_copy: segment_bytes must be a positive multiple of 16");
  }
  if (p.cache_blocks <= 0) {
    return absl::InvalidArgumentError("kv_block_copy: cache_blocks must be positive");
  }
  if (p.num_blocks == 0) return absl::OkStatus();
  if (p.segments == nullptr) return absl::InvalidArgumentError("kv_block_copy: segments is null");
  if (p.block_ids == nullptr) {
    return absl::InvalidArgumentError("kv_block_copy: block_ids is null");
  }
  if (p.packed == nullptr) return absl::InvalidArgumentError("kv_block_copy: packed is null");
  if (reinterpret_cast<uintptr_t>(p.packed) % 16 != 0) {
    return absl::InvalidArgumentError("kv_block_copy: packed is not 16-byte aligned");
  }
  return absl::OkStatus();
}

}  // namespace strata
