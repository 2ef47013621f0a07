// Differential test of the small-m GEMV path of CublasLtGemm (set_small_m_gemv) against the CPU
// matmul and against cuBLASLt itself: m from 1 to 8, decode-sized and odd shapes, every activation
// type, with and without bias, act and f32 outputs, fresh random inputs rounded to the activation
// type first, poisoned outputs. Tolerances (relative L2 error): f32 1e-5, f16 2e-3, bf16 1e-2. Also
// the GEMV's fused forms for decode (input RMSNorm over the f32 residual, accumulation into it,
// SiLU-mul of gate/up pairs: bit for bit the unfused GEMV followed by the SiLU-mul kernel; RoPE
// and the KV cache write in the q/k/v projection: bit for bit the GEMV, then the RoPE + KV kernel).
// Needs a GPU: tagged "gpu"; skipped where the build has no CUDA or the machine no device.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "kernels/matmul.h"

#ifdef STRATA_HAVE_CUDA
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"
#include "kernels/cuda/test_util.h"
#endif

namespace strata {
namespace {

#ifdef STRATA_HAVE_CUDA

using gpu::ActType;

using cuda_test::Decode;
using cuda_test::Encode;
using cuda_test::RoundTo;

DeviceBuffer Upload(const std::vector<uint8_t>& bytes) {
  absl::StatusOr<DeviceBuffer> b = cuda_test::UploadBytes(bytes.data(), bytes.size());
  EXPECT_TRUE(b.ok()) << b.status();
  return *std::move(b);
}

// y = x W^T + bias on the CPU in f32: x [m, k], w [n, k], bias [n] or null.
std::vector<float> CpuMatMul(const std::vector<float>& x, const std::vector<float>& w,
                             const float* bias, int64_t m, int64_t n, int64_t k) {
  std::vector<float> y(m * n);
  MatMulParams p;
  p.m = m;
  p.n = n;
  p.k = k;
  p.x = x.data();
  p.w = w.data();
  p.w_dtype = DType::kF32;
  p.bias = bias;
  p.y = y.data();
  std::vector<char> ws(MatMulCpuWorkspaceBytes(p));
  EXPECT_TRUE(MatMulCpu(p, ws.data(), ws.size()).ok());
  return y;
}

// Valid bf16 arguments over `d` (4096 bytes): m 1, n 8, k 64, y in its second half. Each refusal
// test breaks one thing at a time and ends by running the repaired arguments.
gpu::GemvArgs SmallArgs(DeviceBuffer& d) {
  gpu::GemvArgs a;
  a.m = 1;
  a.n = 8;
  a.k = 64;
  a.x = d.data();
  a.ldx = 64;
  a.w = d.data();
  a.y = static_cast<char*>(d.data()) + 2048;
  a.ldy = 8;
  a.act = a.out_type = ActType::kBF16;
  return a;
}

constexpr float kNormEps = 1e-5f;

// A dense [m, k] x [n, k]^T GEMV into y [m, n] (row strides k and n) in `act`; with `gain`, x is
// the f32 residual normalized by it (epsilon kNormEps).
gpu::GemvArgs DenseArgs(int64_t m, int64_t n, int64_t k, const void* x, const void* w, void* y,
                        ActType act, const float* gain) {
  gpu::GemvArgs g;
  g.m = m;
  g.n = n;
  g.k = k;
  g.x = x;
  g.ldx = k;
  g.w = w;
  g.y = y;
  g.ldy = n;
  g.act = g.out_type = act;
  g.norm_weight = gain;
  g.norm_eps = kNormEps;
  return g;
}

// Every test draws fresh inputs (its seed in each failure's trace) and runs on its own stream.
class GemvTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> devices = CudaDeviceCount();
    if (!devices.ok()) GTEST_SKIP() << "no usable GPU: " << devices.status();
    const uint32_t seed = std::random_device{}();
    rng.seed(seed);
    seed_trace.emplace(__FILE__, __LINE__, ::testing::Message() << "seed " << seed);
    absl::StatusOr<CudaStream> s = CudaStream::Create();
    ASSERT_TRUE(s.ok()) << s.status();
    stream.emplace(*std::move(s));
  }

  std::mt19937 rng;
  std::normal_distribution<float> normal{0.0f, 1.0f};
  std::optional<::testing::ScopedTrace> seed_trace;
  std::optional<CudaStream> stream;
};

TEST_F(GemvTest, MatchesCpuAndCublasLt) {
  auto gemm = CublasLtGemm::Create();
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  struct Shape {
    int64_t n, k;
  };
  for (ActType act : {ActType::kF32, ActType::kF16, ActType::kBF16}) {
    const double tol = act == ActType::kF32 ? 1e-5 : act == ActType::kF16 ? 2e-3 : 1e-2;
    for (const Shape sh : {Shape{64, 32}, Shape{1000, 256}, Shape{4096, 4096}, Shape{333, 1032},
                           Shape{6144, 4096}, Shape{96, 8192}}) {
      // Drawn once per shape; each m uses the first m rows of x.
      std::vector<float> x_all(8 * sh.k), w(sh.n * sh.k), b_raw(sh.n);
      for (float& v : x_all) v = RoundTo(act, normal(rng));
      for (float& v : w) v = RoundTo(act, normal(rng) * 0.05f);
      for (float& v : b_raw) v = normal(rng);
      DeviceBuffer dw = Upload(Encode(act, w));
      for (int64_t m : {1, 2, 3, 5, 8}) {
        for (bool bias : {false, true}) {
          for (ActType out : {act, ActType::kF32}) {
            SCOPED_TRACE(::testing::Message()
                         << "act " << static_cast<int>(act) << " out " << static_cast<int>(out)
                         << " m " << m << " n " << sh.n << " k " << sh.k << " bias " << bias);
            const std::vector<float> x(x_all.begin(), x_all.begin() + m * sh.k);
            std::vector<float> b(sh.n);
            for (int64_t i = 0; i < sh.n; ++i) b[i] = RoundTo(out, b_raw[i]);
            // CPU reference in f32 on the rounded values.
            const std::vector<float> want =
                CpuMatMul(x, w, bias ? b.data() : nullptr, m, sh.n, sh.k);
            DeviceBuffer dx = Upload(Encode(act, x)), db = Upload(Encode(out, b));
            const int64_t ldy = sh.n + 3;
            absl::StatusOr<DeviceBuffer> dy = DeviceBuffer::Allocate(m * ldy * gpu::ActBytes(out));
            ASSERT_TRUE(dy.ok());
            // Every GEMV variant, cuBLASLt, variant 1 with the L2 prefetch, then the GEMV
            // routed but the call refusing it (GemmArgs::allow_gemv).
            constexpr int kVariants = gpu::kGemvVariants, kCublas = kVariants,
                          kPrefetch = kVariants + 1, kRefused = kVariants + 2;
            std::vector<float> got_by[kRefused + 1];
            for (int mode = 0; mode <= kRefused; ++mode) {
              const bool gemv = mode != kCublas && mode != kRefused;
              (*gemm)->set_small_m_gemv(mode != kCublas);
              (*gemm)->set_gemv_variant(mode < kVariants ? mode : 1);
              ASSERT_TRUE(dy->Fill(0xff).ok());  // NaN in every float type
              GemmArgs g{m,
                         sh.n,
                         sh.k,
                         dx.data(),
                         0,
                         dw.data(),
                         bias ? db.data() : nullptr,
                         dy->data(),
                         ldy,
                         act,
                         out,
                         mode == kPrefetch,
                         mode != kRefused};
              ASSERT_TRUE((*gemm)->Run(g, stream->handle()).ok());
              ASSERT_TRUE(stream->Synchronize().ok());
              std::vector<uint8_t> raw(m * ldy * gpu::ActBytes(out));
              ASSERT_TRUE(dy->CopyToHost(raw.data(), raw.size()).ok());
              const std::vector<float> all = Decode(out, raw);
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
            // Every shape has each lane sum the same vectors of a row in the same order (lane,
            // lane + 32, ...), two-stage or not: the same bits. The prefetch is a cache hint:
            // the same bits as without it. A call refusing the GEMV runs cuBLASLt's product,
            // bit for bit.
            for (int v = 1; v < kVariants; ++v) {
              EXPECT_EQ(got_by[v], got_by[0]) << "gemv variant " << v << " against 0";
            }
            EXPECT_EQ(got_by[kPrefetch], got_by[1]);
            EXPECT_EQ(got_by[kRefused], got_by[kCublas]);
          }
        }
      }
    }
  }
}

// The fused forms a decode step uses: the input RMS-normalized from the f32 residual as it is
// read (GemvArgs::norm_weight), and the output added into an f32 residual (accumulate), each
// alone and both, against the same computation on the CPU in f32 (the norm in double).
TEST_F(GemvTest, NormalizedInputAndAccumulatedOutputMatchCpu) {
  struct Shape {
    int64_t n, k;
  };
  const float eps = kNormEps;
  for (ActType act : {ActType::kF32, ActType::kF16, ActType::kBF16}) {
    const double tol = act == ActType::kF32 ? 1e-5 : act == ActType::kF16 ? 2e-3 : 1e-2;
    for (const Shape sh : {Shape{64, 32}, Shape{1000, 256}, Shape{333, 1032}, Shape{6144, 4096},
                           Shape{4096, 14336}}) {
      std::vector<float> w(sh.n * sh.k), resid(8 * sh.k), gain(sh.k), y0(8 * sh.n);
      for (float& v : w) v = RoundTo(act, normal(rng) * 0.05f);
      for (float& v : resid) v = normal(rng) * 3.0f;  // f32: the residual stream is never rounded
      // Row 4's mean square (about 1e-5) is near eps, so a wrong eps shows.
      for (int64_t i = 0; i < sh.k; ++i) resid[4 * sh.k + i] *= 1e-3f;
      for (float& v : gain) v = 1.0f + 0.2f * normal(rng);
      for (float& v : y0) v = normal(rng);
      std::vector<float> b_raw(sh.n);
      for (float& v : b_raw) v = normal(rng);
      DeviceBuffer dw = Upload(Encode(act, w)), dgain = Upload(Encode(ActType::kF32, gain));
      for (int64_t m : {1, 2, 3, 5, 8}) {
        for (const auto& [norm, accumulate] :
             {std::pair{true, false}, std::pair{false, true}, std::pair{true, true}}) {
          // A bias with the normalized input (qkv's, in the out type).
          const bool with_bias = norm && !accumulate;
          SCOPED_TRACE(::testing::Message()
                       << "act " << static_cast<int>(act) << " m " << m << " n " << sh.n << " k "
                       << sh.k << " norm " << norm << " accumulate " << accumulate);
          // The input as the kernel sees it: the normalized residual, or x rounded to act.
          std::vector<float> x(m * sh.k);
          for (int64_t r = 0; r < m; ++r) {
            double sq = 0;
            for (int64_t i = 0; i < sh.k; ++i)
              sq += double(resid[r * sh.k + i]) * resid[r * sh.k + i];
            const double inv = 1.0 / std::sqrt(sq / sh.k + eps);
            for (int64_t i = 0; i < sh.k; ++i) {
              const float v = resid[r * sh.k + i];
              x[r * sh.k + i] = norm ? static_cast<float>(v * inv * gain[i]) : RoundTo(act, v);
            }
          }
          const ActType out = accumulate ? ActType::kF32 : act;
          std::vector<float> b(sh.n);
          for (int64_t i = 0; i < sh.n; ++i) b[i] = RoundTo(out, b_raw[i]);
          std::vector<float> want = CpuMatMul(x, w, with_bias ? b.data() : nullptr, m, sh.n, sh.k);
          if (accumulate) {
            for (size_t i = 0; i < want.size(); ++i) want[i] += y0[i];
          }
          const std::vector<float> x_in(resid.begin(), resid.begin() + m * sh.k);
          DeviceBuffer dx = Upload(Encode(norm ? ActType::kF32 : act, norm ? x_in : x));
          DeviceBuffer db = Upload(Encode(out, b));
          DeviceBuffer dy =
              Upload(accumulate ? Encode(ActType::kF32,
                                         std::vector<float>(y0.begin(), y0.begin() + m * sh.n))
                                : std::vector<uint8_t>(m * sh.n * gpu::ActBytes(out), 0xff));
          gpu::GemvArgs g = DenseArgs(m, sh.n, sh.k, dx.data(), dw.data(), dy.data(), act,
                                      norm ? dgain.as<float>() : nullptr);
          g.bias = with_bias ? db.data() : nullptr;
          g.out_type = out;
          g.accumulate = accumulate;
          ASSERT_TRUE(GemvCuda(g, stream->handle()).ok());
          ASSERT_TRUE(stream->Synchronize().ok());
          std::vector<uint8_t> raw(m * sh.n * gpu::ActBytes(out));
          ASSERT_TRUE(dy.CopyToHost(raw.data(), raw.size()).ok());
          const std::vector<float> got = Decode(out, raw);
          double num = 0, den = 0;
          for (size_t i = 0; i < want.size(); ++i) {
            ASSERT_TRUE(std::isfinite(got[i])) << "element " << i << " unwritten or NaN";
            num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
            den += double(want[i]) * want[i];
          }
          EXPECT_LT(std::sqrt(num / den), tol);
          // Element by element too: an output left at its starting value (accumulate) shows.
          const double rms = std::sqrt(den / want.size());
          int64_t bad = 0;
          for (size_t i = 0; i < want.size(); ++i) {
            if (std::fabs(double(got[i]) - want[i]) > 8 * tol * (std::fabs(want[i]) + rms)) ++bad;
          }
          EXPECT_EQ(bad, 0) << "elements off by more than 8x the tolerance";
        }
      }
    }
  }
  // Refused: accumulating into a non-f32 output, a misaligned norm weight, y aliasing x, a row
  // stride below k.
  DeviceBuffer d = Upload(std::vector<uint8_t>(4096, 0));
  gpu::GemvArgs bad = SmallArgs(d);
  bad.accumulate = true;
  EXPECT_TRUE(absl::IsInvalidArgument(GemvCuda(bad, stream->handle())));
  bad.accumulate = false;
  bad.norm_weight = reinterpret_cast<const float*>(static_cast<char*>(d.data()) + 4);
  EXPECT_TRUE(absl::IsInvalidArgument(GemvCuda(bad, stream->handle())));
  bad.norm_weight = nullptr;
  bad.out_type = ActType::kF32;
  bad.accumulate = true;
  bad.y = d.data();
  EXPECT_TRUE(absl::IsInvalidArgument(GemvCuda(bad, stream->handle())));
  bad.accumulate = false;
  bad.y = static_cast<char*>(d.data()) + 2048;
  bad.ldx = 32;
  EXPECT_TRUE(absl::IsInvalidArgument(GemvCuda(bad, stream->handle())));
  bad.ldx = 64;
  EXPECT_TRUE(GemvCuda(bad, stream->handle()).ok());  // the same arguments, fixed, run
  ASSERT_TRUE(stream->Synchronize().ok());
}

// The gate/up GEMV with SiLU-mul folded in writes exactly the bytes that the plain GEMV followed
// by the SiLU-mul kernel does (the same sums, rounded the same way), with and without the input
// norm, for every activation type and m.
TEST_F(GemvTest, SiluPairsEqualGemvThenSiluMul) {
  struct Shape {
    int64_t half, k;  // n = 2 * half rows of W
  };
  for (ActType act : {ActType::kF32, ActType::kF16, ActType::kBF16}) {
    const int64_t eb = gpu::ActBytes(act);
    // 333 pairs leave the last block with idle warps.
    for (const Shape sh : {Shape{64, 32}, Shape{333, 1032}, Shape{1000, 256}, Shape{14336, 4096}}) {
      const int64_t n = 2 * sh.half;
      std::vector<float> w(n * sh.k), x(8 * sh.k), resid(8 * sh.k), gain(sh.k);
      for (float& v : w) v = RoundTo(act, normal(rng) * 0.05f);
      for (float& v : x) v = RoundTo(act, normal(rng));
      for (float& v : resid) v = normal(rng) * 3.0f;
      for (float& v : gain) v = 1.0f + 0.2f * normal(rng);
      DeviceBuffer dw = Upload(Encode(act, w)), dx = Upload(Encode(act, x)),
                   dres = Upload(Encode(ActType::kF32, resid)),
                   dgain = Upload(Encode(ActType::kF32, gain));
      for (int64_t m : {1, 2, 3, 5, 8}) {
        for (const bool norm : {false, true}) {
          SCOPED_TRACE(::testing::Message()
                       << "act " << static_cast<int>(act) << " m " << m << " half " << sh.half
                       << " k " << sh.k << " norm " << norm);
          DeviceBuffer full = Upload(std::vector<uint8_t>(m * n * eb, 0xff));
          // The output with a row stride past its row, whose padding must stay poisoned.
          const int64_t ldy = sh.half + 8;
          DeviceBuffer want = Upload(std::vector<uint8_t>(m * sh.half * eb, 0xff));
          DeviceBuffer got = Upload(std::vector<uint8_t>(m * ldy * eb, 0xff));
          gpu::GemvArgs g = DenseArgs(m, n, sh.k, norm ? dres.data() : dx.data(), dw.data(),
                                      full.data(), act, norm ? dgain.as<float>() : nullptr);
          ASSERT_TRUE(GemvCuda(g, stream->handle()).ok());
          ASSERT_TRUE(
              SiluMulCuda({m, sh.half, full.data(), want.data(), act}, stream->handle()).ok());
          g.y = got.data();
          g.ldy = ldy;
          g.silu_pairs = true;
          ASSERT_TRUE(GemvCuda(g, stream->handle()).ok());
          ASSERT_TRUE(stream->Synchronize().ok());
          std::vector<uint8_t> want_bytes(m * sh.half * eb), padded(m * ldy * eb);
          std::vector<uint8_t> got_bytes;
          ASSERT_TRUE(want.CopyToHost(want_bytes.data(), want_bytes.size()).ok());
          ASSERT_TRUE(got.CopyToHost(padded.data(), padded.size()).ok());
          for (int64_t r = 0; r < m; ++r) {
            const uint8_t* row = padded.data() + r * ldy * eb;
            got_bytes.insert(got_bytes.end(), row, row + sh.half * eb);
            EXPECT_TRUE(std::all_of(row + sh.half * eb, row + ldy * eb,
                                    [](uint8_t b) { return b == 0xff; }))
                << "row " << r << ": padding written";
          }
          const std::vector<float> wf = Decode(act, want_bytes), gf = Decode(act, got_bytes);
          int64_t differ = 0, first = -1;
          for (size_t i = 0; i < wf.size(); ++i) {
            ASSERT_TRUE(std::isfinite(wf[i])) << "reference element " << i << " not finite";
            if (std::memcmp(&want_bytes[i * eb], &got_bytes[i * eb], eb) != 0 && differ++ == 0) {
              first = static_cast<int64_t>(i);
            }
          }
          EXPECT_EQ(differ, 0) << "first at " << first << ": " << (first >= 0 ? gf[first] : 0.0f)
                               << " against " << (first >= 0 ? wf[first] : 0.0f);
        }
      }
    }
  }
  // Refused: an odd row count, a bias, accumulation, an output type other than act.
  DeviceBuffer d = Upload(std::vector<uint8_t>(4096, 0));
  gpu::GemvArgs bad = SmallArgs(d);
  bad.ldy = 4;
  bad.silu_pairs = true;
  bad.n = 7;
  EXPECT_TRUE(absl::IsInvalidArgument(GemvCuda(bad, stream->handle())));
  bad.n = 8;
  bad.bias = d.data();
  EXPECT_TRUE(absl::IsInvalidArgument(GemvCuda(bad, stream->handle())));
  bad.bias = nullptr;
  bad.out_type = ActType::kF32;
  EXPECT_TRUE(absl::IsInvalidArgument(GemvCuda(bad, stream->handle())));
  bad.out_type = ActType::kBF16;
  bad.accumulate = true;
  EXPECT_TRUE(absl::IsInvalidArgument(GemvCuda(bad, stream->handle())));
  bad.accumulate = false;
  bad.ldy = 3;  // below n / 2
  EXPECT_TRUE(absl::IsInvalidArgument(GemvCuda(bad, stream->handle())));
  bad.ldy = 4;
  EXPECT_TRUE(GemvCuda(bad, stream->handle()).ok());  // the same arguments, fixed, run
  ASSERT_TRUE(stream->Synchronize().ok());
}

// The q/k/v GEMV with RoPE and the KV cache write folded in writes exactly the bytes that the plain
// GEMV followed by the RoPE + KV write kernel does: y (rotated q and k, v) and both caches, with
// and without the input norm and a bias, for every activation type, m up to 8, a slot past the
// cache and a negative one (nothing written), and several GQA shapes.
TEST_F(GemvTest, RopeQkvEqualsGemvThenRopeWriteKv) {
  struct Shape {
    int64_t q_heads, kv_heads, head_dim, k;
  };
  constexpr int64_t kSlots = 40;  // cache slots
  for (ActType act : {ActType::kF32, ActType::kF16, ActType::kBF16}) {
    const int64_t eb = gpu::ActBytes(act);
    // {3, 2, 24, 64}: the q/k-to-v boundary mid-block (unit 60) and idle warps in the last block.
    for (const Shape sh : {Shape{4, 2, 64, 256}, Shape{6, 6, 16, 96}, Shape{32, 8, 128, 4096},
                           Shape{3, 1, 32, 1032}, Shape{3, 2, 24, 64}}) {
      const int64_t D = sh.head_dim, n = (sh.q_heads + 2 * sh.kv_heads) * D;
      const int64_t width = sh.kv_heads * D;
      std::vector<float> w(n * sh.k), x(8 * sh.k), resid(8 * sh.k), gain(sh.k), bias(n);
      for (float& v : w) v = RoundTo(act, normal(rng) * 0.05f);
      for (float& v : x) v = RoundTo(act, normal(rng));
      for (float& v : resid) v = normal(rng) * 3.0f;
      for (float& v : gain) v = 1.0f + 0.2f * normal(rng);
      for (float& v : bias) v = RoundTo(act, normal(rng));
      std::vector<float> inv_freq(D / 2);
      for (int64_t i = 0; i < D / 2; ++i) {
        inv_freq[i] = static_cast<float>(std::pow(500000.0, -2.0 * i / D));
      }
      std::vector<int32_t> positions(8);
      std::vector<int64_t> slots(8);
      for (int r = 0; r < 8; ++r) {
        positions[r] = static_cast<int32_t>(rng() % 100000);
        slots[r] = 3 * r + 1;
      }
      slots[2] = -1;      // padding row: no cache write
      slots[5] = kSlots;  // past the cache: none either
      DeviceBuffer dw = Upload(Encode(act, w)), dx = Upload(Encode(act, x)),
                   dres = Upload(Encode(ActType::kF32, resid)),
                   dgain = Upload(Encode(ActType::kF32, gain)), db = Upload(Encode(act, bias));
      auto upload = [](const void* p, size_t bytes) {
        absl::StatusOr<DeviceBuffer> b = cuda_test::UploadBytes(p, bytes);
        EXPECT_TRUE(b.ok()) << b.status();
        return *std::move(b);
      };
      DeviceBuffer dfreq = upload(inv_freq.data(), 4 * inv_freq.size()),
                   dpos = upload(positions.data(), 4 * positions.size()),
                   dslots = upload(slots.data(), 8 * slots.size());
      for (int64_t m : {1, 2, 3, 5, 8}) {
        for (const bool norm : {false, true}) {
          for (const bool with_bias : {false, true}) {
            SCOPED_TRACE(::testing::Message()
                         << "act " << static_cast<int>(act) << " m " << m << " heads " << sh.q_heads
                         << "/" << sh.kv_heads << " head_dim " << D << " k " << sh.k << " norm "
                         << norm << " bias " << with_bias);
            const std::vector<uint8_t> poison(kSlots * width * eb, 0xff);
            DeviceBuffer want_y = Upload(std::vector<uint8_t>(m * n * eb, 0xff)),
                         got_y = Upload(std::vector<uint8_t>(m * n * eb, 0xff)),
                         want_k = Upload(poison), want_v = Upload(poison), got_k = Upload(poison),
                         got_v = Upload(poison);
            gpu::GemvArgs g = DenseArgs(m, n, sh.k, norm ? dres.data() : dx.data(), dw.data(),
                                        want_y.data(), act, norm ? dgain.as<float>() : nullptr);
            g.bias = with_bias ? db.data() : nullptr;
            ASSERT_TRUE(GemvCuda(g, stream->handle()).ok());
            char* q = static_cast<char*>(want_y.data());
            const int64_t qd = sh.q_heads * D;
            const gpu::RopeArgs rope{
                m, sh.q_heads,  sh.kv_heads, D,  dpos.as<int32_t>(), dfreq.as<float>(), q,
                n, q + qd * eb, n,           act};
            gpu::WriteKvArgs wk;
            wk.num_tokens = m;
            wk.num_kv_heads = sh.kv_heads;
            wk.head_dim = D;
            wk.block_tokens = 8;
            wk.num_blocks = kSlots / 8;
            wk.k = q + qd * eb;
            wk.k_stride = n;
            wk.v = q + (qd + width) * eb;
            wk.v_stride = n;
            wk.slots = dslots.as<int64_t>();
            wk.k_cache = want_k.data();
            wk.v_cache = want_v.data();
            wk.act = act;
            ASSERT_TRUE(RopeWriteKvCuda(rope, wk, stream->handle()).ok());
            g.y = got_y.data();
            g.rope_heads = sh.q_heads;
            g.kv_heads = sh.kv_heads;
            g.head_dim = D;
            g.positions = dpos.as<int32_t>();
            g.inv_freq = dfreq.as<float>();
            g.slots = dslots.as<int64_t>();
            g.cache_slots = kSlots;
            g.k_cache = got_k.data();
            g.v_cache = got_v.data();
            ASSERT_TRUE(GemvCuda(g, stream->handle()).ok());
            ASSERT_TRUE(stream->Synchronize().ok());
            auto bytes = [](DeviceBuffer& b, size_t size) {
              std::vector<uint8_t> out(size);
              EXPECT_TRUE(b.CopyToHost(out.data(), size).ok());
              return out;
            };
            const std::vector<uint8_t> wy = bytes(want_y, m * n * eb),
                                       gy = bytes(got_y, m * n * eb);
            int64_t first = -1;
            for (int64_t i = 0; i < m * n && first < 0; ++i) {
              if (std::memcmp(&wy[i * eb], &gy[i * eb], eb) != 0) first = i;
            }
            EXPECT_EQ(first, -1) << "y differs first at row " << first / n << " column "
                                 << first % n;
            const std::vector<float> wf = Decode(act, wy);
            for (float v : wf) ASSERT_TRUE(std::isfinite(v)) << "reference output not written";
            for (const char* which : {"k", "v"}) {
              const bool is_k = which[0] == 'k';
              const std::vector<uint8_t> wc = bytes(is_k ? want_k : want_v, poison.size()),
                                         gc = bytes(is_k ? got_k : got_v, poison.size());
              EXPECT_TRUE(wc == gc) << which << " cache differs";
              // The written slots are those of rows below m with a slot inside the cache.
              for (int64_t slot = 0; slot < kSlots; ++slot) {
                bool written = false;
                for (int64_t r = 0; r < m; ++r) written |= slots[r] == slot;
                const bool poisoned = std::all_of(gc.begin() + slot * width * eb,
                                                  gc.begin() + (slot + 1) * width * eb,
                                                  [](uint8_t b) { return b == 0xff; });
                EXPECT_EQ(poisoned, !written) << which << " cache slot " << slot;
              }
            }
          }
        }
      }
    }
  }
  // Refused: rows that are not the heads' count, an odd head_dim, accumulation, a missing cache.
  // (Only GemvSupported's verdict is checked: d serves as every buffer, so nothing runs.)
  DeviceBuffer d = Upload(std::vector<uint8_t>(1 << 16, 0));
  gpu::GemvArgs bad = SmallArgs(d);
  bad.n = (2 + 2 * 1) * 16;
  bad.ldy = bad.n;
  bad.rope_heads = 2;
  bad.kv_heads = 1;
  bad.head_dim = 16;
  bad.positions = d.as<int32_t>();
  bad.inv_freq = d.as<float>();
  bad.slots = reinterpret_cast<const int64_t*>(d.data());
  bad.cache_slots = 4;
  bad.k_cache = bad.v_cache = d.data();
  EXPECT_TRUE(gpu::GemvSupported(bad));  // each change below alone makes it unsupported
  bad.n = 48;
  EXPECT_TRUE(absl::IsInvalidArgument(GemvCuda(bad, stream->handle())));
  bad.n = 64;
  bad.head_dim = 15;
  EXPECT_TRUE(absl::IsInvalidArgument(GemvCuda(bad, stream->handle())));
  bad.head_dim = 16;
  bad.accumulate = true;
  bad.out_type = ActType::kF32;
  EXPECT_TRUE(absl::IsInvalidArgument(GemvCuda(bad, stream->handle())));
  bad.act = ActType::kF32;  // f32 in and out: accumulation alone is what is refused
  EXPECT_TRUE(absl::IsInvalidArgument(GemvCuda(bad, stream->handle())));
  bad.accumulate = false;
  EXPECT_TRUE(gpu::GemvSupported(bad));
  bad.act = bad.out_type = ActType::kBF16;
  bad.v_cache = nullptr;
  EXPECT_TRUE(absl::IsInvalidArgument(GemvCuda(bad, stream->handle())));
}

#else

TEST(GemvTest, NeedsCudaBuild) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace strata
