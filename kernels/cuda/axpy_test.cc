// Differential test of AxpyCuda against the CPU reference, over a sweep of sizes and scales, on
// fresh random inputs with the device output poisoned before each run. Needs a GPU: tagged "gpu";
// skipped where the build has no CUDA or the machine has no usable device.
#include "kernels/axpy.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"

#ifdef STRATA_HAVE_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace strata {
namespace {

#ifdef STRATA_HAVE_CUDA

class AxpyCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> devices = CudaDeviceCount();
    if (!devices.ok()) GTEST_SKIP() << "no usable GPU: " << devices.status();
  }
};

TEST_F(AxpyCudaTest, MatchesCpuReferenceOverSizesAndScales) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-100.0f, 100.0f);
  absl::StatusOr<CudaStream> stream = CudaStream::Create();
  ASSERT_TRUE(stream.ok()) << stream.status();

  // Sizes around the block size, and one past the grid cap so that threads loop.
  for (int64_t n : {int64_t{1}, int64_t{31}, int64_t{256}, int64_t{257}, int64_t{100003},
                    int64_t{4096} * 256 * 3 + 17}) {
    for (float alpha : {0.0f, 1.0f, -2.5f, 1e-3f}) {
      SCOPED_TRACE(::testing::Message() << "n " << n << " alpha " << alpha);
      std::vector<float> x(n), y(n), want(n), got(n);
      for (int64_t i = 0; i < n; ++i) {
        x[i] = dist(rng);
        y[i] = dist(rng);
      }
      ASSERT_TRUE(AxpyCpu({n, alpha, x.data(), y.data(), want.data()}).ok());

      const size_t bytes = n * sizeof(float);
      auto dx = DeviceBuffer::Allocate(bytes);
      auto dy = DeviceBuffer::Allocate(bytes);
      auto dout = DeviceBuffer::Allocate(bytes);
      ASSERT_TRUE(dx.ok() && dy.ok() && dout.ok());
      ASSERT_TRUE(dx->CopyFromHost(x.data(), bytes).ok());
      ASSERT_TRUE(dy->CopyFromHost(y.data(), bytes).ok());
      ASSERT_TRUE(dout->Fill(0xFF).ok());  // NaN everywhere: any element not written fails

      ASSERT_TRUE(AxpyCuda({n, alpha, dx->as<float>(), dy->as<float>(), dout->as<float>()},
                           stream->handle())
                      .ok());
      ASSERT_TRUE(stream->Synchronize().ok());
      ASSERT_TRUE(dout->CopyToHost(got.data(), bytes).ok());

      // The GPU fuses multiply and add (one rounding instead of two): within one ulp of the
      // product.
      int64_t bad = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float tol = std::ldexp(std::fabs(alpha * x[i]) + std::fabs(y[i]), -23);
        if (!(std::fabs(got[i] - want[i]) <= tol)) {
          if (++bad <= 5) ADD_FAILURE() << "i " << i << " got " << got[i] << " want " << want[i];
        }
      }
      EXPECT_EQ(bad, 0);
    }
  }
}

TEST_F(AxpyCudaTest, InPlaceAndEmpty) {
  const std::vector<float> x = {1, 2, 3};
  std::vector<float> y = {10, 20, 30};
  auto dx = DeviceBuffer::Allocate(12);
  auto dy = DeviceBuffer::Allocate(12);
  ASSERT_TRUE(dx.ok() && dy.ok());
  ASSERT_TRUE(dx->CopyFromHost(x.data(), 12).ok());
  ASSERT_TRUE(dy->CopyFromHost(y.data(), 12).ok());
  ASSERT_TRUE(AxpyCuda({3, 2.0f, dx->as<float>(), dy->as<float>(), dy->as<float>()}, nullptr).ok());
  ASSERT_TRUE(dy->CopyToHost(y.data(), 12).ok());  // synchronous on the default stream
  EXPECT_EQ(y, (std::vector<float>{12, 24, 36}));
  EXPECT_TRUE(AxpyCuda({0, 1.0f, nullptr, nullptr, nullptr}, nullptr).ok());
}

TEST_F(AxpyCudaTest, HostPointersAreRejected) {
  std::vector<float> host(4);
  auto d = DeviceBuffer::Allocate(16);
  ASSERT_TRUE(d.ok());
  const absl::Status s = AxpyCuda({4, 1.0f, host.data(), d->as<float>(), d->as<float>()}, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("x is not device memory"), absl::string_view::npos);
}

#else  // !STRATA_HAVE_CUDA

TEST(AxpyCudaTest, SkippedWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace strata
