// Differential tests of the transformer layer's CUDA ops (kernels/cuda/ops.h) and the cuBLASLt GEMM
// (kernels/cuda/gemm.h) against their CPU references (kernels/elementwise.h, kernels/attention.h,
// kernels/matmul.h), over sweeps of shapes and the three activation types.
//
// Method, for every op: fresh random inputs (the seed is in every failure message; set
// STRATA_OPS_TEST_SEED to replay one), rounded to the activation type on the host first, so that
// the CPU reference sees exactly the values the GPU reads and only the op's own arithmetic differs;
// device outputs poisoned with 0xff bytes (NaN in every float type) before each run, so that an
// unwritten element fails; and padding that an op must not touch (row strides past the row) checked
// to still hold the poison. Outputs are compared row by row by relative L2 error within the
// tolerances below; exact where the op only moves or adds values.
//
// Needs a GPU: tagged "gpu"; the GPU tests skip where the machine has no usable device, and the
// file holds a placeholder where the build has no CUDA.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

#ifdef STRATA_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/attention.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/ops_kernel.h"
#include "kernels/cuda/runtime.h"
#include "kernels/cuda/test_util.h"
#include "kernels/dtype.h"
#include "kernels/elementwise.h"
#include "kernels/matmul.h"
#endif

namespace strata {
namespace {

#ifdef STRATA_HAVE_CUDA

using cuda_test::DecodeOne;
using cuda_test::DecodeRows;
using cuda_test::DownloadBytes;
using cuda_test::Encode;
using cuda_test::Poisoned;
using cuda_test::Rounded;
using cuda_test::RoundTo;
using cuda_test::Settle;
using cuda_test::Upload;
using cuda_test::UploadBytes;
using cuda_test::UploadPod;
using gpu::ActType;

// Tolerances on the relative L2 error ||got - want|| / ||want|| of each output row (a token's
// hidden vector, one head of one token, one GEMM output row), the GPU against the CPU reference on
// identical pre-rounded inputs.
//  - f32: the two differ only in summation order, fused multiply-adds and the GPU's fast
//    intrinsics (rsqrtf, __expf, exp2f), about 1e-7: 1e-5 for the row-wise ops, 1e-4 where
//    thousands of products are summed (GEMM with k up to 4096, attention's Q.K, softmax and P.V
//    over up to 700 keys).
//  - f16, bf16: the output is rounded once to the type, at most half an ulp, a relative error of
//    2^-11 (4.9e-4) and 2^-8 (3.9e-3) per value and so per row; 2e-3 and 1e-2 leave 4x and 2.5x of
//    headroom for the arithmetic on top.
// A GEMM is held to the tolerance of its output type (its operands are identical on both sides),
// so f16 or bf16 operands with f32 output get 1e-4. Argmax's log-probability is compared in
// absolute terms against log-softmax in double.
constexpr double kTolF32 = 1e-5;
constexpr double kTolF32LongSums = 1e-4;
constexpr double kTolF16 = 2e-3;
constexpr double kTolBF16 = 1e-2;
constexpr double kLogprobAbsTol = 1e-4;

constexpr ActType kActTypes[] = {ActType::kF32, ActType::kF16, ActType::kBF16};

double Tolerance(ActType t, bool long_sums) {
  switch (t) {
    case ActType::kF32:
      return long_sums ? kTolF32LongSums : kTolF32;
    case ActType::kF16:
      return kTolF16;
    case ActType::kBF16:
      return kTolBF16;
  }
  return 0.0;
}

const char* ActName(ActType t) {
  switch (t) {
    case ActType::kF32:
      return "f32";
    case ActType::kF16:
      return "f16";
    case ActType::kBF16:
      return "bf16";
  }
  return "?";
}

#define STRATA_TEST_CAT_INNER(a, b) a##b
#define STRATA_TEST_CAT(a, b) STRATA_TEST_CAT_INNER(a, b)

#define ASSERT_OK(expr)                                    \
  do {                                                     \
    const absl::Status status_ = (expr);                   \
    ASSERT_TRUE(status_.ok()) << #expr << ": " << status_; \
  } while (false)

#define ASSERT_OK_AND_ASSIGN(lhs, expr) \
  ASSERT_OK_AND_ASSIGN_IMPL(STRATA_TEST_CAT(status_or_, __LINE__), lhs, expr)
#define ASSERT_OK_AND_ASSIGN_IMPL(so, lhs, expr)        \
  auto so = (expr);                                     \
  ASSERT_TRUE(so.ok()) << #expr << ": " << so.status(); \
  lhs = *std::move(so)

// ---------------------------------------------------------------------------------------------
// Host values: rounding, encoding, random draws.

class Random {
 public:
  explicit Random(uint32_t seed) : gen_(seed) {}
  std::vector<float> Uniform(int64_t n, float lo, float hi) {
    std::uniform_real_distribution<float> dist(lo, hi);
    std::vector<float> v(n);
    for (float& x : v) x = dist(gen_);
    return v;
  }
  // Uniform in [lo, hi].
  int64_t Int(int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(gen_);
  }
  std::mt19937& gen() { return gen_; }

 private:
  std::mt19937 gen_;
};

// ---------------------------------------------------------------------------------------------
// Device memory, beside the shared helpers of kernels/cuda/test_util.h.

template <typename T>
absl::StatusOr<std::vector<T>> DownloadPod(const DeviceBuffer& b, int64_t n) {
  std::vector<T> out(n);
  if (absl::Status s = b.CopyToHost(out.data(), n * sizeof(T)); !s.ok()) return s;
  return out;
}

// The address `elements` elements of type t into `b`.
void* At(const DeviceBuffer& b, ActType t, int64_t elements) {
  return static_cast<char*>(b.data()) + elements * gpu::ActBytes(t);
}

// ---------------------------------------------------------------------------------------------
// Comparisons.

// The first values of `got` that differ from `want` (NaN differs from everything), as [row, col]
// of rows of `width`.
::testing::AssertionResult Identical(const std::vector<float>& got, const std::vector<float>& want,
                                     int64_t width, const std::string& what) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure()
           << what << ": " << got.size() << " values, want " << want.size();
  }
  int64_t bad = 0;
  ::testing::AssertionResult r = ::testing::AssertionFailure();
  r << what << ": ";
  for (int64_t i = 0; i < static_cast<int64_t>(want.size()); ++i) {
    if (got[i] == want[i]) continue;
    if (++bad <= 3) {
      r << "[" << i / width << ", " << i % width << "] got " << got[i] << " want " << want[i]
        << "; ";
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return r << bad << " of " << want.size() << " values differ (must be exact)";
}

// Bytes [used_bytes, stride_bytes) of each of `rows` rows must still hold the 0xff poison.
::testing::AssertionResult PaddingIntact(const std::vector<uint8_t>& bytes, int64_t rows,
                                         int64_t stride_bytes, int64_t used_bytes,
                                         const std::string& what) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = used_bytes; i < stride_bytes; ++i) {
      if (bytes[r * stride_bytes + i] != 0xff) {
        return ::testing::AssertionFailure()
               << what << ": row " << r << " padding byte " << i - used_bytes
               << " was written (the op wrote past its row)";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

class OpsCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> devices = CudaDeviceCount();
    if (!devices.ok()) GTEST_SKIP() << "no usable GPU: " << devices.status();
    seed_ = std::random_device{}();
    if (const char* env = std::getenv("STRATA_OPS_TEST_SEED"); env != nullptr) {
      seed_ = static_cast<uint32_t>(std::strtoul(env, nullptr, 10));
    }
    rng_.emplace(seed_);
    absl::StatusOr<CudaStream> stream = CudaStream::Create();
    ASSERT_TRUE(stream.ok()) << stream.status();
    stream_.emplace(*std::move(stream));
  }

  // One line per tolerance used: the largest share of it that any row took, and where.
  void TearDown() override {
    for (const auto& [tol, worst] : worst_) {
      std::printf("[ headroom ] seed %u, tolerance %g: worst row used %.3g of it, at %s\n", seed_,
                  tol, worst.first, worst.second.c_str());
    }
  }

  CudaStreamHandle stream() const { return stream_->handle(); }
  absl::Status Sync() const { return stream_->Synchronize(); }
  Random& rng() { return *rng_; }

  // Every value of `got` finite, and every row of `width` values within relative L2 error `tol`
  // of `want`. On failure the message names the worst row, the largest absolute error and where,
  // and the first non-finite value. Records the closest call to the tolerance for TearDown.
  ::testing::AssertionResult Near(const std::vector<float>& got, const std::vector<float>& want,
                                  int64_t width, double tol, const std::string& what) {
    const int64_t n = static_cast<int64_t>(want.size());
    if (static_cast<int64_t>(got.size()) != n) {
      return ::testing::AssertionFailure() << what << ": " << got.size() << " values, want " << n;
    }
    double all_d2 = 0, all_w2 = 0, worst_rel = 0, max_abs = 0;
    int64_t worst_row = 0, max_at = 0, non_finite = 0, first_non_finite = -1;
    for (int64_t row = 0; row * width < n; ++row) {
      double d2 = 0, w2 = 0;
      for (int64_t i = row * width; i < std::min(n, (row + 1) * width); ++i) {
        if (!std::isfinite(got[i])) {
          if (non_finite++ == 0) first_non_finite = i;
          continue;
        }
        const double d = static_cast<double>(got[i]) - want[i];
        d2 += d * d;
        w2 += static_cast<double>(want[i]) * want[i];
        if (std::fabs(d) > max_abs) {
          max_abs = std::fabs(d);
          max_at = i;
        }
      }
      all_d2 += d2;
      all_w2 += w2;
      const double rel = d2 == 0 ? 0.0 : std::sqrt(d2) / std::sqrt(std::max(w2, 1e-300));
      if (rel > worst_rel) {
        worst_rel = rel;
        worst_row = row;
      }
    }
    auto& [worst_ratio, worst_what] = worst_.try_emplace(tol, -1.0, "").first->second;
    if (worst_rel / tol > worst_ratio) {
      worst_ratio = worst_rel / tol;
      worst_what = what;
    }
    if (non_finite == 0 && worst_rel <= tol) return ::testing::AssertionSuccess();
    ::testing::AssertionResult r = ::testing::AssertionFailure();
    r << what << ": relative L2 error " << std::sqrt(all_d2) / std::sqrt(std::max(all_w2, 1e-300))
      << " overall, worst row " << worst_row << " (of " << width << " values) " << worst_rel
      << " against tolerance " << tol << "; largest absolute error " << max_abs << " at ["
      << max_at / width << ", " << max_at % width << "]: got " << got[max_at] << " want "
      << want[max_at];
    if (non_finite > 0) {
      r << "; " << non_finite << " non-finite values, first at [" << first_non_finite / width
        << ", " << first_non_finite % width << "]: " << got[first_non_finite] << " want "
        << want[first_non_finite] << " (0xff poison left means the element was never written)";
    }
    return r;
  }

  // The run of the paged-attention differential test for one head configuration, case and type.
  struct HeadConfig {
    int64_t num_heads, num_kv_heads, head_dim;
  };
  // Positions [0, cached) of a sequence are in the cache from earlier steps; the batch holds its
  // query tokens at positions [cached, cached + fresh) and writes their K and V first.
  struct SeqSpec {
    int64_t cached, fresh;
  };
  // kCapacity: more partitions than the keys need, as a decode graph captured for a longer context.
  enum class Split { kNone, kChosen, kEvery128, kCapacity };
  struct AttentionCase {
    const char* name;
    std::vector<SeqSpec> seqs;
    bool plan_tiles;  // false: one tile per token (tiles null), as decode runs
    int64_t block_tokens;
    int64_t sliding_window;
    Split split;  // run this split-K variant as well as the single partition
  };
  void RunAttention(const HeadConfig& hc, const AttentionCase& c, ActType act);

  uint32_t seed_ = 0;

 private:
  std::optional<Random> rng_;
  std::optional<CudaStream> stream_;
  // Tolerance -> (the largest error / tolerance of a row, where).
  std::map<double, std::pair<double, std::string>> worst_;
};

// ---------------------------------------------------------------------------------------------
// Embedding.

TEST_F(OpsCudaTest, EmbedCopiesTableRowsExactly) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  constexpr int64_t kVocab = 1000;
  for (const int64_t hidden : {int64_t{64}, int64_t{4096}}) {
    for (const ActType act : kActTypes) {
      const std::string what =
          absl::StrCat("embed vocab ", kVocab, " hidden ", hidden, " ", ActName(act));
      SCOPED_TRACE(what);
      const std::vector<float> table = Rounded(act, rng().Uniform(kVocab * hidden, -2, 2));
      // The first and last ids, two outside the table (zero rows), the rest random.
      std::vector<int32_t> tokens = {0, kVocab - 1, -1, kVocab};
      while (tokens.size() < 37) tokens.push_back(static_cast<int32_t>(rng().Int(0, kVocab - 1)));
      std::shuffle(tokens.begin(), tokens.end(), rng().gen());
      const int64_t num_tokens = static_cast<int64_t>(tokens.size());
      std::vector<float> want(num_tokens * hidden, 0.0f);
      for (int64_t t = 0; t < num_tokens; ++t) {
        if (tokens[t] < 0 || tokens[t] >= kVocab) continue;
        std::copy_n(table.begin() + tokens[t] * hidden, hidden, want.begin() + t * hidden);
      }

      // One more row past the table, of sevens: an id of vocab read by mistake shows.
      std::vector<float> padded_table = table;
      padded_table.resize((kVocab + 1) * hidden, 7.0f);
      ASSERT_OK_AND_ASSIGN(DeviceBuffer d_table, Upload(act, padded_table));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer d_tokens, UploadPod(tokens));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned(num_tokens * hidden * sizeof(float)));
      gpu::EmbedArgs a;
      a.num_tokens = num_tokens;
      a.hidden = hidden;
      a.vocab = kVocab;
      a.tokens = d_tokens.as<int32_t>();
      a.table = d_table.data();
      a.table_type = act;
      a.out = d_out.as<float>();
      ASSERT_OK(EmbedCuda(a, stream()));
      ASSERT_OK(Sync());
      ASSERT_OK_AND_ASSIGN(std::vector<float> got, DownloadPod<float>(d_out, num_tokens * hidden));
      EXPECT_TRUE(Identical(got, want, hidden, what));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Residual add + RMSNorm.

TEST_F(OpsCudaTest, AddRmsNormMatchesCpu) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  for (const int64_t rows : {int64_t{1}, int64_t{7}, int64_t{64}}) {
    // Rows a block's threads keep in registers (64, 1000, 4096, 5120) and one too long for that
    // (16384).
    for (const int64_t dim :
         {int64_t{64}, int64_t{1000}, int64_t{4096}, int64_t{5120}, int64_t{16384}}) {
      for (const bool with_delta : {false, true}) {
        for (const ActType act : kActTypes) {
          // Rows of 7: delta and out inside wider rows (a fused buffer), and an eps large enough
          // that misplacing it shows.
          const bool strided = rows == 7;
          const int64_t delta_stride = strided ? dim + 40 : dim;
          const int64_t out_stride = strided ? dim + 24 : dim;
          const float eps = strided ? 0.05f : 1e-6f;
          const std::string what =
              absl::StrCat("add_rms_norm rows ", rows, " dim ", dim, with_delta ? " delta" : "",
                           " delta_stride ", delta_stride, " out_stride ", out_stride, " eps ", eps,
                           " ", ActName(act));
          SCOPED_TRACE(what);
          const std::vector<float> residual = rng().Uniform(rows * dim, -2, 2);  // f32 stream
          // Delta's padding is large: read by mistake, it would swamp the row.
          std::vector<float> delta = rng().Uniform(rows * delta_stride, -2, 2);
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t i = dim; i < delta_stride; ++i) delta[r * delta_stride + i] = 1000.0f;
          }
          delta = Rounded(act, delta);
          const std::vector<float> weight = rng().Uniform(dim, 0.5f, 1.5f);

          std::vector<float> want_residual = residual;
          if (with_delta) {
            for (int64_t r = 0; r < rows; ++r) {
              for (int64_t i = 0; i < dim; ++i) {
                want_residual[r * dim + i] += delta[r * delta_stride + i];
              }
            }
          }
          std::vector<float> want(rows * dim);
          RmsNormParams p;
          p.rows = rows;
          p.dim = dim;
          p.eps = eps;
          p.x = want_residual.data();
          p.weight = weight.data();
          p.out = want.data();
          ASSERT_OK(RmsNormCpu(p));

          const int64_t eb = gpu::ActBytes(act);
          ASSERT_OK_AND_ASSIGN(DeviceBuffer d_residual, UploadPod(residual));
          ASSERT_OK_AND_ASSIGN(DeviceBuffer d_delta, Upload(act, delta));
          ASSERT_OK_AND_ASSIGN(DeviceBuffer d_weight, UploadPod(weight));
          ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned(rows * out_stride * eb));
          gpu::AddRmsNormArgs a;
          a.rows = rows;
          a.dim = dim;
          a.eps = eps;
          a.residual = d_residual.as<float>();
          a.delta = with_delta ? d_delta.data() : nullptr;
          a.delta_stride = strided ? delta_stride : 0;
          a.weight = d_weight.as<float>();
          a.out = d_out.data();
          a.out_stride = strided ? out_stride : 0;
          a.act = act;
          ASSERT_OK(AddRmsNormCuda(a, stream()));
          ASSERT_OK(Sync());

          // The residual update is one f32 add on both sides: exact.
          ASSERT_OK_AND_ASSIGN(std::vector<float> got_residual,
                               DownloadPod<float>(d_residual, rows * dim));
          EXPECT_TRUE(Identical(got_residual, want_residual, dim, what + " residual"));
          ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> out_bytes,
                               DownloadBytes(d_out, rows * out_stride * eb));
          EXPECT_TRUE(PaddingIntact(out_bytes, rows, out_stride * eb, dim * eb, what + " out"));
          EXPECT_TRUE(Near(DecodeRows(act, out_bytes, rows, dim, out_stride), want, dim,
                           Tolerance(act, false), what + " out"));
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Per-head RMSNorm, as Qwen3 runs it on the q and k heads of a fused qkv buffer.

TEST_F(OpsCudaTest, HeadRmsNormMatchesCpu) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  constexpr int64_t kQHeads = 4, kKHeads = 2, kVHeads = 2;
  for (const int64_t num_tokens : {int64_t{5}, int64_t{67}}) {
    for (const int64_t head_dim : {int64_t{16}, int64_t{128}}) {
      for (const ActType act : kActTypes) {
        // A token's row: q heads, k heads, v heads, one head of padding.
        const int64_t stride = (kQHeads + kKHeads + kVHeads + 1) * head_dim;
        const float eps = head_dim == 16 ? 0.05f : 1e-6f;
        const std::string what = absl::StrCat(
            "head_rms_norm tokens ", num_tokens, " q/k heads ", kQHeads, "/", kKHeads, " head_dim ",
            head_dim, " token_stride ", stride, " eps ", eps, " ", ActName(act));
        SCOPED_TRACE(what);
        const std::vector<float> x = Rounded(act, rng().Uniform(num_tokens * stride, -3, 3));
        const std::vector<float> wq = rng().Uniform(head_dim, 0.5f, 1.5f);
        const std::vector<float> wk = rng().Uniform(head_dim, 0.5f, 1.5f);
        std::vector<float> want = x;
        for (int64_t t = 0; t < num_tokens; ++t) {
          for (const auto& [offset, heads, w] : {std::tuple{int64_t{0}, kQHeads, &wq},
                                                 std::tuple{kQHeads * head_dim, kKHeads, &wk}}) {
            RmsNormParams p;
            p.rows = heads;
            p.dim = head_dim;
            p.eps = eps;
            p.x = want.data() + t * stride + offset;
            p.weight = w->data();
            p.out = want.data() + t * stride + offset;
            ASSERT_OK(RmsNormCpu(p));
          }
        }

        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(act, x));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_wq, UploadPod(wq));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_wk, UploadPod(wk));
        gpu::HeadRmsNormArgs a;
        a.num_tokens = num_tokens;
        a.num_heads = kQHeads;
        a.head_dim = head_dim;
        a.eps = eps;
        a.x = d_x.data();
        a.token_stride = stride;
        a.weight = d_wq.as<float>();
        a.act = act;
        ASSERT_OK(HeadRmsNormCuda(a, stream()));
        a.num_heads = kKHeads;
        a.x = At(d_x, act, kQHeads * head_dim);
        a.weight = d_wk.as<float>();
        ASSERT_OK(HeadRmsNormCuda(a, stream()));
        ASSERT_OK(Sync());
        ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> bytes,
                             DownloadBytes(d_x, num_tokens * stride * gpu::ActBytes(act)));
        const std::vector<float> got = DecodeRows(act, bytes, num_tokens, stride, stride);

        // Normalized heads within tolerance; v heads and padding untouched.
        std::vector<float> got_qk, want_qk, got_rest, want_rest;
        for (int64_t i = 0; i < num_tokens * stride; ++i) {
          const bool normed = i % stride < (kQHeads + kKHeads) * head_dim;
          (normed ? got_qk : got_rest).push_back(got[i]);
          (normed ? want_qk : want_rest).push_back(want[i]);
        }
        EXPECT_TRUE(Near(got_qk, want_qk, head_dim, Tolerance(act, false), what));
        EXPECT_TRUE(Identical(got_rest, want_rest, (kVHeads + 1) * head_dim,
                              what + " (v heads and padding must be untouched)"));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding.

TEST_F(OpsCudaTest, RopeMatchesCpu) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  constexpr int64_t kQHeads = 4, kKHeads = 2, kVHeads = 2;
  for (const int64_t head_dim : {int64_t{16}, int64_t{64}, int64_t{128}}) {
    for (const bool llama3 : {false, true}) {
      for (const ActType act : kActTypes) {
        RopeScalingParams scaling;
        double theta = 10000.0;
        if (llama3) {
          scaling.type = RopeScalingParams::Type::kLlama3;
          scaling.factor = 8.0;
          scaling.low_freq_factor = 1.0;
          scaling.high_freq_factor = 4.0;
          scaling.original_max_position_embeddings = 8192;
          theta = 500000.0;
        }
        const int64_t stride = (kQHeads + kKHeads + kVHeads + 1) * head_dim;
        const std::string what = absl::StrCat(
            "rope head_dim ", head_dim, " q/k heads ", kQHeads, "/", kKHeads, " token_stride ",
            stride, llama3 ? " llama3 scaling theta " : " theta ", theta, " ", ActName(act));
        SCOPED_TRACE(what);
        std::vector<int32_t> positions = {0, 1, 4095, 131071, 8191, 8192, 65536};
        while (positions.size() < 11)
          positions.push_back(static_cast<int32_t>(rng().Int(0, 131071)));
        const int64_t num_tokens = static_cast<int64_t>(positions.size());
        std::vector<float> inv_freq(head_dim / 2);
        ComputeRopeInvFreq(head_dim, theta, scaling, inv_freq.data());
        const std::vector<float> x = Rounded(act, rng().Uniform(num_tokens * stride, -2, 2));
        std::vector<float> want = x;
        RopeParams p;
        p.num_tokens = num_tokens;
        p.num_q_heads = kQHeads;
        p.num_k_heads = kKHeads;
        p.head_dim = head_dim;
        p.positions = positions.data();
        p.inv_freq = inv_freq.data();
        p.q = want.data();
        p.q_stride = stride;
        p.k = want.data() + kQHeads * head_dim;
        p.k_stride = stride;
        ASSERT_OK(RopeCpu(p));

        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(act, x));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_positions, UploadPod(positions));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_inv_freq, UploadPod(inv_freq));
        gpu::RopeArgs a;
        a.num_tokens = num_tokens;
        a.num_q_heads = kQHeads;
        a.num_k_heads = kKHeads;
        a.head_dim = head_dim;
        a.positions = d_positions.as<int32_t>();
        a.inv_freq = d_inv_freq.as<float>();
        a.q = d_x.data();
        a.q_stride = stride;
        a.k = At(d_x, act, kQHeads * head_dim);
        a.k_stride = stride;
        a.act = act;
        ASSERT_OK(RopeCuda(a, stream()));
        ASSERT_OK(Sync());
        ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> bytes,
                             DownloadBytes(d_x, num_tokens * stride * gpu::ActBytes(act)));
        const std::vector<float> got = DecodeRows(act, bytes, num_tokens, stride, stride);
        std::vector<float> got_qk, want_qk, got_rest, want_rest;
        for (int64_t i = 0; i < num_tokens * stride; ++i) {
          const bool rotated = i % stride < (kQHeads + kKHeads) * head_dim;
          (rotated ? got_qk : got_rest).push_back(got[i]);
          (rotated ? want_qk : want_rest).push_back(want[i]);
        }
        // Rows of got_qk are one head each: token t, head h is row t * 6 + h (positions[t]).
        EXPECT_TRUE(Near(got_qk, want_qk, head_dim, Tolerance(act, false),
                         what + " (row = token * 6 + head)"));
        EXPECT_TRUE(Identical(got_rest, want_rest, (kVHeads + 1) * head_dim,
                              what + " (v heads and padding must be untouched)"));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// SiLU-mul.

// The fused rotary embedding + KV write does exactly what the two ops do one after the other:
// q and k (in a fused qkv buffer) and both caches equal byte for byte, padding slots (-1)
// untouched.
TEST_F(OpsCudaTest, RopeWriteKvEqualsRopeThenWriteKv) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (ActType t : kActTypes) {
    for (int64_t head_dim : {16, 128}) {
      SCOPED_TRACE(::testing::Message() << ActName(t) << " head_dim " << head_dim);
      const int64_t tokens = 6, qh = 4, kh = 2, bt = 4, blocks = 8;
      const int64_t width = (qh + 2 * kh) * head_dim;
      std::vector<float> qkv(tokens * width);
      for (float& v : qkv) v = RoundTo(t, normal(rng().gen()));
      std::vector<int32_t> pos = {0, 1, 7, 4095, 65536, 3};
      std::vector<int64_t> slots = {5, 0, -1, 31, 12, 20};
      std::vector<float> inv(head_dim / 2);
      ComputeRopeInvFreq(head_dim, 500000.0, RopeScalingParams{}, inv.data());
      auto dpos = UploadPod(pos);
      auto dslots = UploadPod(slots);
      auto dinv = UploadPod(inv);
      ASSERT_TRUE(dpos.ok() && dslots.ok() && dinv.ok());
      std::vector<uint8_t> out[2][3];  // [separate, fused][qkv, k cache, v cache]
      for (int fused = 0; fused < 2; ++fused) {
        auto dqkv = Upload(t, qkv);
        const size_t cache_bytes = blocks * bt * kh * head_dim * gpu::ActBytes(t);
        auto kc = Poisoned(cache_bytes), vc = Poisoned(cache_bytes);
        ASSERT_TRUE(dqkv.ok() && kc.ok() && vc.ok());
        gpu::RopeArgs rope;
        rope.num_tokens = tokens;
        rope.num_q_heads = qh;
        rope.num_k_heads = kh;
        rope.head_dim = head_dim;
        rope.positions = dpos->as<int32_t>();
        rope.inv_freq = dinv->as<float>();
        rope.q = dqkv->data();
        rope.q_stride = width;
        rope.k = At(*dqkv, t, qh * head_dim);
        rope.k_stride = width;
        rope.act = t;
        gpu::WriteKvArgs kv;
        kv.num_tokens = tokens;
        kv.num_kv_heads = kh;
        kv.head_dim = head_dim;
        kv.block_tokens = bt;
        kv.num_blocks = blocks;
        kv.k = rope.k;
        kv.k_stride = width;
        kv.v = At(*dqkv, t, (qh + kh) * head_dim);
        kv.v_stride = width;
        kv.slots = dslots->as<int64_t>();
        kv.k_cache = kc->data();
        kv.v_cache = vc->data();
        kv.act = t;
        if (fused) {
          ASSERT_TRUE(RopeWriteKvCuda(rope, kv, stream()).ok());
        } else {
          ASSERT_TRUE(RopeCuda(rope, stream()).ok());
          ASSERT_TRUE(WriteKvCacheCuda(kv, stream()).ok());
        }
        ASSERT_TRUE(Sync().ok());
        auto a = DownloadBytes(*dqkv, qkv.size() * gpu::ActBytes(t));
        auto b = DownloadBytes(*kc, cache_bytes);
        auto c = DownloadBytes(*vc, cache_bytes);
        ASSERT_TRUE(a.ok() && b.ok() && c.ok());
        out[fused][0] = *a;
        out[fused][1] = *b;
        out[fused][2] = *c;
      }
      EXPECT_TRUE(out[0][0] == out[1][0]) << "q / k after rotation differ";
      EXPECT_TRUE(out[0][1] == out[1][1]) << "k caches differ";
      EXPECT_TRUE(out[0][2] == out[1][2]) << "v caches differ";
    }
  }
  gpu::RopeArgs rope;
  gpu::WriteKvArgs kv;
  rope.num_tokens = kv.num_tokens = 1;
  rope.num_q_heads = 1;
  rope.num_k_heads = kv.num_kv_heads = 1;
  rope.head_dim = kv.head_dim = 16;
  int32_t dummy[64];
  rope.positions = dummy;
  rope.inv_freq = reinterpret_cast<float*>(dummy);
  rope.q = rope.k = dummy;
  rope.q_stride = rope.k_stride = kv.k_stride = kv.v_stride = 32;
  kv.block_tokens = kv.num_blocks = 1;
  kv.k = dummy + 8;  // not rope.k
  kv.v = dummy;
  kv.slots = reinterpret_cast<int64_t*>(dummy);
  kv.k_cache = kv.v_cache = dummy;
  const absl::Status st = RopeWriteKvCuda(rope, kv, stream());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("kv.k must be rope.k"), absl::string_view::npos) << st;
}

TEST_F(OpsCudaTest, SiluMulMatchesCpu) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  for (const int64_t rows : {int64_t{1}, int64_t{33}}) {
    for (const int64_t dim : {int64_t{16}, int64_t{14336}}) {
      for (const ActType act : kActTypes) {
        const std::string what =
            absl::StrCat("silu_mul rows ", rows, " dim ", dim, " ", ActName(act));
        SCOPED_TRACE(what);
        const std::vector<float> in = Rounded(act, rng().Uniform(rows * 2 * dim, -6, 6));
        std::vector<float> want(rows * dim);
        SiluMulParams p;
        p.rows = rows;
        p.dim = dim;
        p.in = in.data();
        p.out = want.data();
        ASSERT_OK(SiluMulCpu(p));

        const int64_t eb = gpu::ActBytes(act);
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_in, Upload(act, in));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned(rows * dim * eb));
        gpu::SiluMulArgs a;
        a.rows = rows;
        a.dim = dim;
        a.in = d_in.data();
        a.out = d_out.data();
        a.act = act;
        ASSERT_OK(SiluMulCuda(a, stream()));
        ASSERT_OK(Sync());
        ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> bytes, DownloadBytes(d_out, rows * dim * eb));
        EXPECT_TRUE(
            Near(DecodeRows(act, bytes, rows, dim, dim), want, dim, Tolerance(act, false), what));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// KV cache writes and paged attention.

void OpsCudaTest::RunAttention(const HeadConfig& hc, const AttentionCase& c, ActType act) {
  const int64_t H = hc.num_heads, KVH = hc.num_kv_heads, D = hc.head_dim;
  const int64_t bt = c.block_tokens, group = H / KVH;
  const int64_t num_seqs = static_cast<int64_t>(c.seqs.size());
  const int64_t eb = gpu::ActBytes(act);
  const std::string base =
      absl::StrCat(c.name, " heads ", H, "/", KVH, " head_dim ", D, " block_tokens ", bt,
                   " window ", c.sliding_window, " ", ActName(act));
  SCOPED_TRACE(base);

  // Block tables: each sequence owns ceil(len / block_tokens) distinct blocks of a shuffled pool;
  // one more entry past its end, and every unused one, names a spare block that is never written
  // (poisoned on the GPU), so a read past a sequence's keys shows.
  int64_t needed = 0, max_blocks = 0, max_len = 0;
  for (const SeqSpec& s : c.seqs) {
    const int64_t len = s.cached + s.fresh;
    needed += (len + bt - 1) / bt;
    max_blocks = std::max(max_blocks, (len + bt - 1) / bt + 1);
    max_len = std::max(max_len, len);
  }
  const int64_t num_blocks = needed + 3;
  std::vector<int32_t> pool(num_blocks);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng().gen());
  std::vector<int32_t> tables(num_seqs * max_blocks, pool[needed]);
  int64_t next = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t len = c.seqs[s].cached + c.seqs[s].fresh;
    for (int64_t b = 0; b * bt < len; ++b) tables[s * max_blocks + b] = pool[next++];
  }
  auto slot_of = [&](int64_t s, int64_t pos) {
    return static_cast<int64_t>(tables[s * max_blocks + pos / bt]) * bt + pos % bt;
  };

  // History: K and V of positions [0, cached), written by an earlier step. The GPU gets one more
  // row with slot -1 (a padding row of a captured graph), which must write nothing.
  const int64_t kv_width = KVH * D;
  std::vector<int64_t> hist_slots;
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t p = 0; p < c.seqs[s].cached; ++p) hist_slots.push_back(slot_of(s, p));
  }
  const int64_t num_hist = static_cast<int64_t>(hist_slots.size());
  const std::vector<float> hist_k = Rounded(act, rng().Uniform((num_hist + 1) * kv_width, -1, 1));
  const std::vector<float> hist_v = Rounded(act, rng().Uniform((num_hist + 1) * kv_width, -1, 1));
  std::vector<int64_t> hist_slots_gpu = hist_slots;
  hist_slots_gpu.push_back(-1);

  // The batch: each sequence's fresh tokens, sequences in shuffled order, in one fused buffer of
  // rows [q heads | k heads | v heads]. Queries are wide enough (scores with a standard deviation
  // near 2) that the softmax is not flat, so a wrongly included or dropped key shows.
  std::vector<int64_t> order(num_seqs);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng().gen());
  std::vector<int32_t> token_seq, token_pos;
  std::vector<int64_t> slots;
  for (const int64_t s : order) {
    for (int64_t p = c.seqs[s].cached; p < c.seqs[s].cached + c.seqs[s].fresh; ++p) {
      token_seq.push_back(static_cast<int32_t>(s));
      token_pos.push_back(static_cast<int32_t>(p));
      slots.push_back(slot_of(s, p));
    }
  }
  const int64_t T = static_cast<int64_t>(token_seq.size());
  const int64_t qkv_width = (H + 2 * KVH) * D;
  std::vector<float> qkv(T * qkv_width);
  {
    const std::vector<float> q = rng().Uniform(T * H * D, -6, 6);
    const std::vector<float> kv = rng().Uniform(T * 2 * kv_width, -1, 1);
    for (int64_t t = 0; t < T; ++t) {
      std::copy_n(q.begin() + t * H * D, H * D, qkv.begin() + t * qkv_width);
      std::copy_n(kv.begin() + t * 2 * kv_width, 2 * kv_width, qkv.begin() + t * qkv_width + H * D);
    }
  }
  qkv = Rounded(act, qkv);

  // CPU reference.
  const int64_t cache_elems = num_blocks * bt * kv_width;
  std::vector<float> k_cache(cache_elems, 0.0f), v_cache(cache_elems, 0.0f);
  WriteKvParams w;
  w.num_tokens = num_hist;
  w.num_kv_heads = KVH;
  w.head_dim = D;
  w.block_tokens = bt;
  w.num_blocks = num_blocks;
  w.k = hist_k.data();
  w.v = hist_v.data();
  w.slots = hist_slots.data();
  w.k_cache = k_cache.data();
  w.v_cache = v_cache.data();
  ASSERT_OK(WriteKvCacheCpu(w));
  w.num_tokens = T;
  w.k = qkv.data() + H * D;
  w.k_stride = qkv_width;
  w.v = qkv.data() + (H + KVH) * D;
  w.v_stride = qkv_width;
  w.slots = slots.data();
  ASSERT_OK(WriteKvCacheCpu(w));
  std::vector<float> want(T * H * D);
  PagedAttentionParams p;
  p.num_tokens = T;
  p.num_heads = H;
  p.num_kv_heads = KVH;
  p.head_dim = D;
  p.scale = 1.0f / std::sqrt(static_cast<float>(D));
  p.sliding_window = c.sliding_window;
  p.q = qkv.data();
  p.q_stride = qkv_width;
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.block_tokens = bt;
  p.num_blocks = num_blocks;
  p.token_seq = token_seq.data();
  p.token_pos = token_pos.data();
  p.block_tables = tables.data();
  p.num_seqs = num_seqs;
  p.max_blocks_per_seq = max_blocks;
  p.out = want.data();
  ASSERT_OK(PagedAttentionCpu(p));

  // GPU: poisoned caches, the history write (with its padding row), then the batch's write.
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k_cache, Poisoned(cache_elems * eb));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_v_cache, Poisoned(cache_elems * eb));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_hist_k, Upload(act, hist_k));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_hist_v, Upload(act, hist_v));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_hist_slots, UploadPod(hist_slots_gpu));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_qkv, Upload(act, qkv));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_slots, UploadPod(slots));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_token_seq, UploadPod(token_seq));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_token_pos, UploadPod(token_pos));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_tables, UploadPod(tables));
  gpu::WriteKvArgs wa;
  wa.num_tokens = num_hist + 1;
  wa.num_kv_heads = KVH;
  wa.head_dim = D;
  wa.block_tokens = bt;
  wa.num_blocks = num_blocks;
  wa.k = d_hist_k.data();
  wa.k_stride = kv_width;
  wa.v = d_hist_v.data();
  wa.v_stride = kv_width;
  wa.slots = d_hist_slots.as<int64_t>();
  wa.k_cache = d_k_cache.data();
  wa.v_cache = d_v_cache.data();
  wa.act = act;
  ASSERT_OK(WriteKvCacheCuda(wa, stream()));
  wa.num_tokens = T;
  wa.k = At(d_qkv, act, H * D);
  wa.k_stride = qkv_width;
  wa.v = At(d_qkv, act, (H + KVH) * D);
  wa.v_stride = qkv_width;
  wa.slots = d_slots.as<int64_t>();
  ASSERT_OK(WriteKvCacheCuda(wa, stream()));
  ASSERT_OK(Sync());

  // The caches: every written slot holds exactly the CPU's values, every other byte the poison.
  {
    std::vector<bool> written(num_blocks * bt, false);
    for (const int64_t s : hist_slots) written[s] = true;
    for (const int64_t s : slots) written[s] = true;
    const int64_t slot_bytes = kv_width * eb;
    for (const auto& [cpu, gpu_cache, name] : {std::tuple{&k_cache, &d_k_cache, "k_cache"},
                                               std::tuple{&v_cache, &d_v_cache, "v_cache"}}) {
      std::vector<uint8_t> want_bytes = Encode(act, *cpu);
      for (int64_t s = 0; s < num_blocks * bt; ++s) {
        if (!written[s]) std::memset(&want_bytes[s * slot_bytes], 0xff, slot_bytes);
      }
      ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> got_bytes,
                           DownloadBytes(*gpu_cache, want_bytes.size()));
      int64_t bad_slots = 0, first_bad = -1;
      for (int64_t s = 0; s < num_blocks * bt; ++s) {
        if (std::memcmp(&got_bytes[s * slot_bytes], &want_bytes[s * slot_bytes], slot_bytes) != 0) {
          if (bad_slots++ == 0) first_bad = s;
        }
      }
      EXPECT_EQ(bad_slots, 0) << base << " write_kv: " << name << " differs in " << bad_slots
                              << " slots, first slot " << first_bad << " (block "
                              << (first_bad >= 0 ? first_bad / bt : -1) << ", row "
                              << (first_bad >= 0 ? first_bad % bt : -1) << "), which "
                              << (first_bad >= 0 && written[first_bad] ? "was" : "was not")
                              << " written";
    }
  }

  // Attention, with a padded output row stride.
  const int64_t out_stride = H * D + 8;
  gpu::PagedAttentionArgs a;
  a.num_tokens = T;
  a.num_heads = H;
  a.num_kv_heads = KVH;
  a.head_dim = D;
  a.scale = p.scale;
  a.sliding_window = c.sliding_window;
  a.q = d_qkv.data();
  a.q_stride = qkv_width;
  a.k_cache = d_k_cache.data();
  a.v_cache = d_v_cache.data();
  a.block_tokens = bt;
  a.num_blocks = num_blocks;
  a.token_seq = d_token_seq.as<int32_t>();
  a.token_pos = d_token_pos.as<int32_t>();
  a.block_tables = d_tables.as<int32_t>();
  a.num_seqs = num_seqs;
  a.max_blocks_per_seq = max_blocks;
  a.out_stride = out_stride;
  a.act = act;

  std::vector<Split> variants = {Split::kNone};
  if (c.split != Split::kNone) {
    variants.push_back(c.split);
    variants.push_back(Split::kCapacity);
  }
  // Every kernel these arguments can take: the tiled one always; the decode kernel for one tile
  // per token and a group of at most 8; the tensor-core one for planned tiles in f16 and bf16,
  // with tiles of its own size, through wmma and through mma.sync.
  // The decode kernel's one-block build exists for 16-bit head_dim 128 only.
  enum class Kernel { kTiled, kDecode, kDecodeOneBlock, kMma, kMmaSync };
  std::vector<Kernel> kernels = {Kernel::kTiled};
  if (!c.plan_tiles && group <= 8) kernels.push_back(Kernel::kDecode);
  if (!c.plan_tiles && group <= 8 && D == 128 && act != ActType::kF32) {
    kernels.push_back(Kernel::kDecodeOneBlock);
  }
  if (c.plan_tiles && AttentionMmaRunsHere(act, D, group)) {
    kernels.push_back(Kernel::kMma);
    kernels.push_back(Kernel::kMmaSync);
  }
  for (const Kernel kernel : kernels) {
    const bool decode_kernel = kernel == Kernel::kDecode || kernel == Kernel::kDecodeOneBlock;
    const bool mma = kernel == Kernel::kMma || kernel == Kernel::kMmaSync;
    std::vector<int32_t> tiles;
    int64_t tile_tokens = 1, num_tiles = T;
    if (c.plan_tiles) {
      tile_tokens = mma ? AttentionMmaTileTokens(group) : AttentionTileTokens(D, group);
      tiles = PlanAttentionTiles(token_seq, token_pos, tile_tokens);
      num_tiles = static_cast<int64_t>(tiles.size()) / 2;
    }
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_tiles, UploadPod(tiles));
    a.tiles = c.plan_tiles ? d_tiles.as<int32_t>() : nullptr;
    a.num_tiles = num_tiles;
    a.tile_tokens = tile_tokens;
    for (const Split split : variants) {
      a.decode_kernel = decode_kernel;
      a.mma_prefill = mma;
      a.mma_sync = kernel == Kernel::kMmaSync;
      a.decode_one_block = kernel == Kernel::kDecodeOneBlock;
      a.num_partitions = 1;
      a.partition_keys = 0;
      a.workspace = nullptr;
      a.counters = nullptr;
      const int64_t unit = decode_kernel ? 64 : 128;
      if (split == Split::kChosen) {
        ChooseAttentionPartitions(max_len, /*multiprocessors=*/132, &a);
        EXPECT_GT(a.num_partitions, 1) << base << ": ChooseAttentionPartitions(" << max_len
                                       << ", 132) kept one partition for " << num_tiles << " tiles";
      } else if (split == Split::kEvery128) {
        a.partition_keys = unit;
        a.num_partitions = (max_len + unit - 1) / unit;
      } else if (split == Split::kCapacity) {
        // As a decode graph captured for a longer context plans it: more partitions than the keys
        // need, which the kernel leaves unused.
        a.partition_keys = unit;
        a.num_partitions = 4 * ((max_len + unit - 1) / unit) + 3;
      }
      EXPECT_EQ(gpu::PagedAttentionUsesDecodeKernel(a), decode_kernel);
      EXPECT_EQ(gpu::PagedAttentionUsesMmaKernel(a), mma);
      const char* kernel_name = kernel == Kernel::kDecode           ? " decode kernel"
                                : kernel == Kernel::kDecodeOneBlock ? " decode kernel (one block)"
                                : kernel == Kernel::kMma            ? " tensor-core kernel (wmma)"
                                : kernel == Kernel::kMmaSync ? " tensor-core kernel (mma.sync)"
                                                             : " tiled kernel";
      const std::string what = absl::StrCat(base, kernel_name, " tokens ", T, " tiles ", num_tiles,
                                            " (tile_tokens ", tile_tokens, ") partitions ",
                                            a.num_partitions, " x ", a.partition_keys, " keys");
      SCOPED_TRACE(what);
      DeviceBuffer d_workspace, d_counters;
      if (a.num_partitions > 1) {
        ASSERT_OK_AND_ASSIGN(d_workspace,
                             Poisoned(PagedAttentionWorkspaceFloats(a) * sizeof(float)));
        a.workspace = d_workspace.as<float>();
        if (decode_kernel) {
          ASSERT_OK_AND_ASSIGN(d_counters, UploadPod(std::vector<uint32_t>(num_tiles * KVH, 0)));
          a.counters = d_counters.as<uint32_t>();
        }
      }
      ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned(T * out_stride * eb));
      a.out = d_out.data();
      ASSERT_OK(PagedAttentionCuda(a, stream()));
      ASSERT_OK(Sync());
      ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> out_bytes,
                           DownloadBytes(d_out, T * out_stride * eb));
      EXPECT_TRUE(PaddingIntact(out_bytes, T, out_stride * eb, H * D * eb, what));
      // Row r of the comparison is token r / H, head r % H.
      EXPECT_TRUE(Near(DecodeRows(act, out_bytes, T, H * D, out_stride), want, D,
                       Tolerance(act, true), what + " (row = token * num_heads + head)"));
      if (a.counters != nullptr) {
        // Every merge reset its counter, ready for the next launch (a graph replays with them).
        ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> counters,
                             DownloadBytes(d_counters, num_tiles * KVH * sizeof(uint32_t)));
        EXPECT_EQ(counters, std::vector<uint8_t>(counters.size(), 0)) << "counters left nonzero";
        // And a second launch on the same counters gives the same output.
        ASSERT_OK(PagedAttentionCuda(a, stream()));
        ASSERT_OK(Sync());
        ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> again, DownloadBytes(d_out, T * out_stride * eb));
        EXPECT_EQ(again, out_bytes) << "a second launch differs";
      }
    }
  }
}

TEST_F(OpsCudaTest, WriteKvAndPagedAttentionMatchCpu) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  const std::vector<AttentionCase> cases = {
      // Whole prompts in one batch, planned tiles.
      {"prefill", {{0, 1}, {0, 17}, {0, 100}}, true, 16, 0, Split::kNone},
      {"prefill", {{0, 1}, {0, 17}, {0, 100}}, true, 8, 32, Split::kNone},
      // Longer prompts: the tensor-core kernel's full 64-row tiles over several 64-key steps,
      // a window that cuts steps mid-way, and a prompt that ends mid-tile.
      {"prefill_long", {{0, 300}, {0, 75}}, true, 16, 0, Split::kNone},
      {"prefill_long", {{0, 300}, {0, 75}}, true, 16, 100, Split::kNone},
      // One query per sequence at its last position, one tile per token; split-K as the engine
      // chooses it for long contexts.
      {"decode", {{0, 1}, {14, 1}, {15, 1}, {299, 1}, {699, 1}}, false, 16, 0, Split::kChosen},
      {"decode", {{0, 1}, {14, 1}, {15, 1}, {299, 1}, {699, 1}}, false, 8, 32, Split::kChosen},
      // Long contexts: the decode kernel stages block-table entries a range at a time.
      {"decode_long", {{2600, 1}, {3, 1}}, false, 8, 0, Split::kChosen},
      // A window that starts mid-block, so a staged range of block-table entries does too.
      {"decode_long", {{2600, 1}, {3, 1}}, false, 8, 300, Split::kChosen},
      // Over 64 partitions of 64 keys (with kCapacity's plan): the decode kernel's last block
      // merges them from the workspace alone instead of through its shared-memory weights.
      {"decode_longer", {{4500, 1}}, false, 8, 0, Split::kChosen},
      // A chunk of a prompt after cached tokens, with a decode sequence in the same batch.
      {"chunked_prefill", {{50, 30}, {9, 1}}, true, 16, 0, Split::kNone},
      // The same with partitions of 128 keys: the chunk's tiles straddle the boundary at 256.
      {"chunked_prefill", {{250, 30}, {40, 1}}, true, 16, 0, Split::kEvery128},
      // And with a window that starts mid-partition.
      {"chunked_prefill", {{250, 30}, {40, 1}}, true, 16, 100, Split::kEvery128},
      // A long chunk after a long cached prefix, split as the engine chooses for few tiles.
      {"chunked_prefill", {{600, 40}}, true, 16, 0, Split::kChosen},
  };
  const HeadConfig heads[] = {{4, 2, 16}, {16, 4, 32}, {8, 8, 64}, {32, 8, 128}, {8, 1, 256}};
  for (const AttentionCase& c : cases) {
    for (const HeadConfig& hc : heads) {
      for (const ActType act : kActTypes) {
        RunAttention(hc, c, act);
        if (HasFatalFailure()) return;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Greedy argmax and its log-probability.

TEST_F(OpsCudaTest, ArgmaxMatchesCpu) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  constexpr int64_t kRows = 5;
  // 1001: not a multiple of 4 (the kernel's element-by-element walk); 1004 with rows 1005 apart:
  // a multiple of 4 whose rows after the first are not aligned for the grouped loads.
  for (const int64_t vocab : {int64_t{1001}, int64_t{1004}, int64_t{2048}, int64_t{128256}}) {
    for (const ActType act : kActTypes) {
      const int64_t ld = vocab == 2048 ? vocab + 64 : vocab == 1004 ? vocab + 1 : vocab;
      const std::string what =
          absl::StrCat("argmax rows ", kRows, " vocab ", vocab, " ld ", ld, " ", ActName(act));
      SCOPED_TRACE(what);
      std::vector<float> logits = rng().Uniform(kRows * ld, -8, 8);
      // Row 0 random; row 1 its maximum at two random indices (the lower wins); row 2 its maximum
      // at the last index; row 3 tied at the first and the last; row 4 tied at two indices one
      // thread of the grouped walk visits (1 and 1 + 4 x 1024, the kernel's block). Padding past
      // vocab is larger than everything: read by mistake, it wins.
      const int64_t i1 = rng().Int(0, vocab - 2), i2 = rng().Int(i1 + 1, vocab - 1);
      logits[1 * ld + i1] = logits[1 * ld + i2] = 9.5f;
      logits[2 * ld + vocab - 1] = 9.5f;
      logits[3 * ld + 0] = logits[3 * ld + vocab - 1] = 9.5f;
      logits[4 * ld + 1] = logits[4 * ld + (vocab > 4097 ? 4097 : vocab - 2)] = 9.5f;
      for (int64_t r = 0; r < kRows; ++r) {
        for (int64_t i = vocab; i < ld; ++i) logits[r * ld + i] = 100.0f;
      }
      logits = Rounded(act, logits);
      std::vector<int32_t> want_token(kRows);
      std::vector<double> want_logprob(kRows);
      for (int64_t r = 0; r < kRows; ++r) {
        const float* row = logits.data() + r * ld;
        int64_t best = 0;
        for (int64_t i = 1; i < vocab; ++i) {
          if (row[i] > row[best]) best = i;
        }
        double sum = 0;
        for (int64_t i = 0; i < vocab; ++i) {
          sum += std::exp(static_cast<double>(row[i]) - row[best]);
        }
        want_token[r] = static_cast<int32_t>(best);
        want_logprob[r] = -std::log(sum);
      }

      ASSERT_OK_AND_ASSIGN(DeviceBuffer d_logits, Upload(act, logits));
      for (const bool with_logprob : {true, false}) {
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_token, Poisoned(kRows * sizeof(int32_t)));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_logprob, Poisoned(kRows * sizeof(float)));
        gpu::ArgmaxArgs a;
        a.rows = kRows;
        a.vocab = vocab;
        a.logits = d_logits.data();
        a.ld = ld == vocab ? 0 : ld;
        a.type = act;
        a.token = d_token.as<int32_t>();
        a.logprob = with_logprob ? d_logprob.as<float>() : nullptr;
        ASSERT_OK(ArgmaxCuda(a, stream()));
        ASSERT_OK(Sync());
        ASSERT_OK_AND_ASSIGN(std::vector<int32_t> token, DownloadPod<int32_t>(d_token, kRows));
        ASSERT_OK_AND_ASSIGN(std::vector<float> logprob, DownloadPod<float>(d_logprob, kRows));
        for (int64_t r = 0; r < kRows; ++r) {
          const int32_t got = token[r];
          EXPECT_EQ(got, want_token[r])
              << what << " row " << r << (with_logprob ? "" : " (no logprob)") << ": logit "
              << (got >= 0 && got < ld ? logits[r * ld + got] : NAN) << " at the GPU's choice, "
              << logits[r * ld + want_token[r]] << " at the lowest index of the maximum";
          if (with_logprob) {
            EXPECT_NEAR(logprob[r], want_logprob[r], kLogprobAbsTol) << what << " row " << r;
          }
        }
        if (!with_logprob) {
          int64_t written = 0;
          for (const float v : logprob) written += !std::isnan(v);
          EXPECT_EQ(written, 0) << what << ": logprob written although null";
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// cuBLASLt GEMM.

TEST_F(OpsCudaTest, GemmMatchesMatMulCpu) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CublasLtGemm> gemm, CublasLtGemm::Create());
  constexpr int64_t kMaxM = 64;
  struct Nk {
    int64_t n, k;
  };
  for (const Nk nk : {Nk{64, 32}, Nk{4096, 4096}, Nk{1000, 256}}) {
    const int64_t n = nk.n, k = nk.k;
    const std::vector<float> x = rng().Uniform(kMaxM * k, -1, 1);
    const std::vector<float> w = rng().Uniform(n * k, -1, 1);
    const std::vector<float> bias = rng().Uniform(n, -1, 1);
    for (const ActType act : kActTypes) {
      // The reference for all 64 rows once; smaller m take its first rows.
      const std::vector<float> xr = Rounded(act, x), wr = Rounded(act, w);
      std::vector<float> ref(kMaxM * n);
      MatMulParams mp;
      mp.m = kMaxM;
      mp.n = n;
      mp.k = k;
      mp.x = xr.data();
      mp.w = wr.data();
      mp.w_dtype = DType::kF32;
      mp.y = ref.data();
      std::vector<uint8_t> workspace(MatMulCpuWorkspaceBytes(mp));
      ASSERT_OK(MatMulCpu(mp, workspace.data(), workspace.size()));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer d_w, Upload(act, wr));

      std::vector<ActType> out_types = {ActType::kF32};
      if (act != ActType::kF32) out_types.push_back(act);
      for (const ActType out_type : out_types) {
        const int64_t ob = gpu::ActBytes(out_type);
        const std::vector<float> bias_r = Rounded(out_type, bias);
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_bias, Upload(out_type, bias_r));
        for (const bool with_bias : {false, true}) {
          for (const int64_t m : {int64_t{1}, int64_t{7}, kMaxM}) {
            // m = 7 reads x from and writes y into wider rows; x's padding is large, so reading it
            // shows.
            const int64_t ldx = m == 7 ? k + 8 : k, ldy = m == 7 ? n + 8 : n;
            std::vector<float> xs(m * ldx, 1e4f);
            for (int64_t r = 0; r < m; ++r) {
              std::copy_n(xr.begin() + r * k, k, xs.begin() + r * ldx);
            }
            ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(act, Rounded(act, xs)));
            std::vector<float> want(ref.begin(), ref.begin() + m * n);
            if (with_bias) {
              for (int64_t r = 0; r < m; ++r) {
                for (int64_t j = 0; j < n; ++j) want[r * n + j] += bias_r[j];
              }
            }
            // Decode-sized m both through cuBLASLt and through the small-m GEMV route.
            for (const bool gemv : {false, true}) {
              if (gemv && m > 8) continue;
              gemm->set_small_m_gemv(gemv);
              const std::string what =
                  absl::StrCat("gemm m ", m, " n ", n, " k ", k, " ldx ", ldx, " ldy ", ldy,
                               " act ", ActName(act), " out ", ActName(out_type),
                               with_bias ? " bias" : "", gemv ? " small-m gemv" : " cublasLt");
              SCOPED_TRACE(what);
              ASSERT_OK_AND_ASSIGN(DeviceBuffer d_y, Poisoned(m * ldy * ob));
              GemmArgs g;
              g.m = m;
              g.n = n;
              g.k = k;
              g.x = d_x.data();
              g.ldx = ldx == k ? 0 : ldx;
              g.w = d_w.data();
              g.bias = with_bias ? d_bias.data() : nullptr;
              g.y = d_y.data();
              g.ldy = ldy == n ? 0 : ldy;
              g.act = act;
              g.out_type = out_type;
              ASSERT_OK(gemm->Run(g, stream()));
              ASSERT_OK(Sync());
              ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> y_bytes, DownloadBytes(d_y, m * ldy * ob));
              EXPECT_TRUE(PaddingIntact(y_bytes, m, ldy * ob, n * ob, what));
              EXPECT_TRUE(Near(DecodeRows(out_type, y_bytes, m, n, ldy), want, n,
                               Tolerance(out_type, true), what));
            }
            gemm->set_small_m_gemv(false);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The launchers without a checked wrapper: row gather, type conversion, seeded normal fill.

TEST_F(OpsCudaTest, GatherRowsAndConvertAreExact) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed_);
  for (const ActType t : kActTypes) {
    const std::string what = absl::StrCat("gather_rows ", ActName(t));
    SCOPED_TRACE(what);
    constexpr int64_t kSrcRows = 10, kWidth = 32, kLdSrc = 40, kLdDst = 36;
    const std::vector<float> src = Rounded(t, rng().Uniform(kSrcRows * kLdSrc, -5, 5));
    const std::vector<int32_t> rows = {3, 0, 9, 3};
    const int64_t n = static_cast<int64_t>(rows.size());
    std::vector<float> want(n * kWidth);
    for (int64_t i = 0; i < n; ++i) {
      std::copy_n(src.begin() + rows[i] * kLdSrc, kWidth, want.begin() + i * kWidth);
    }
    const int64_t eb = gpu::ActBytes(t);
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_src, Upload(t, src));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_rows, UploadPod(rows));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_dst, Poisoned(n * kLdDst * eb));
    gpu::GatherRowsArgs a;
    a.num_rows = n;
    a.width = kWidth;
    a.src = d_src.data();
    a.ld_src = kLdSrc;
    a.rows = d_rows.as<int32_t>();
    a.dst = d_dst.data();
    a.ld_dst = kLdDst;
    a.type = t;
    ASSERT_EQ(gpu::LaunchGatherRows(a, stream()), cudaSuccess);
    ASSERT_OK(Sync());
    ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> bytes, DownloadBytes(d_dst, n * kLdDst * eb));
    EXPECT_TRUE(PaddingIntact(bytes, n, kLdDst * eb, kWidth * eb, what));
    EXPECT_TRUE(Identical(DecodeRows(t, bytes, n, kWidth, kLdDst), want, kWidth, what));
  }
  // Every pair of types: the input's values rounded once more to the output type (round to
  // nearest even on both sides), over a grid-stride loop's worth of elements.
  constexpr int64_t kN = 300001;
  for (const ActType in_t : kActTypes) {
    for (const ActType out_t : kActTypes) {
      const std::string what = absl::StrCat("convert ", ActName(in_t), " -> ", ActName(out_t));
      SCOPED_TRACE(what);
      const std::vector<float> in = Rounded(in_t, rng().Uniform(kN, -300, 300));
      const std::vector<float> want = Rounded(out_t, in);
      ASSERT_OK_AND_ASSIGN(DeviceBuffer d_in, Upload(in_t, in));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned(kN * gpu::ActBytes(out_t)));
      ASSERT_EQ(gpu::LaunchConvert(d_in.data(), in_t, d_out.data(), out_t, kN, stream()),
                cudaSuccess);
      ASSERT_OK(Sync());
      ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> bytes,
                           DownloadBytes(d_out, kN * gpu::ActBytes(out_t)));
      EXPECT_TRUE(Identical(DecodeRows(out_t, bytes, 1, kN, kN), want, kN, what));
    }
  }
}

TEST_F(OpsCudaTest, RandomNormalIsSeededAndNormal) {
  constexpr int64_t kN = (1 << 20) + 3;
  constexpr float kMean = 0.5f, kStddev = 2.0f;
  for (const ActType t : kActTypes) {
    SCOPED_TRACE(ActName(t));
    const int64_t eb = gpu::ActBytes(t);
    auto draw = [&](uint64_t seed, std::vector<uint8_t>* out) {
      ASSERT_OK_AND_ASSIGN(DeviceBuffer d, Poisoned(kN * eb));
      ASSERT_EQ(gpu::LaunchRandomNormal(d.data(), t, kN, kMean, kStddev, seed, stream()),
                cudaSuccess);
      ASSERT_OK(Sync());
      ASSERT_OK_AND_ASSIGN(*out, DownloadBytes(d, kN * eb));
    };
    std::vector<uint8_t> a, b, c;
    ASSERT_NO_FATAL_FAILURE(draw(42, &a));
    ASSERT_NO_FATAL_FAILURE(draw(42, &b));
    ASSERT_NO_FATAL_FAILURE(draw(43, &c));
    EXPECT_TRUE(a == b) << "the same seed gave different values";
    EXPECT_FALSE(a == c) << "seeds 42 and 43 gave the same values";
    const std::vector<float> v = DecodeRows(t, a, 1, kN, kN);
    double sum = 0, sum2 = 0;
    int64_t non_finite = 0;
    for (const float x : v) {
      non_finite += !std::isfinite(x);
      sum += x;
      sum2 += static_cast<double>(x) * x;
    }
    ASSERT_EQ(non_finite, 0);
    const double mean = sum / kN, stddev = std::sqrt(sum2 / kN - mean * mean);
    // Standard errors: 2 / 1024 for the mean, 2 / 1448 for the deviation; 5 of them, plus bf16's
    // rounding of each value.
    EXPECT_NEAR(mean, kMean, 0.012);
    EXPECT_NEAR(stddev, kStddev, 0.012);
  }
}

// ---------------------------------------------------------------------------------------------
// Argument validation: refused with INVALID_ARGUMENT naming the problem, before any launch.

TEST_F(OpsCudaTest, BadArgumentsAreRefusedBeforeLaunch) {
  // Every pointer points into a zeroed guard buffer, so a launch that slipped through would read
  // sane values and write into it.
  constexpr size_t kGuardBytes = 1 << 20;
  ASSERT_OK_AND_ASSIGN(DeviceBuffer guard, DeviceBuffer::Allocate(kGuardBytes));
  ASSERT_OK(guard.Fill(0));
  ASSERT_OK(Settle());
  void* g = guard.data();
  float* gf = guard.as<float>();
  int32_t* gi = guard.as<int32_t>();

  auto refused = [](const absl::Status& s, absl::string_view needle) -> ::testing::AssertionResult {
    if (s.code() == absl::StatusCode::kInvalidArgument &&
        s.message().find(needle) != absl::string_view::npos) {
      return ::testing::AssertionSuccess();
    }
    return ::testing::AssertionFailure()
           << "want INVALID_ARGUMENT naming \"" << needle << "\", got " << s;
  };

  gpu::PagedAttentionArgs pa;
  pa.num_tokens = 1;
  pa.num_heads = 2;
  pa.num_kv_heads = 1;
  pa.head_dim = 64;
  pa.q = pa.k_cache = pa.v_cache = g;
  pa.q_stride = pa.out_stride = 128;
  pa.block_tokens = 16;
  pa.num_blocks = 1;
  pa.token_seq = pa.token_pos = pa.block_tables = gi;
  pa.num_seqs = 1;
  pa.max_blocks_per_seq = 1;
  pa.out = g;
  pa.num_tiles = 1;
  {
    gpu::PagedAttentionArgs a = pa;
    a.head_dim = 48;
    a.q_stride = a.out_stride = 96;
    EXPECT_TRUE(refused(PagedAttentionCuda(a, stream()), "head_dim"));
  }
  {
    gpu::PagedAttentionArgs a = pa;
    a.num_heads = 6;
    a.num_kv_heads = 4;
    a.q_stride = a.out_stride = 6 * 64;
    EXPECT_TRUE(refused(PagedAttentionCuda(a, stream()), "multiple of num_kv_heads"));
  }
  {
    gpu::PagedAttentionArgs a = pa;
    a.q_stride = 64;
    EXPECT_TRUE(refused(PagedAttentionCuda(a, stream()), "q_stride"));
  }
  {
    // 8 tokens x a group of 4 = 32 query rows; a block holds 16 at head_dim 128.
    gpu::PagedAttentionArgs a = pa;
    a.num_tokens = 8;
    a.num_heads = 8;
    a.num_kv_heads = 2;
    a.head_dim = 128;
    a.q_stride = a.out_stride = 8 * 128;
    a.tiles = gi;
    a.num_tiles = 1;
    a.tile_tokens = 8;
    EXPECT_TRUE(refused(PagedAttentionCuda(a, stream()), "tile_tokens"));
  }
  {
    gpu::PagedAttentionArgs a = pa;
    a.num_tokens = 3;
    a.num_tiles = 2;  // without tiles, one per token
    EXPECT_TRUE(refused(PagedAttentionCuda(a, stream()), "num_tiles"));
  }
  {
    gpu::PagedAttentionArgs a = pa;
    a.num_partitions = 2;
    a.partition_keys = 100;
    a.workspace = gf;
    EXPECT_TRUE(refused(PagedAttentionCuda(a, stream()), "partition_keys"));
    // The decode kernel's split-K counts finished partitions, and its loads are 16 bytes wide.
    a.partition_keys = 64;
    a.decode_kernel = true;
    EXPECT_TRUE(refused(PagedAttentionCuda(a, stream()), "counters"));
    gpu::PagedAttentionArgs b = pa;
    b.decode_kernel = true;
    b.q = static_cast<const char*>(pa.q) + 4;
    EXPECT_TRUE(refused(PagedAttentionCuda(b, stream()), "16-byte aligned"));
    b = pa;
    b.decode_kernel = true;
    b.v_cache = static_cast<const char*>(pa.v_cache) + 8;
    EXPECT_TRUE(refused(PagedAttentionCuda(b, stream()), "16-byte aligned"));
    a.partition_keys = 128;
    a.workspace = nullptr;
    EXPECT_TRUE(refused(PagedAttentionCuda(a, stream()), "workspace"));
  }

  gpu::AddRmsNormArgs rn;
  rn.rows = 2;
  rn.dim = 64;
  rn.residual = gf;
  rn.weight = gf;
  rn.out = g;
  rn.out_stride = 63;
  EXPECT_TRUE(refused(AddRmsNormCuda(rn, stream()), "out_stride"));
  rn.out_stride = 0;
  rn.delta = g;
  rn.delta_stride = 32;
  EXPECT_TRUE(refused(AddRmsNormCuda(rn, stream()), "delta_stride"));

  gpu::HeadRmsNormArgs hn;
  hn.num_tokens = 2;
  hn.num_heads = 4;
  hn.head_dim = 16;
  hn.x = g;
  hn.token_stride = 63;
  hn.weight = gf;
  EXPECT_TRUE(refused(HeadRmsNormCuda(hn, stream()), "token_stride"));

  gpu::RopeArgs ro;
  ro.num_tokens = 1;
  ro.num_q_heads = 1;
  ro.num_k_heads = 1;
  ro.positions = gi;
  ro.inv_freq = gf;
  ro.q = ro.k = g;
  for (const int64_t head_dim : {int64_t{7}, int64_t{2048}}) {
    ro.head_dim = head_dim;
    ro.q_stride = ro.k_stride = head_dim;
    EXPECT_TRUE(refused(RopeCuda(ro, stream()), "head_dim")) << "head_dim " << head_dim;
  }

  gpu::WriteKvArgs wk;
  wk.num_tokens = 1;
  wk.num_kv_heads = 2;
  wk.head_dim = 16;
  wk.block_tokens = 16;
  wk.num_blocks = 1;
  wk.k = wk.v = g;
  wk.k_stride = 32;
  wk.v_stride = 31;
  wk.slots = guard.as<int64_t>();
  wk.k_cache = wk.v_cache = g;
  EXPECT_TRUE(refused(WriteKvCacheCuda(wk, stream()), "v_stride"));

  gpu::ArgmaxArgs am;
  am.rows = 1;
  am.vocab = 100;
  am.logits = g;
  am.ld = 99;
  am.token = gi;
  EXPECT_TRUE(refused(ArgmaxCuda(am, stream()), "ld below vocab"));

  gpu::EmbedArgs em;
  em.num_tokens = 1;
  em.hidden = 0;
  em.vocab = 10;
  em.tokens = gi;
  em.table = g;
  em.out = gf;
  EXPECT_TRUE(refused(EmbedCuda(em, stream()), "bad shape"));

  gpu::SiluMulArgs sm;
  sm.rows = 1;
  sm.dim = 16;
  sm.in = g;
  EXPECT_TRUE(refused(SiluMulCuda(sm, stream()), "must be set"));

  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CublasLtGemm> gemm, CublasLtGemm::Create(1 << 20));
  GemmArgs ge;
  ge.m = 4;
  ge.n = 0;
  ge.k = 64;
  ge.x = ge.w = g;
  ge.y = g;
  EXPECT_TRUE(refused(gemm->Run(ge, stream()), "n=0"));
  ge.n = 64;
  ge.ldy = 32;
  EXPECT_TRUE(refused(gemm->Run(ge, stream()), "ldy"));
  ge.ldy = 0;
  ge.ldx = 32;
  EXPECT_TRUE(refused(gemm->Run(ge, stream()), "ldx"));

  // Empty batches are fine without any pointers.
  gpu::AddRmsNormArgs empty_rn;
  empty_rn.dim = 64;
  EXPECT_TRUE(AddRmsNormCuda(empty_rn, stream()).ok());
  gpu::PagedAttentionArgs empty_pa;
  empty_pa.num_heads = empty_pa.num_kv_heads = 1;
  empty_pa.head_dim = 64;
  EXPECT_TRUE(PagedAttentionCuda(empty_pa, stream()).ok());
  GemmArgs empty_ge;
  empty_ge.n = empty_ge.k = 64;
  EXPECT_TRUE(gemm->Run(empty_ge, stream()).ok());

  // Nothing ran: the stream is clean and the guard still zero.
  ASSERT_OK(Sync());
  ASSERT_OK(Settle());
  ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> bytes, DownloadBytes(guard, kGuardBytes));
  EXPECT_EQ(std::count(bytes.begin(), bytes.end(), 0), static_cast<int64_t>(kGuardBytes))
      << "a refused call wrote into the guard buffer";
}

#else  // !STRATA_HAVE_CUDA

TEST(OpsCudaTest, SkippedWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace strata
