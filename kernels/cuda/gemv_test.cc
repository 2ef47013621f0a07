// Differential test of the small-m GEMV path of CublasLtGemm (set_small_m_gemv) against the CPU
// matmul and against cuBLASLt itself: m from 1 to 8, decode-sized and odd shapes, every activation
// type, with and without bias, act and f32 outputs, fresh random inputs rounded to the activation
// type first, poisoned outputs. Tolerances (relative L2 error): f32 1e-5, f16 2e-3, bf16 1e-2.
// Needs a GPU: tagged "gpu"; skipped where the build has no CUDA or the machine no device.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "kernels/matmul.h"

#ifdef STRATA_HAVE_CUDA
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/runtime.h"
#endif

namespace strata {
namespace {

#ifdef STRATA_HAVE_CUDA

using gpu::ActType;

float Round(float v, ActType t) {
  if (t == ActType::kBF16) return Bf16ToFloat(FloatToBf16(v));
  if (t == ActType::kF16) return F16ToFloat(FloatToF16(v));
  return v;
}

std::vector<uint8_t> Encode(const std::vector<float>& v, ActType t) {
  const int eb = gpu::ActBytes(t);
  std::vector<uint8_t> out(v.size() * eb);
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == ActType::kF32) {
      std::memcpy(&out[4 * i], &v[i], 4);
    } else {
      const uint16_t h = t == ActType::kBF16 ? FloatToBf16(v[i]) : FloatToF16(v[i]);
      std::memcpy(&out[2 * i], &h, 2);
    }
  }
  return out;
}

std::vector<float> Decode(const std::vector<uint8_t>& b, ActType t) {
  const int eb = gpu::ActBytes(t);
  std::vector<float> out(b.size() / eb);
  for (size_t i = 0; i < out.size(); ++i) {
    if (t == ActType::kF32) {
      std::memcpy(&out[i], &b[4 * i], 4);
    } else {
      uint16_t h;
      std::memcpy(&h, &b[2 * i], 2);
      out[i] = t == ActType::kBF16 ? Bf16ToFloat(h) : F16ToFloat(h);
    }
  }
  return out;
}

DeviceBuffer Upload(const std::vector<uint8_t>& bytes) {
  absl::StatusOr<DeviceBuffer> b = DeviceBuffer::Allocate(bytes.size());
  EXPECT_TRUE(b.ok()) << b.status();
  EXPECT_TRUE(b->CopyFromHost(bytes.data(), bytes.size()).ok());
  return *std::move(b);
}

class GemvTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> devices = CudaDeviceCount();
    if (!devices.ok()) GTEST_SKIP() << "no usable GPU: " << devices.status();
  }
};

TEST_F(GemvTest, MatchesCpuAndCublasLt) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto gemm = CublasLtGemm::Create();
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  absl::StatusOr<CudaStream> stream = CudaStream::Create();
  ASSERT_TRUE(stream.ok());
  struct Shape {
    int64_t n, k;
  };
  for (ActType act : {ActType::kF32, ActType::kF16, ActType::kBF16}) {
    const double tol = act == ActType::kF32 ? 1e-5 : act == ActType::kF16 ? 2e-3 : 1e-2;
    for (const Shape sh : {Shape{64, 32}, Shape{1000, 256}, Shape{4096, 4096}, Shape{333, 1032},
                           Shape{6144, 4096}, Shape{96, 8192}}) {
      // Drawn once per shape; each m uses the first m rows of x.
      std::vector<float> x_all(8 * sh.k), w(sh.n * sh.k), b_raw(sh.n);
      for (float& v : x_all) v = Round(normal(rng), act);
      for (float& v : w) v = Round(normal(rng) * 0.05f, act);
      for (float& v : b_raw) v = normal(rng);
      DeviceBuffer dw = Upload(Encode(w, act));
      for (int64_t m : {1, 2, 3, 5, 8}) {
        for (bool bias : {false, true}) {
          for (ActType out : {act, ActType::kF32}) {
            SCOPED_TRACE(::testing::Message()
                         << "act " << static_cast<int>(act) << " out " << static_cast<int>(out)
                         << " m " << m << " n " << sh.n << " k " << sh.k << " bias " << bias);
            const std::vector<float> x(x_all.begin(), x_all.begin() + m * sh.k);
            std::vector<float> b(sh.n);
            for (int64_t i = 0; i < sh.n; ++i) b[i] = Round(b_raw[i], out);
            // CPU reference in f32 on the rounded values.
            std::vector<float> want(m * sh.n);
            MatMulParams p;
            p.m = m;
            p.n = sh.n;
            p.k = sh.k;
            p.x = x.data();
            p.w = w.data();
            p.w_dtype = DType::kF32;
            p.bias = bias ? b.data() : nullptr;
            p.y = want.data();
            std::vector<char> ws(MatMulCpuWorkspaceBytes(p));
            ASSERT_TRUE(MatMulCpu(p, ws.data(), ws.size()).ok());
            DeviceBuffer dx = Upload(Encode(x, act)), db = Upload(Encode(b, out));
            const int64_t ldy = sh.n + 3;
            absl::StatusOr<DeviceBuffer> dy = DeviceBuffer::Allocate(m * ldy * gpu::ActBytes(out));
            ASSERT_TRUE(dy.ok());
            std::vector<float> got_by[5];
            for (int mode : {0, 1, 2, 3, 4}) {  // GEMV variants 0 to 3, cuBLASLt
              const bool gemv = mode < 4;
              (*gemm)->set_small_m_gemv(gemv);
              (*gemm)->set_gemv_variant(mode);
              ASSERT_TRUE(dy->Fill(0xff).ok());  // NaN in every float type
              GemmArgs g{
                  m,          sh.n, sh.k, dx.data(), 0, dw.data(), bias ? db.data() : nullptr,
                  dy->data(), ldy,  act,  out};
              ASSERT_TRUE((*gemm)->Run(g, stream->handle()).ok());
              ASSERT_TRUE(stream->Synchronize().ok());
              std::vector<uint8_t> raw(m * ldy * gpu::ActBytes(out));
              ASSERT_TRUE(dy->CopyToHost(raw.data(), raw.size()).ok());
              const std::vector<float> all = Decode(raw, out);
              std::vector<float>& got = got_by[mode];
              for (int64_t r = 0; r < m; ++r) {
                got.insert(got.end(), all.begin() + r * ldy, all.begin() + r * ldy + sh.n);
              }
              double num = 0, den = 0;
              for (size_t i = 0; i < want.size(); ++i) {
                ASSERT_TRUE(std::isfinite(got[i])) << "element " << i << " unwritten or NaN";
                num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
                den += double(want[i]) * want[i];
              }
              EXPECT_LT(std::sqrt(num / den), tol)
                  << (gemv ? "gemv variant " : "cublasLt ") << mode;
            }
          }
        }
      }
    }
  }
}

#else

TEST(GemvTest, NeedsCudaBuild) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace strata
