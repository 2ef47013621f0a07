// Tier: a level of the KV store, the same word everywhere in the tree (memtier, worker, routing).
#ifndef STRATA_COMMON_TIER_H_
#define STRATA_COMMON_TIER_H_

#include <cstdint>

namespace strata {

// Fastest first. kDevice is GPU HBM (host memory on a CPU-only worker), kHost pinned host RAM,
// kDisk NVMe slots.
enum class Tier : uint8_t { kDevice = 0, kHost = 1, kDisk = 2 };
inline constexpr int kNumTiers = 3;

inline const char* TierName(Tier tier) {
  switch (tier) {
    case Tier::kDevice:
      return "device";
    case Tier::kHost:
      return "host";
    case Tier::kDisk:
      return "disk";
  }
  return "unknown";
}

}  // namespace strata

#endif  // STRATA_COMMON_TIER_H_
