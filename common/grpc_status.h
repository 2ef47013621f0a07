// The one conversion between absl::Status (used by all of Strata's code) and grpc::Status (on the
// wire). Both use the canonical status codes, so codes map one to one; messages pass unchanged.
#ifndef STRATA_COMMON_GRPC_STATUS_H_
#define STRATA_COMMON_GRPC_STATUS_H_

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace strata {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace strata

#endif  // STRATA_COMMON_GRPC_STATUS_H_
