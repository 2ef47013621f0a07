// The CUDA delta kernels' decoding (the bit layout of every format), run on the host through
// DecodeDeltaUnitForTesting, against UnpackDeltaCpu: every unit of every row of random packed
// deltas of each format decodes to the CPU's values. Needs the CUDA toolkit at build time but no
// GPU, so it runs in CI; skipped in a build without CUDA.
#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/delta_test_util.h"
#include "kernels/delta.h"

#ifdef STRATA_HAVE_CUDA
#include "kernels/cuda/delta.h"
#endif

namespace strata {
namespace {

#ifdef STRATA_HAVE_CUDA

TEST(DeltaDecodeTest, KernelsDecodeWhatTheCpuUnpacks) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 0.01f);
  for (int bits : {2, 4, 8}) {
    for (bool sparse : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "bits " << bits << " sparse " << sparse);
      const int64_t rows = 9, cols = 136;
      std::vector<float> dense(rows * cols);
      for (float& v : dense) v = normal(rng);
      const delta_test::Packed p = delta_test::Pack(dense, rows, cols, bits, sparse);
      std::vector<float> want(rows * cols);
      ASSERT_TRUE(UnpackDeltaCpu(p.view, 0, rows, want.data(), /*accumulate=*/false).ok());
      const gpu::DeltaView view = ToDeltaView(p.view);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t u = 0; u < cols / 8; ++u) {
          float got[8];
          gpu::DecodeDeltaUnitForTesting(view, r, u, got);
          for (int i = 0; i < 8; ++i) {
            ASSERT_EQ(got[i] * p.scale[r], want[r * cols + u * 8 + i])
                << "row " << r << " column " << u * 8 + i;
          }
        }
      }
    }
  }
}

#else

TEST(DeltaDecodeTest, NeedsCudaBuild) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace strata
