#include "kernels/delta.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"

namespace strata {
namespace {

// Columns of a delta row decoded at a time (a multiple of 8).
constexpr int64_t kChunkCols = 512;
// Clipping ratios PackDeltaCpu tries, from 1 (the row's largest magnitude) down.
constexpr int kClipSteps = 20;
constexpr float kClipLowest = 0.35f;

int Levels(int bits) { return (1 << (bits - 1)) - 1; }

// Every byte's values as floats, less the zero point: two 4-bit codes, or four 2-bit codes.
struct Luts {
  float four[256][2];
  float two[256][4];
};

const Luts& GetLuts() {
  static const Luts* luts = [] {
    auto* l = new Luts;
    for (int b = 0; b < 256; ++b) {
      l->four[b][0] = static_cast<float>((b & 15) - 8);
      l->four[b][1] = static_cast<float>((b >> 4) - 8);
      for (int i = 0; i < 4; ++i) l->two[b][i] = static_cast<float>(((b >> (2 * i)) & 3) - 2);
    }
    return l;
  }();
  return *luts;
}

// Columns [c0, c0 + len) of row r (c0 and len multiples of 8) as code minus zero point, unscaled:
// the value is buf[i] * scale[r]. Pruned positions are 0.
void DecodeChunk(const PackedDelta& d, int64_t r, int64_t c0, int64_t len, float* buf) {
  const Luts& lut = GetLuts();
  const uint8_t* q = d.q + r * d.QBytesPerRow();
  if (!d.sparse_2_4) {
    switch (d.bits) {
      case 4: {
        const uint8_t* b = q + c0 / 2;
        for (int64_t i = 0; i < len / 2; ++i) std::memcpy(buf + 2 * i, lut.four[b[i]], 8);
        return;
      }
      case 2: {
        const uint8_t* b = q + c0 / 4;
        for (int64_t i = 0; i < len / 4; ++i) std::memcpy(buf + 4 * i, lut.two[b[i]], 16);
        return;
      }
      default: {
        const uint8_t* b = q + c0;
        for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<float>(b[i]) - 128.0f;
        return;
      }
    }
  }
  std::fill(buf, buf + len, 0.0f);
  const uint8_t* index = d.index + r * d.IndexBytesPerRow();
  for (int64_t g = c0 / 4; g < (c0 + len) / 4; ++g) {
    float v0, v1;
    switch (d.bits) {
      case 4:
        v0 = lut.four[q[g]][0];
        v1 = lut.four[q[g]][1];
        break;
      case 2:
        v0 = lut.two[q[g >> 1]][2 * (g & 1)];
        v1 = lut.two[q[g >> 1]][2 * (g & 1) + 1];
        break;
      default:
        v0 = static_cast<float>(q[2 * g]) - 128.0f;
        v1 = static_cast<float>(q[2 * g + 1]) - 128.0f;
        break;
    }
    const int nibble = (index[g >> 1] >> ((g & 1) * 4)) & 0xf;
    float* group = buf + 4 * g - c0;
    group[nibble & 3] += v0;
    group[(nibble >> 2) & 3] += v1;
  }
}

float DotScalar(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) float DotAvx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  }
  const __m256 v = _mm256_add_ps(acc0, acc1);
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  float sum = _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

#endif

using DotFn = float (*)(const float*, const float*, int64_t);

bool HasAvx2() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

DotFn BestDotFn() {
#if defined(__x86_64__)
  if (HasAvx2()) return &DotAvx2;
#endif
  return &DotScalar;
}

std::atomic<DotFn>& ActiveDot() {
  static std::atomic<DotFn> dot{BestDotFn()};
  return dot;
}

// Packs one row: picks the kept values, the scale, the codes.
void PackRow(const DeltaPackParams& p, int64_t r, float* kept) {
  const float* row = p.delta + r * p.cols;
  const int64_t num_kept = p.sparse_2_4 ? p.cols / 2 : p.cols;
  const auto importance = [&](int64_t col) {
    return p.column_importance == nullptr ? 1.0f : p.column_importance[col];
  };
  if (p.sparse_2_4) {
    uint8_t* index_row = p.index + r * (p.cols / 8);
    std::memset(index_row, 0, p.cols / 8);
    for (int64_t g = 0; g < p.cols / 4; ++g) {
      float score[4];
      for (int c = 0; c < 4; ++c) score[c] = std::fabs(row[4 * g + c]) * importance(4 * g + c);
      // The two largest scores; ties go to the lower column.
      int first = 0;
      for (int c = 1; c < 4; ++c) {
        if (score[c] > score[first]) first = c;
      }
      int second = first == 0 ? 1 : 0;
      for (int c = 0; c < 4; ++c) {
        if (c != first && score[c] > score[second]) second = c;
      }
      const int lo = std::min(first, second), hi = std::max(first, second);
      kept[2 * g] = row[4 * g + lo];
      kept[2 * g + 1] = row[4 * g + hi];
      index_row[g >> 1] |= static_cast<uint8_t>((lo | (hi << 2)) << ((g & 1) * 4));
    }
  } else {
    std::memcpy(kept, row, p.cols * sizeof(float));
  }
  const int levels = Levels(p.bits);
  float amax = 0;
  for (int64_t v = 0; v < num_kept; ++v) amax = std::max(amax, std::fabs(kept[v]));
  float best_scale = 0;
  if (amax > 0 && std::isfinite(amax)) {
    double best_error = -1;
    for (int step = 0; step < kClipSteps; ++step) {
      const float ratio = 1.0f - (1.0f - kClipLowest) * step / (kClipSteps - 1);
      const float scale = ratio * amax / levels;
      double error = 0;
      for (int64_t v = 0; v < num_kept; ++v) {
        const float c = std::clamp(std::nearbyint(kept[v] / scale), static_cast<float>(-levels),
                                   static_cast<float>(levels));
        const double e = kept[v] - c * scale;
        error += e * e;
      }
      if (best_error < 0 || error < best_error) {
        best_error = error;
        best_scale = scale;
      }
    }
  }
  p.scale[r] = best_scale;
  const int64_t q_bytes = num_kept * p.bits / 8;
  uint8_t* q_row = p.q + r * q_bytes;
  std::memset(q_row, 0, q_bytes);
  const int half = 1 << (p.bits - 1);
  for (int64_t v = 0; v < num_kept; ++v) {
    int c = 0;
    if (best_scale > 0) {
      c = static_cast<int>(std::clamp(std::nearbyint(kept[v] / best_scale),
                                      static_cast<float>(-levels), static_cast<float>(levels)));
    }
    const int64_t bit = v * p.bits;
    q_row[bit >> 3] |= static_cast<uint8_t>((c + half) << (bit & 7));
  }
}

absl::Status CheckShape(int64_t rows, int64_t cols, int bits) {
  if (bits != 2 && bits != 4 && bits != 8) {
    return absl::InvalidArgumentError(absl::StrCat("delta: bits must be 2, 4 or 8, not ", bits));
  }
  if (rows < 0) return absl::InvalidArgumentError("delta: rows must be >= 0");
  if (cols <= 0 || cols % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("delta: cols must be a positive multiple of 8, not ", cols));
  }
  return absl::OkStatus();
}

}  // namespace

bool SetDeltaCpuIsaForTesting(absl::string_view isa) {
  if (isa == "scalar") {
    ActiveDot().store(&DotScalar);
    return true;
  }
#if defined(__x86_64__)
  if (isa == "avx2") {
    if (!HasAvx2()) return false;
    ActiveDot().store(&DotAvx2);
    return true;
  }
#endif
  if (isa == "avx2") return false;
  ActiveDot().store(BestDotFn());
  return true;
}

absl::Status ValidatePackedDelta(const PackedDelta& d) {
  if (absl::Status s = CheckShape(d.rows, d.cols, d.bits); !s.ok()) return s;
  if (d.rows == 0) return absl::OkStatus();
  if (d.q == nullptr) return absl::InvalidArgumentError("delta: q is null");
  if (d.scale == nullptr) return absl::InvalidArgumentError("delta: scale is null");
  if (d.sparse_2_4 && d.index == nullptr) {
    return absl::InvalidArgumentError("delta: index is null (2:4 sparsity needs it)");
  }
  return absl::OkStatus();
}

absl::Status PackDeltaCpu(const DeltaPackParams& p) {
  if (absl::Status s = CheckShape(p.rows, p.cols, p.bits); !s.ok()) return s;
  const int64_t row_end = p.row_end == 0 ? p.rows : p.row_end;
  if (p.row_begin < 0 || p.row_begin > row_end || row_end > p.rows) {
    return absl::InvalidArgumentError("delta pack: [row_begin, row_end) is outside [0, rows)");
  }
  if (p.row_begin == row_end) return absl::OkStatus();
  if (p.delta == nullptr) return absl::InvalidArgumentError("delta pack: delta is null");
  if (p.q == nullptr) return absl::InvalidArgumentError("delta pack: q is null");
  if (p.scale == nullptr) return absl::InvalidArgumentError("delta pack: scale is null");
  if (p.sparse_2_4 && p.index == nullptr) {
    return absl::InvalidArgumentError("delta pack: index is null (2:4 sparsity needs it)");
  }
  if (p.column_importance != nullptr) {
    for (int64_t c = 0; c < p.cols; ++c) {
      if (!(p.column_importance[c] >= 0) || !std::isfinite(p.column_importance[c])) {
        return absl::InvalidArgumentError(
            absl::StrCat("delta pack: column_importance[", c, "] is not a finite value >= 0"));
      }
    }
  }
  if (p.workspace == nullptr || p.workspace_bytes < DeltaPackWorkspaceBytes(p.cols)) {
    return absl::InvalidArgumentError(
        absl::StrCat("delta pack: workspace needs ", DeltaPackWorkspaceBytes(p.cols), " bytes"));
  }
  for (int64_t i = p.row_begin * p.cols; i < row_end * p.cols; ++i) {
    if (!std::isfinite(p.delta[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("delta pack: delta[", i / p.cols, ", ", i % p.cols, "] is not finite"));
    }
  }
  float* kept = static_cast<float*>(p.workspace);
  for (int64_t r = p.row_begin; r < row_end; ++r) PackRow(p, r, kept);
  return absl::OkStatus();
}

absl::Status UnpackDeltaCpu(const PackedDelta& d, int64_t row_begin, int64_t row_end, float* out,
                            bool accumulate) {
  if (absl::Status s = ValidatePackedDelta(d); !s.ok()) return s;
  if (row_begin < 0 || row_begin > row_end || row_end > d.rows) {
    return absl::InvalidArgumentError("delta unpack: [row_begin, row_end) is outside [0, rows)");
  }
  if (row_begin == row_end) return absl::OkStatus();
  if (out == nullptr) return absl::InvalidArgumentError("delta unpack: out is null");
  float buf[kChunkCols];
  for (int64_t r = row_begin; r < row_end; ++r) {
    float* o = out + (r - row_begin) * d.cols;
    const float scale = d.scale[r];
    for (int64_t c0 = 0; c0 < d.cols; c0 += kChunkCols) {
      const int64_t len = std::min(kChunkCols, d.cols - c0);
      DecodeChunk(d, r, c0, len, buf);
      if (accumulate) {
        for (int64_t i = 0; i < len; ++i) o[c0 + i] += buf[i] * scale;
      } else {
        for (int64_t i = 0; i < len; ++i) o[c0 + i] = buf[i] * scale;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status DeltaMatMulCpu(const DeltaMatMulParams& p) {
  const PackedDelta& d = p.delta;
  if (absl::Status s = ValidatePackedDelta(d); !s.ok()) return s;
  const int64_t ldx = p.ldx == 0 ? d.cols : p.ldx;
  const int64_t ldy = p.ldy == 0 ? d.rows : p.ldy;
  const int64_t n_end = p.n_end == 0 ? d.rows : p.n_end;
  if (p.m < 0) return absl::InvalidArgumentError("delta matmul: m must be >= 0");
  if (ldx < d.cols) return absl::InvalidArgumentError("delta matmul: ldx is less than cols");
  if (ldy < d.rows) return absl::InvalidArgumentError("delta matmul: ldy is less than delta rows");
  if (p.n_begin < 0 || p.n_begin > n_end || n_end > d.rows) {
    return absl::InvalidArgumentError("delta matmul: [n_begin, n_end) is outside [0, delta rows)");
  }
  if (p.m == 0 || p.n_begin == n_end) return absl::OkStatus();
  if (p.x == nullptr) return absl::InvalidArgumentError("delta matmul: x is null");
  if (p.y == nullptr) return absl::InvalidArgumentError("delta matmul: y is null");
  if (p.rows != nullptr) {
    for (int64_t i = 0; i < p.m; ++i) {
      if (p.rows[i] < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("delta matmul: rows[", i, "] = ", p.rows[i], " is negative"));
      }
    }
  }
  const auto row_of = [&](int64_t i) -> int64_t { return p.rows == nullptr ? i : p.rows[i]; };
  const DotFn dot = ActiveDot().load(std::memory_order_relaxed);
  float buf[kChunkCols];
  for (int64_t j = p.n_begin; j < n_end; ++j) {
    const float scale = d.scale[j];
    for (int64_t c0 = 0; c0 < d.cols; c0 += kChunkCols) {
      const int64_t len = std::min(kChunkCols, d.cols - c0);
      DecodeChunk(d, j, c0, len, buf);
      for (int64_t i = 0; i < p.m; ++i) {
        p.y[row_of(i) * ldy + j] += scale * dot(buf, p.x + row_of(i) * ldx + c0, len);
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace strata
