// The Strata version that binaries and servers report.
#ifndef STRATA_COMMON_VERSION_H_
#define STRATA_COMMON_VERSION_H_

namespace strata {

inline constexpr char kStrataVersion[] = "0.1.0-dev";

}  // namespace strata

#endif  // STRATA_COMMON_VERSION_H_
