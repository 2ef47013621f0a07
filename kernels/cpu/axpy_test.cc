#include "kernels/axpy.h"

#include <cmath>
#include <limits>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(AxpyCpuTest, ComputesAlphaXPlusY) {
  const std::vector<float> x = {1, 2, 3, -4};
  const std::vector<float> y = {10, 20, 30, 40};
  std::vector<float> out(4, std::numeric_limits<float>::quiet_NaN());
  ASSERT_TRUE(AxpyCpu({4, 0.5f, x.data(), y.data(), out.data()}).ok());
  EXPECT_EQ(out, (std::vector<float>{10.5f, 21, 31.5f, 38}));
}

TEST(AxpyCpuTest, InPlaceOnY) {
  const std::vector<float> x = {1, 1};
  std::vector<float> y = {2, 3};
  ASSERT_TRUE(AxpyCpu({2, 2.0f, x.data(), y.data(), y.data()}).ok());
  EXPECT_EQ(y, (std::vector<float>{4, 5}));
}

TEST(AxpyCpuTest, BadParamsNameTheField) {
  std::vector<float> v(8);
  const absl::Status negative = AxpyCpu({-1, 1.0f, v.data(), v.data(), v.data()});
  EXPECT_EQ(negative.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(negative.message().find("n must be"), absl::string_view::npos);
  EXPECT_NE(AxpyCpu({4, 1.0f, nullptr, v.data(), v.data()}).message().find("x is null"),
            absl::string_view::npos);
  EXPECT_NE(AxpyCpu({4, 1.0f, v.data(), v.data() + 4, v.data() + 2}).message().find("overlaps y"),
            absl::string_view::npos);
  EXPECT_NE(AxpyCpu({4, 1.0f, v.data(), v.data() + 4, v.data()}).message().find("overlaps x"),
            absl::string_view::npos);
  EXPECT_TRUE(AxpyCpu({0, 1.0f, nullptr, nullptr, nullptr}).ok());
}

}  // namespace
}  // namespace strata
