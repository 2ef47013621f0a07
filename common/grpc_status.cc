#include "common/grpc_status.h"

#include <string>

namespace strata {
namespace {

// Codes outside the canonical range (which neither side should produce) become UNKNOWN.
int CheckedCode(int code) { return code >= 0 && code <= 16 ? code : 2; }

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(CheckedCode(static_cast<int>(status.code()))),
                      std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(CheckedCode(status.error_code())),
                      status.error_message());
}

}  // namespace strata
