#include "kernels/kv_block_copy.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace strata {

absl::Status KvBlockCopyCpu(const KvBlockCopyParams& p) {
  if (absl::Status s = ValidateKvBlockCopy(p); !s.ok()) return s;
  for (int64_t i = 0; i < p.num_blocks; ++i) {
    if (p.block_ids[i] < 0 || p.block_ids[i] >= p.cache_blocks) {
      return absl::InvalidArgumentError(absl::StrCat("kv_block_copy: block_ids[", i,
                                                     "] = ", p.block_ids[i], " outside [0, ",
                                                     p.cache_blocks, ")"));
    }
  }
  auto* packed = static_cast<uint8_t*>(p.packed);
  for (int64_t i = 0; i < p.num_blocks; ++i) {
    const int64_t offset = static_cast<int64_t>(p.block_ids[i]) * p.segment_bytes;
    for (int64_t s = 0; s < p.num_segments; ++s) {
      uint8_t* cache = static_cast<uint8_t*>(p.segments[s]) + offset;
      uint8_t* pack = packed + (i * p.num_segments + s) * p.segment_bytes;
      if (p.direction == KvBlockCopyDirection::kGather) {
        std::memcpy(pack, cache, static_cast<size_t>(p.segment_bytes));
      } else {
        std::memcpy(cache, pack, static_cast<size_t>(p.segment_bytes));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace strata
