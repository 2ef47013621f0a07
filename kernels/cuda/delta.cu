// Fine-tune delta kernels: see delta_kernel.h. A row of a packed delta is decoded 8 columns (one
// "unit") at a time: bits bytes of codes when dense, bits / 2 bytes plus one index byte with 2:4
// sparsity, so every load is a naturally aligned 1-, 2-, 4- or 8-byte word.
#include <cstdint>

#include "kernels/cuda/cuda_types.cuh"
#include "kernels/cuda/delta_kernel.h"

namespace strata::gpu {
namespace {

// `#pragma unroll` in code that the host compiles too (DecodeUnit), where GCC would warn.
#ifdef __CUDA_ARCH__
#define STRATA_UNROLL _Pragma("unroll")
#else
#define STRATA_UNROLL
#endif

constexpr int kWarps = 4;        // warps per block of the GEMV
constexpr int kRowsPerPass = 8;  // rows of x each decoded unit of Δ meets per pass

// A naturally aligned little-endian word of kBytes bytes (read-only cache on the device; the host
// path is for DecodeDeltaUnitForTesting).
template <int kBytes>
__host__ __device__ __forceinline__ uint64_t LoadWord(const uint8_t* p) {
#ifdef __CUDA_ARCH__
  if constexpr (kBytes == 1) return __ldg(p);
  if constexpr (kBytes == 2) return __ldg(reinterpret_cast<const uint16_t*>(p));
  if constexpr (kBytes == 4) return __ldg(reinterpret_cast<const uint32_t*>(p));
  if constexpr (kBytes == 8) return __ldg(reinterpret_cast<const unsigned long long*>(p));
  return 0;
#else
  uint64_t v = 0;
  for (int i = 0; i < kBytes; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
#endif
}

__host__ __device__ __forceinline__ uint32_t LoadByte(const uint8_t* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// Columns 8u .. 8u + 7 of one row of Δ as code minus zero point (unscaled; pruned columns 0).
template <int kBits, bool kSparse>
__host__ __device__ __forceinline__ void DecodeUnit(const uint8_t* q_row, const uint8_t* index_row,
                                                    int64_t u, float w[8]) {
  constexpr uint64_t kMask = (1u << kBits) - 1;
  constexpr float kZero = static_cast<float>(1 << (kBits - 1));
  if constexpr (!kSparse) {
    const uint64_t word = LoadWord<kBits>(q_row + u * kBits);
    STRATA_UNROLL
    for (int i = 0; i < 8; ++i) w[i] = static_cast<float>((word >> (i * kBits)) & kMask) - kZero;
  } else {
    // Values 4u .. 4u + 3 of the row; index byte u holds groups 2u (low nibble) and 2u + 1.
    const uint64_t word = LoadWord<kBits / 2>(q_row + u * (kBits / 2));
    const uint32_t nib = LoadByte(index_row + u);
    float v[4];
    STRATA_UNROLL
    for (int i = 0; i < 4; ++i) v[i] = static_cast<float>((word >> (i * kBits)) & kMask) - kZero;
    const uint32_t o0 = nib & 3, o1 = (nib >> 2) & 3, o2 = (nib >> 4) & 3, o3 = (nib >> 6) & 3;
    STRATA_UNROLL
    for (uint32_t c = 0; c < 4; ++c) {
      w[c] = (c == o0 ? v[0] : 0.0f) + (c == o1 ? v[1] : 0.0f);
      w[4 + c] = (c == o2 ? v[2] : 0.0f) + (c == o3 ? v[3] : 0.0f);
    }
  }
}

// Eight consecutive elements of T at p (16-byte aligned) as f32.
template <typename T>
__device__ __forceinline__ void Load8(const T* p, float out[8]) {
  if constexpr (sizeof(T) == 4) {
    Load16<T>(p, out);
    Load16<T>(p + 4, out + 4);
  } else {
    Load16<T>(p, out);
  }
}

template <int kBits, bool kSparse>
__host__ __device__ __forceinline__ int64_t QBytesPerRow(int64_t cols) {
  return (kSparse ? cols / 2 : cols) * kBits / 8;
}

// One warp per row j of Δ (grid-stride): the row's units are spread over the lanes; each pass
// takes up to kRowsPerPass rows of x, and lane 0 adds the scaled sums to y.
template <typename T, typename O, int kBits, bool kSparse>
__global__ void __launch_bounds__(kWarps * 32) DeltaGemvKernel(DeltaGemvArgs a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t units = a.delta.cols / 8;
  const int64_t q_bytes = QBytesPerRow<kBits, kSparse>(a.delta.cols);
  const T* x = static_cast<const T*>(a.x);
  O* y = static_cast<O*>(a.y);
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + warp; j < a.delta.rows;
       j += static_cast<int64_t>(gridDim.x) * kWarps) {
    const uint8_t* q_row = a.delta.q + j * q_bytes;
    const uint8_t* index_row = kSparse ? a.delta.index + j * (a.delta.cols / 8) : nullptr;
    const float scale = a.delta.scale[j];
    for (int64_t r0 = 0; r0 < a.m; r0 += kRowsPerPass) {
      const int rows_here = static_cast<int>(a.m - r0 < kRowsPerPass ? a.m - r0 : kRowsPerPass);
      int64_t xr[kRowsPerPass];
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
        const int64_t i = r0 + (r < rows_here ? r : 0);
        xr[r] = (a.rows != nullptr ? a.rows[i] : i) + a.row_offset;
      }
      float acc[kRowsPerPass];
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) acc[r] = 0.0f;
      for (int64_t u = lane; u < units; u += 32) {
        float w[8];
        DecodeUnit<kBits, kSparse>(q_row, index_row, u, w);
#pragma unroll
        for (int r = 0; r < kRowsPerPass; ++r) {
          if (r < rows_here) {
            float xv[8];
            Load8<T>(x + xr[r] * a.ldx + u * 8, xv);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[r] = fmaf(xv[i], w[i], acc[r]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
        if (r < rows_here) {
          const float sum = WarpSum(acc[r]);
          if (lane == 0) {
            O* out = y + xr[r] * a.ldy + j;
            *out = FromF<O>(ToF(*out) + sum * scale);
          }
        }
      }
    }
  }
}

// One thread per unit of an out row (grid-stride).
template <typename O, int kBits, bool kSparse>
__global__ void UnpackDeltaKernel(UnpackDeltaArgs a) {
  const int64_t units = a.delta.cols / 8;
  const int64_t q_bytes = QBytesPerRow<kBits, kSparse>(a.delta.cols);
  O* out = static_cast<O*>(a.out);
  const int64_t total = a.num_rows * units;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t / units, u = t % units;
    const int64_t src = a.src_rows != nullptr ? a.src_rows[i] : a.row_begin + i;
    if (src < 0 || src >= a.delta.rows) continue;
    const int64_t dst = a.dst_rows != nullptr ? a.dst_rows[i] : i;
    float w[8];
    DecodeUnit<kBits, kSparse>(a.delta.q + src * q_bytes,
                               kSparse ? a.delta.index + src * (a.delta.cols / 8) : nullptr, u, w);
    const float scale = a.delta.scale[src];
    O* o = out + dst * a.ld_out + u * 8;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float v = w[k] * scale;
      o[k] = FromF<O>(a.accumulate ? ToF(o[k]) + v : v);
    }
  }
}

template <typename O>
__global__ void AddRowsKernel(AddRowsArgs a) {
  O* y = static_cast<O*>(a.y);
  const int64_t total = a.m * a.n;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t / a.n, j = t % a.n;
    const int64_t row = a.rows != nullptr ? a.rows[i] : i;
    O* o = y + row * a.ldy + j;
    *o = FromF<O>(ToF(*o) + a.src[i * a.ld_src + j]);
  }
}

// Calls fn.template operator()<kBits, kSparse>() for the delta's format.
template <typename Fn>
cudaError_t DispatchFormat(const DeltaView& d, Fn&& fn) {
  switch (d.bits) {
    case 2:
      return d.sparse_2_4 ? fn.template operator()<2, true>() : fn.template operator()<2, false>();
    case 4:
      return d.sparse_2_4 ? fn.template operator()<4, true>() : fn.template operator()<4, false>();
    case 8:
      return d.sparse_2_4 ? fn.template operator()<8, true>() : fn.template operator()<8, false>();
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t LaunchDeltaGemv(const DeltaGemvArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.delta.rows == 0) return cudaSuccess;
  const unsigned grid = GridFor(a.delta.rows, kWarps, 65535);
  return DispatchAct(a.act, [&](auto t) {
    using T = decltype(t);
    return DispatchAct(a.out_type, [&](auto o) {
      using O = decltype(o);
      return DispatchFormat(a.delta, [&]<int kBits, bool kSparse>() {
        DeltaGemvKernel<T, O, kBits, kSparse><<<grid, kWarps * 32, 0, stream>>>(a);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t LaunchUnpackDelta(const UnpackDeltaArgs& a, cudaStream_t stream) {
  if (a.num_rows == 0) return cudaSuccess;
  const unsigned grid = GridFor(a.num_rows * (a.delta.cols / 8), 256);
  return DispatchAct(a.out_type, [&](auto o) {
    using O = decltype(o);
    return DispatchFormat(a.delta, [&]<int kBits, bool kSparse>() {
      UnpackDeltaKernel<O, kBits, kSparse><<<grid, 256, 0, stream>>>(a);
      return cudaGetLastError();
    });
  });
}

void DecodeDeltaUnitForTesting(const DeltaView& d, int64_t row, int64_t unit, float out[8]) {
  DispatchFormat(d, [&]<int kBits, bool kSparse>() {
    DecodeUnit<kBits, kSparse>(d.q + row * QBytesPerRow<kBits, kSparse>(d.cols),
                               kSparse ? d.index + row * (d.cols / 8) : nullptr, unit, out);
    return cudaSuccess;
  });
}

cudaError_t LaunchAddRows(const AddRowsArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  return DispatchAct(a.type, [&](auto o) {
    using O = decltype(o);
    AddRowsKernel<O><<<GridFor(a.m * a.n, 256), 256, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

}  // namespace strata::gpu
