#include "memtier/block_tier.h"

#include "absl/strings/str_cat.h"

namespace strata {

absl::Status CheckSlotAccess(const BlockTier& tier, int64_t slot, size_t buffer_bytes) {
  if (slot < 0 || slot >= tier.num_slots()) {
    return absl::InvalidArgumentError(absl::StrCat(TierName(tier.tier()), " tier: slot ", slot,
                                                   " outside [0, ", tier.num_slots(), ")"));
  }
  if (static_cast<int64_t>(buffer_bytes) != tier.payload_bytes()) {
    return absl::InvalidArgumentError(absl::StrCat(TierName(tier.tier()), " tier: buffer of ",
                                                   buffer_bytes, " bytes; a block is ",
                                                   tier.payload_bytes()));
  }
  return absl::OkStatus();
}

}  // namespace strata
