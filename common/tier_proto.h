// Tier <-> strata.v1.Tier, for the worker's events and the coordinator's index.
#ifndef STRATA_COMMON_TIER_PROTO_H_
#define STRATA_COMMON_TIER_PROTO_H_

#include "common/tier.h"
#include "proto/strata/v1/common.pb.h"

namespace strata {

inline v1::Tier ToProtoTier(Tier t) {
  switch (t) {
    case Tier::kDevice:
      return v1::TIER_DEVICE;
    case Tier::kHost:
      return v1::TIER_HOST;
    case Tier::kDisk:
      return v1::TIER_DISK;
  }
  return v1::TIER_UNSPECIFIED;
}

// TIER_UNSPECIFIED (a sender that predates tiers) reads as the device tier.
inline Tier FromProtoTier(v1::Tier t) {
  switch (t) {
    case v1::TIER_HOST:
      return Tier::kHost;
    case v1::TIER_DISK:
      return Tier::kDisk;
    default:
      return Tier::kDevice;
  }
}

}  // namespace strata

#endif  // STRATA_COMMON_TIER_PROTO_H_
