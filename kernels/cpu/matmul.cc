#include "kernels/matmul.h"

#include <cblas.h>
#include <cpuid.h>
#include <immintrin.h>

// GCC 12 reports the _mm512_undefined_* placeholders inside its own AVX-512 intrinsics as
// maybe-uninitialized (a known false positive); nothing in this file reads uninitialized memory.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <atomic>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace strata {
namespace {

// Rows of W converted to f32 at a time for bf16/f16 weights.
constexpr int64_t kPanelRows = 64;

int64_t End(const MatMulParams& p) { return p.n_end == 0 ? p.n : p.n_end; }

// Rows of x up to which the direct (GEMV-style) path runs: it streams each weight row once,
// converting 16-bit weights in registers, which is what batch-1 and small-batch decode need.
constexpr int64_t kGemvMaxRows = kMatMulCpuGemvMaxRows;

float Scalar(const void* w, int64_t i, DType dt) { return ElementAsFloat(w, dt, i); }

void GemvScalar(const MatMulParams& p, int64_t ldy, int64_t n_begin, int64_t n_end) {
  for (int64_t j = n_begin; j < n_end; ++j) {
    const uint8_t* w = static_cast<const uint8_t*>(p.w) + j * p.k * DTypeBytes(p.w_dtype);
    for (int64_t i = 0; i < p.m; ++i) {
      float acc = 0;
      for (int64_t l = 0; l < p.k; ++l) acc += p.x[i * p.k + l] * Scalar(w, l, p.w_dtype);
      p.y[i * ldy + j] = acc;
    }
  }
}

template <DType kDt>
__attribute__((target("avx2,fma,f16c"))) inline __m256 Load8(const void* w, int64_t l) {
  if constexpr (kDt == DType::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + l);
  } else if constexpr (kDt == DType::kBF16) {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + l));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + l)));
  }
}

__attribute__((target("avx2,fma,f16c"))) inline float Sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

template <DType kDt>
__attribute__((target("avx2,fma,f16c"))) void GemvAvx2(const MatMulParams& p, int64_t ldy,
                                                       int64_t n_begin, int64_t n_end) {
  const int64_t k8 = p.k / 8 * 8;
  for (int64_t j = n_begin; j < n_end; ++j) {
    const void* w = static_cast<const uint8_t*>(p.w) + j * p.k * DTypeBytes(kDt);
    __m256 acc[kGemvMaxRows];
    for (int64_t i = 0; i < p.m; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t l = 0; l < k8; l += 8) {
      const __m256 wv = Load8<kDt>(w, l);
      for (int64_t i = 0; i < p.m; ++i) {
        acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(p.x + i * p.k + l), wv, acc[i]);
      }
    }
    for (int64_t i = 0; i < p.m; ++i) {
      float sum = Sum8(acc[i]);
      for (int64_t l = k8; l < p.k; ++l) sum += p.x[i * p.k + l] * Scalar(w, l, kDt);
      p.y[i * ldy + j] = sum;
    }
  }
}

template <DType kDt>
__attribute__((target("avx512f"))) inline __m512 Load16(const void* w, int64_t l) {
  if constexpr (kDt == DType::kF32) {
    return _mm512_loadu_ps(static_cast<const float*>(w) + l);
  } else if constexpr (kDt == DType::kBF16) {
    const __m256i h =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + l));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + l)));
  }
}

template <DType kDt>
__attribute__((target("avx512f"))) void GemvAvx512(const MatMulParams& p, int64_t ldy,
                                                   int64_t n_begin, int64_t n_end) {
  const int64_t k16 = p.k / 16 * 16;
  for (int64_t j = n_begin; j < n_end; ++j) {
    const void* w = static_cast<const uint8_t*>(p.w) + j * p.k * DTypeBytes(kDt);
    __m512 acc[kGemvMaxRows];
    for (int64_t i = 0; i < p.m; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t l = 0; l < k16; l += 16) {
      const __m512 wv = Load16<kDt>(w, l);
      for (int64_t i = 0; i < p.m; ++i) {
        acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(p.x + i * p.k + l), wv, acc[i]);
      }
    }
    for (int64_t i = 0; i < p.m; ++i) {
      float sum = _mm512_reduce_add_ps(acc[i]);
      for (int64_t l = k16; l < p.k; ++l) sum += p.x[i * p.k + l] * Scalar(w, l, kDt);
      p.y[i * ldy + j] = sum;
    }
  }
}

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa DetectIsa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  // (F16C through CPUID: clang's __builtin_cpu_supports does not know it.)
  unsigned eax, ebx, ecx, edx;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c) {
    return Isa::kAvx2;
  }
  return Isa::kScalar;
}

std::atomic<Isa>& ActiveIsa() {
  static std::atomic<Isa> isa{DetectIsa()};
  return isa;
}

void Gemv(const MatMulParams& p, int64_t ldy, int64_t n_begin, int64_t n_end) {
  switch (ActiveIsa().load(std::memory_order_relaxed)) {
    case Isa::kAvx512:
      switch (p.w_dtype) {
        case DType::kF32:
          return GemvAvx512<DType::kF32>(p, ldy, n_begin, n_end);
        case DType::kBF16:
          return GemvAvx512<DType::kBF16>(p, ldy, n_begin, n_end);
        default:
          return GemvAvx512<DType::kF16>(p, ldy, n_begin, n_end);
      }
    case Isa::kAvx2:
      switch (p.w_dtype) {
        case DType::kF32:
          return GemvAvx2<DType::kF32>(p, ldy, n_begin, n_end);
        case DType::kBF16:
          return GemvAvx2<DType::kBF16>(p, ldy, n_begin, n_end);
        default:
          return GemvAvx2<DType::kF16>(p, ldy, n_begin, n_end);
      }
    case Isa::kScalar:
      break;
  }
  GemvScalar(p, ldy, n_begin, n_end);
}

// Converts rows [r0, r0 + rows) of a 16-bit W into f32.
void ConvertPanel(const MatMulParams& p, int64_t r0, int64_t rows, float* out) {
  const auto* w = static_cast<const uint16_t*>(p.w) + r0 * p.k;
  const int64_t count = rows * p.k;
  if (p.w_dtype == DType::kBF16) {
    for (int64_t i = 0; i < count; ++i) out[i] = Bf16ToFloat(w[i]);
  } else {
    for (int64_t i = 0; i < count; ++i) out[i] = F16ToFloat(w[i]);
  }
}

}  // namespace

bool SetMatMulCpuIsaForTesting(absl::string_view isa) {
  const Isa best = DetectIsa();
  Isa want;
  if (isa == "scalar") {
    want = Isa::kScalar;
  } else if (isa == "avx2") {
    want = Isa::kAvx2;
  } else if (isa == "avx512") {
    want = Isa::kAvx512;
  } else {
    want = best;
  }
  if (static_cast<int>(want) > static_cast<int>(best)) return false;
  ActiveIsa().store(want);
  return true;
}

void SetMatMulCpuThreads(int n) {
  if (n > 0) openblas_set_num_threads(n);
}

size_t MatMulCpuWorkspaceBytes(const MatMulParams& p) {
  if (p.w_dtype == DType::kF32 || p.m <= kGemvMaxRows) return 0;
  return static_cast<size_t>(kPanelRows * p.k) * sizeof(float);
}

absl::Status MatMulCpu(const MatMulParams& p, void* workspace, size_t workspace_bytes) {
  if (p.m < 0 || p.n <= 0 || p.k <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("matmul: bad shape m=", p.m, " n=", p.n, " k=", p.k));
  }
  const int64_t ldy = p.ldy == 0 ? p.n : p.ldy;
  const int64_t n_end = End(p);
  if (ldy < p.n) return absl::InvalidArgumentError("matmul: ldy < n");
  if (p.n_begin < 0 || n_end > p.n || p.n_begin > n_end) {
    return absl::InvalidArgumentError("matmul: bad column range");
  }
  if (p.m == 0 || p.n_begin == n_end) return absl::OkStatus();
  if (p.x == nullptr || p.w == nullptr || p.y == nullptr) {
    return absl::InvalidArgumentError("matmul: x, w and y must not be null");
  }
  if (p.w_dtype != DType::kF32 && p.w_dtype != DType::kBF16 && p.w_dtype != DType::kF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("matmul: unsupported weight dtype ", DTypeName(p.w_dtype)));
  }
  if (workspace_bytes < MatMulCpuWorkspaceBytes(p) || (workspace == nullptr && workspace_bytes)) {
    return absl::InvalidArgumentError("matmul: workspace too small");
  }
  const int64_t cols = n_end - p.n_begin;
  if (p.m <= kGemvMaxRows) {
    Gemv(p, ldy, p.n_begin, n_end);
  } else if (p.w_dtype == DType::kF32) {
    const float* w = static_cast<const float*>(p.w) + p.n_begin * p.k;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, p.m, cols, p.k, 1.0f, p.x, p.k, w, p.k,
                0.0f, p.y + p.n_begin, ldy);
  } else {
    float* panel = static_cast<float*>(workspace);
    for (int64_t r0 = p.n_begin; r0 < n_end; r0 += kPanelRows) {
      const int64_t rows = std::min(kPanelRows, n_end - r0);
      ConvertPanel(p, r0, rows, panel);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, p.m, rows, p.k, 1.0f, p.x, p.k, panel,
                  p.k, 0.0f, p.y + r0, ldy);
    }
  }
  if (p.bias != nullptr) {
    for (int64_t i = 0; i < p.m; ++i) {
      float* row = p.y + i * ldy;
      for (int64_t j = p.n_begin; j < n_end; ++j) row[j] += p.bias[j];
    }
  }
  return absl::OkStatus();
}

}  // namespace strata
