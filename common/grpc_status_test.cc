#include "common/grpc_status.h"

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(GrpcStatusTest, EveryCanonicalCodeRoundTrips) {
  for (int code = 1; code <= 16; ++code) {
    const absl::Status a(static_cast<absl::StatusCode>(code), "field `model` is empty");
    const grpc::Status g = ToGrpcStatus(a);
    EXPECT_EQ(static_cast<int>(g.error_code()), code);
    EXPECT_EQ(g.error_message(), "field `model` is empty");
    EXPECT_EQ(FromGrpcStatus(g), a);
  }
}

TEST(GrpcStatusTest, OkIsOkBothWays) {
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok());
}

TEST(GrpcStatusTest, NamedCodesMatch) {
  EXPECT_EQ(ToGrpcStatus(absl::InvalidArgumentError("x")).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(ToGrpcStatus(absl::ResourceExhaustedError("x")).error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::UNAVAILABLE, "gone")).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::DATA_LOSS, "crc")).code(),
            absl::StatusCode::kDataLoss);
}

TEST(GrpcStatusTest, OutOfRangeCodesBecomeUnknown) {
  // grpc::StatusCode is an unscoped enum whose values fit in 5 bits: 20 is representable but not a
  // canonical code. absl::StatusCode has a fixed int underlying type, so any int is representable.
  const grpc::Status g(static_cast<grpc::StatusCode>(20), "odd");
  EXPECT_EQ(FromGrpcStatus(g).code(), absl::StatusCode::kUnknown);
  EXPECT_EQ(FromGrpcStatus(g).message(), "odd");
  const absl::Status a(static_cast<absl::StatusCode>(42), "odder");
  EXPECT_EQ(ToGrpcStatus(a).error_code(), grpc::StatusCode::UNKNOWN);
  EXPECT_EQ(ToGrpcStatus(a).error_message(), "odder");
}

}  // namespace
}  // namespace strata
