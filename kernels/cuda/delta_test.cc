// Differential tests of the CUDA delta ops (kernels/cuda/delta.h) against their CPU twins
// (kernels/delta.h): every format (2, 4 and 8 bits, dense and 2:4), every activation type and
// output type, row lists and plain ranges, padded strides, on fresh random inputs rounded to the
// activation type first. Outputs that a kernel must write are poisoned (0xff: NaN) before it runs;
// elements it must leave alone (rows of other tenants, padding columns) are checked bit for bit
// afterwards. Tolerances, relative L2 error against the CPU in f32: f32 1e-5, f16 2e-3, bf16 1e-2
// (the activations' own rounding). Needs a GPU: tagged "gpu"; skipped where the build has no CUDA
// or the machine no device.
#include "kernels/delta.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/delta_test_util.h"

#ifdef STRATA_HAVE_CUDA
#include "kernels/cuda/delta.h"
#include "kernels/cuda/runtime.h"
#include "kernels/cuda/test_util.h"
#endif

namespace strata {
namespace {

#ifdef STRATA_HAVE_CUDA

using cuda_test::Decode;
using cuda_test::Encode;
using cuda_test::RoundTo;
using gpu::ActType;

DeviceBuffer UploadBytes(const void* data, size_t bytes) {
  absl::StatusOr<DeviceBuffer> b = cuda_test::UploadBytes(data, bytes);
  EXPECT_TRUE(b.ok()) << b.status();
  return *std::move(b);
}

template <typename T>
DeviceBuffer UploadPod(const std::vector<T>& v) {
  return UploadBytes(v.data(), v.size() * sizeof(T));
}

std::vector<uint8_t> Download(const DeviceBuffer& b, size_t bytes) {
  absl::StatusOr<std::vector<uint8_t>> out = cuda_test::DownloadBytes(b, bytes);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *std::move(out) : std::vector<uint8_t>(bytes);
}

// A delta packed on the host by PackDeltaCpu, with a copy of its buffers on the device.
struct TestDelta {
  delta_test::Packed packed;
  PackedDelta host;
  DeviceBuffer dq, dindex, dscale;
  gpu::DeltaView device;
};

TestDelta MakeDelta(std::mt19937* rng, int64_t rows, int64_t cols, int bits, bool sparse) {
  std::normal_distribution<float> normal(0.0f, 0.01f);
  std::vector<float> dense(rows * cols);
  for (float& v : dense) v = normal(*rng);
  TestDelta t;
  t.packed = delta_test::Pack(dense, rows, cols, bits, sparse);
  t.host = t.packed.view;
  t.dq = UploadPod(t.packed.q);
  t.dindex = UploadPod(t.packed.index);
  t.dscale = UploadPod(t.packed.scale);
  PackedDelta on_device = t.host;
  on_device.q = static_cast<const uint8_t*>(t.dq.data());
  on_device.index = sparse ? static_cast<const uint8_t*>(t.dindex.data()) : nullptr;
  on_device.scale = static_cast<const float*>(t.dscale.data());
  t.device = ToDeltaView(on_device);
  return t;
}

double RelativeError(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

double Tolerance(ActType t) { return t == ActType::kF32 ? 1e-5 : t == ActType::kF16 ? 2e-3 : 1e-2; }

class DeltaCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> devices = CudaDeviceCount();
    if (!devices.ok()) GTEST_SKIP() << "no usable GPU: " << devices.status();
    absl::StatusOr<CudaStream> s = CudaStream::Create();
    ASSERT_TRUE(s.ok()) << s.status();
    stream_ = std::make_unique<CudaStream>(*std::move(s));
  }
  std::unique_ptr<CudaStream> stream_;
};

struct Format {
  int bits;
  bool sparse;
};
constexpr Format kFormats[] = {{2, false}, {4, false}, {8, false}, {2, true}, {4, true}, {8, true}};

// The CUDA-core GEMV (every activation type) and the tensor-core product (f16, bf16; row counts
// around its 16-row fragments and 64-row tiles, and several row tiles) against DeltaMatMulCpu.
TEST_F(DeltaCudaTest, GemvAndMmaMatchCpu) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  struct Shape {
    int64_t n, k;
  };
  for (const Shape sh : {Shape{40, 64}, Shape{257, 1024}, Shape{1000, 136}, Shape{72, 4104}}) {
    for (const Format f : kFormats) {
      TestDelta d = MakeDelta(&rng, sh.n, sh.k, f.bits, f.sparse);
      for (ActType act : {ActType::kF32, ActType::kF16, ActType::kBF16}) {
        for (ActType out : {act, ActType::kF32}) {
          for (bool mma : {false, true}) {
            if (mma && act == ActType::kF32) continue;
            const std::vector<int64_t> ms = mma ? std::vector<int64_t>{1, 13, 16, 17, 64, 70, 130}
                                                : std::vector<int64_t>{1, 3, 8, 13};
            for (int64_t m : ms) {
              for (bool listed : {false, true}) {
                SCOPED_TRACE(::testing::Message()
                             << "n " << sh.n << " k " << sh.k << " bits " << f.bits << " sparse "
                             << f.sparse << " act " << static_cast<int>(act) << " out "
                             << static_cast<int>(out) << " m " << m << " listed " << listed
                             << " mma " << mma);
                // The batch has m + 5 rows; the delta applies to m of them (shuffled when listed,
                // else the first m).
                const int64_t total = m + 5;
                const int64_t ldx = sh.k + 8, ldy = sh.n + 3;
                std::vector<int32_t> rows(total);
                std::iota(rows.begin(), rows.end(), 0);
                if (listed) std::shuffle(rows.begin(), rows.end(), rng);
                rows.resize(m);
                std::vector<float> x(total * ldx), y0(total * ldy);
                for (float& v : x) v = RoundTo(act, normal(rng));
                for (float& v : y0) v = RoundTo(out, normal(rng) * 0.1f);
                // Padding columns of y hold NaN: the kernel must not touch them.
                for (int64_t r = 0; r < total; ++r) {
                  for (int64_t j = sh.n; j < ldy; ++j) y0[r * ldy + j] = std::nanf("");
                }
                std::vector<float> want = y0;
                DeltaMatMulParams p;
                p.m = m;
                p.rows = rows.data();
                p.x = x.data();
                p.ldx = ldx;
                p.delta = d.host;
                p.y = want.data();
                p.ldy = ldy;
                ASSERT_TRUE(DeltaMatMulCpu(p).ok());

                const std::vector<uint8_t> y0_bytes = Encode(out, y0);
                DeviceBuffer dx = UploadPod(Encode(act, x));
                DeviceBuffer dy = UploadPod(y0_bytes);
                DeviceBuffer drows = UploadPod(rows);
                gpu::DeltaGemvArgs a;
                a.m = m;
                a.rows = listed ? static_cast<const int32_t*>(drows.data()) : nullptr;
                a.x = dx.data();
                a.ldx = ldx;
                a.act = act;
                a.delta = d.device;
                a.y = dy.data();
                a.ldy = ldy;
                a.out_type = out;
                // The tensor-core product with listed rows may split its columns over several
                // blocks per tile (where the shape leaves the GPU short of blocks); its counters
                // must come back zero.
                constexpr int64_t kCounters = 64;
                DeviceBuffer dws, dcounters;
                if (mma && listed) {
                  dws = UploadPod(std::vector<float>(1 << 20, std::nanf("")));
                  dcounters = UploadPod(std::vector<uint32_t>(kCounters, 0));
                  a.split_workspace = static_cast<float*>(dws.data());
                  a.split_workspace_floats = 1 << 20;
                  a.split_counters = static_cast<uint32_t*>(dcounters.data());
                  a.split_counters_count = kCounters;
                }
                ASSERT_TRUE(
                    (mma ? DeltaMmaCuda(a, stream_->handle()) : DeltaGemvCuda(a, stream_->handle()))
                        .ok());
                ASSERT_TRUE(stream_->Synchronize().ok());
                if (a.split_counters != nullptr) {
                  const std::vector<uint8_t> c = Download(dcounters, 4 * kCounters);
                  EXPECT_TRUE(std::all_of(c.begin(), c.end(), [](uint8_t b) { return b == 0; }))
                      << "split counters left non-zero";
                }
                const std::vector<uint8_t> got_bytes = Download(dy, y0_bytes.size());
                const std::vector<float> got = Decode(out, got_bytes);
                const int64_t eb = gpu::ActBytes(out);
                std::vector<bool> touched(total, false);
                for (int32_t r : rows) touched[r] = true;
                std::vector<float> got_rows, want_rows;
                for (int64_t r = 0; r < total; ++r) {
                  if (!touched[r]) {
                    // Another tenant's row: not one bit changed.
                    EXPECT_EQ(
                        0, std::memcmp(&got_bytes[r * ldy * eb], &y0_bytes[r * ldy * eb], ldy * eb))
                        << "row " << r;
                    continue;
                  }
                  for (int64_t j = 0; j < sh.n; ++j) {
                    got_rows.push_back(got[r * ldy + j]);
                    want_rows.push_back(want[r * ldy + j]);
                  }
                  for (int64_t j = sh.n; j < ldy; ++j) {
                    EXPECT_TRUE(std::isnan(got[r * ldy + j])) << "padding of row " << r;
                  }
                }
                EXPECT_LE(RelativeError(got_rows, want_rows), Tolerance(out));
              }
            }
          }
        }
      }
    }
  }
}

TEST_F(DeltaCudaTest, UnpackPanelsMatchCpu) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  for (const Format f : kFormats) {
    const int64_t rows = 300, cols = 520;
    TestDelta d = MakeDelta(&rng, rows, cols, f.bits, f.sparse);
    std::vector<float> want(rows * cols);
    ASSERT_TRUE(UnpackDeltaCpu(d.host, 0, rows, want.data(), /*accumulate=*/false).ok());
    for (ActType out : {ActType::kF32, ActType::kF16, ActType::kBF16}) {
      SCOPED_TRACE(::testing::Message() << "bits " << f.bits << " sparse " << f.sparse << " out "
                                        << static_cast<int>(out));
      // Rows [70, 70 + 129) into a poisoned panel with padded rows.
      // bf16's rows are not 16-byte aligned (the kernel's element-by-element stores), the others'
      // are (its 16-byte stores).
      const int64_t begin = 70, count = 129, eb = gpu::ActBytes(out);
      const int64_t ld = cols + (out == ActType::kBF16 ? 3 : 8);
      absl::StatusOr<DeviceBuffer> panel = cuda_test::Poisoned(count * ld * eb);
      ASSERT_TRUE(panel.ok());
      gpu::UnpackDeltaArgs a;
      a.delta = d.device;
      a.num_rows = count;
      a.row_begin = begin;
      a.out = panel->data();
      a.ld_out = ld;
      a.out_type = out;
      ASSERT_TRUE(UnpackDeltaCuda(a, stream_->handle()).ok());
      ASSERT_TRUE(stream_->Synchronize().ok());
      const std::vector<float> got =
          cuda_test::DecodeRows(out, Download(*panel, count * ld * eb), count, ld, ld);
      std::vector<float> got_vals, want_vals;
      for (int64_t i = 0; i < count; ++i) {
        for (int64_t c = 0; c < cols; ++c) {
          got_vals.push_back(got[i * ld + c]);
          want_vals.push_back(RoundTo(out, want[(begin + i) * cols + c]));
        }
        for (int64_t c = cols; c < ld; ++c) EXPECT_TRUE(std::isnan(got[i * ld + c]));
      }
      // The CPU value rounded once to the output type: equal, but for f32 products' last bit.
      EXPECT_LE(RelativeError(got_vals, want_vals), 1e-6);
    }
  }
}

TEST_F(DeltaCudaTest, UnpackChosenRowsAccumulates) {
  // The embedding's use: rows of Δ picked by token id, added to the f32 residual rows of the
  // fine-tune's tokens.
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const Format f : kFormats) {
    SCOPED_TRACE(::testing::Message() << "bits " << f.bits << " sparse " << f.sparse);
    const int64_t vocab = 97, hidden = 64, tokens = 10;
    TestDelta d = MakeDelta(&rng, vocab, hidden, f.bits, f.sparse);
    std::vector<float> residual(tokens * hidden);
    for (float& v : residual) v = normal(rng);
    // Tokens 2, 5, 6 and 9 are the fine-tune's; one id repeats.
    const std::vector<int32_t> dst = {2, 5, 6, 9}, ids = {11, 96, 0, 11};
    std::vector<float> want = residual;
    for (size_t i = 0; i < dst.size(); ++i) {
      ASSERT_TRUE(UnpackDeltaCpu(d.host, ids[i], ids[i] + 1, want.data() + dst[i] * hidden,
                                 /*accumulate=*/true)
                      .ok());
    }
    DeviceBuffer dres = UploadPod(residual), ddst = UploadPod(dst), dids = UploadPod(ids);
    gpu::UnpackDeltaArgs a;
    a.delta = d.device;
    a.num_rows = static_cast<int64_t>(dst.size());
    a.src_rows = static_cast<const int32_t*>(dids.data());
    a.dst_rows = static_cast<const int32_t*>(ddst.data());
    a.out = dres.data();
    a.ld_out = hidden;
    a.out_type = ActType::kF32;
    a.accumulate = true;
    ASSERT_TRUE(UnpackDeltaCuda(a, stream_->handle()).ok());
    ASSERT_TRUE(stream_->Synchronize().ok());
    const std::vector<float> got = Decode(ActType::kF32, Download(dres, 4 * residual.size()));
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_NEAR(got[i], want[i], 1e-6f * (1 + std::fabs(want[i]))) << i;
    }
  }
}

TEST_F(DeltaCudaTest, AddRowsTouchesOnlyItsRows) {
  for (ActType t : {ActType::kF32, ActType::kF16, ActType::kBF16}) {
    for (bool bias : {true, false}) {
      SCOPED_TRACE(::testing::Message() << "type " << static_cast<int>(t) << " bias " << bias);
      const int64_t rows = 6, n = 24, ldy = 32, ld_src = bias ? 0 : 28;
      std::vector<float> y(rows * ldy), src(2 * 28);
      for (int64_t i = 0; i < rows * ldy; ++i) {
        y[i] = RoundTo(t, 0.25f * static_cast<float>(i % 7));
      }
      for (size_t j = 0; j < src.size(); ++j) src[j] = 0.5f * static_cast<float>(j % 5);
      const std::vector<int32_t> list = {4, 1};
      DeviceBuffer dy = UploadPod(Encode(t, y)), ds = UploadPod(src), dl = UploadPod(list);
      gpu::AddRowsArgs a{2,
                         n,
                         static_cast<const int32_t*>(dl.data()),
                         static_cast<const float*>(ds.data()),
                         ld_src,
                         dy.data(),
                         ldy,
                         t};
      ASSERT_TRUE(AddRowsCuda(a, stream_->handle()).ok());
      ASSERT_TRUE(stream_->Synchronize().ok());
      const std::vector<float> got = Decode(t, Download(dy, rows * ldy * gpu::ActBytes(t)));
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = r == 4 ? 0 : r == 1 ? 1 : -1;  // position in the list
        for (int64_t j = 0; j < ldy; ++j) {
          const float add = i >= 0 && j < n ? src[i * ld_src + j] : 0.0f;
          EXPECT_EQ(got[r * ldy + j], RoundTo(t, y[r * ldy + j] + add))
              << "row " << r << " col " << j;
        }
      }
    }
  }
}

TEST_F(DeltaCudaTest, RefusesBadArguments) {
  std::mt19937 rng(7);
  TestDelta d = MakeDelta(&rng, 16, 64, 4, false);
  absl::StatusOr<DeviceBuffer> buf = cuda_test::Poisoned(1 << 16);
  ASSERT_TRUE(buf.ok());
  gpu::DeltaGemvArgs a;
  a.m = 2;
  a.x = buf->data();
  a.ldx = 64;
  a.delta = d.device;
  a.y = static_cast<char*>(buf->data()) + 32768;
  a.ldy = 16;
  const auto refused = [&](const gpu::DeltaGemvArgs& bad, const char* field) {
    for (const auto op : {&DeltaGemvCuda, &DeltaMmaCuda}) {
      absl::Status s = op(bad, stream_->handle());
      EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
      EXPECT_NE(s.message().find(field), absl::string_view::npos) << s;
    }
  };
  {
    // The tensor-core product takes 16-bit activations only.
    gpu::DeltaGemvArgs f32 = a;
    f32.act = ActType::kF32;
    absl::Status s = DeltaMmaCuda(f32, stream_->handle());
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    EXPECT_NE(s.message().find("act"), absl::string_view::npos) << s;
    // A split workspace without its counters.
    gpu::DeltaGemvArgs half = a;
    half.split_workspace = static_cast<float*>(buf->data());
    half.split_workspace_floats = 1024;
    s = DeltaMmaCuda(half, stream_->handle());
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    EXPECT_NE(s.message().find("split_counters"), absl::string_view::npos) << s;
  }
  gpu::DeltaGemvArgs bad = a;
  bad.delta.bits = 3;
  refused(bad, "delta.bits");
  bad = a;
  bad.delta.cols = 60;
  refused(bad, "delta.cols");
  bad = a;
  bad.delta.q = d.device.q + 1;
  refused(bad, "delta.q");
  bad = a;
  bad.delta.sparse_2_4 = true;
  bad.delta.index = nullptr;
  refused(bad, "delta.index");
  bad = a;
  bad.ldx = 60;
  refused(bad, "ldx");
  bad = a;
  bad.ldx = 68;  // 136 bytes: rows not 16-byte aligned
  refused(bad, "ldx");
  bad = a;
  bad.ldy = 8;
  refused(bad, "ldy");
  bad = a;
  bad.y = nullptr;
  refused(bad, "y");
  EXPECT_TRUE(DeltaGemvCuda(a, stream_->handle()).ok());  // the valid arguments run

  gpu::UnpackDeltaArgs u;
  u.delta = d.device;
  u.num_rows = 4;
  u.row_begin = 14;  // rows 14 .. 17 of 16
  u.out = buf->data();
  u.ld_out = 64;
  absl::Status s = UnpackDeltaCuda(u, stream_->handle());
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("row_begin"), absl::string_view::npos) << s;
  u.row_begin = 12;
  EXPECT_TRUE(UnpackDeltaCuda(u, stream_->handle()).ok());
  ASSERT_TRUE(stream_->Synchronize().ok());
}

#else

TEST(DeltaCudaTest, NeedsCudaBuild) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace strata
