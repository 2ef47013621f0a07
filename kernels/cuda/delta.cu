// Fine-tune delta kernels: see delta_kernel.h. A row of a packed delta is decoded 8 columns (one
// "unit") at a time: bits bytes of codes when dense, bits / 2 bytes plus one index byte with 2:4
// sparsity, so every load is a naturally aligned 1-, 2-, 4- or 8-byte word.
#include <mma.h>

#include <algorithm>
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

// The packed bytes of one unit (8 columns) of a row of Δ, as loaded: its code word and, with 2:4
// sparsity, its index byte. Loading and decoding are apart so that a kernel can have the next
// units' loads in flight while it decodes the current ones.
struct RawUnit {
  uint64_t word;
  uint32_t nib;
};

template <int kBits, bool kSparse>
__host__ __device__ __forceinline__ RawUnit LoadUnit(const uint8_t* q_row, const uint8_t* index_row,
                                                     int64_t u) {
  if constexpr (!kSparse) {
    return {LoadWord<kBits>(q_row + u * kBits), 0u};
  } else {
    // Values 4u .. 4u + 3 of the row; index byte u holds groups 2u (low nibble) and 2u + 1.
    return {LoadWord<kBits / 2>(q_row + u * (kBits / 2)), LoadByte(index_row + u)};
  }
}

// A loaded unit's 8 columns as code minus zero point (unscaled; pruned columns 0).
template <int kBits, bool kSparse>
__host__ __device__ __forceinline__ void DecodeRaw(const RawUnit raw, float w[8]) {
  constexpr uint64_t kMask = (1u << kBits) - 1;
  constexpr float kZero = static_cast<float>(1 << (kBits - 1));
  const uint64_t word = raw.word;
  if constexpr (!kSparse) {
    STRATA_UNROLL
    for (int i = 0; i < 8; ++i) w[i] = static_cast<float>((word >> (i * kBits)) & kMask) - kZero;
  } else {
    const uint32_t nib = raw.nib;
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

// Columns 8u .. 8u + 7 of one row of Δ as code minus zero point (unscaled; pruned columns 0).
template <int kBits, bool kSparse>
__host__ __device__ __forceinline__ void DecodeUnit(const uint8_t* q_row, const uint8_t* index_row,
                                                    int64_t u, float w[8]) {
  DecodeRaw<kBits, kSparse>(LoadUnit<kBits, kSparse>(q_row, index_row, u), w);
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

// Eight values as O at p, added to what p holds when `accumulate`: in 16-byte loads and stores
// when kVec (p 16-byte aligned), else element by element.
template <typename O, bool kVec>
__device__ __forceinline__ void Store8(O* p, const float v[8], bool accumulate) {
  if constexpr (kVec) {
    constexpr int kPer = 16 / static_cast<int>(sizeof(O));  // 8 for 16-bit types, 4 for f32
#pragma unroll
    for (int h = 0; h < 8 / kPer; ++h) {
      uint4* q = reinterpret_cast<uint4*>(p + h * kPer);
      uint4 bits = accumulate ? *q : make_uint4(0, 0, 0, 0);
      O* e = reinterpret_cast<O*>(&bits);
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        e[i] = FromF<O>(accumulate ? ToF(e[i]) + v[h * kPer + i] : v[h * kPer + i]);
      }
      *q = bits;
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) p[k] = FromF<O>(accumulate ? ToF(p[k]) + v[k] : v[k]);
  }
}

// One thread per unit of an out row: blocks walk the rows along y and the units along x (both
// grid-stride), so no thread divides a 64-bit index.
template <typename O, int kBits, bool kSparse, bool kVec>
__global__ void UnpackDeltaKernel(UnpackDeltaArgs a) {
  const int64_t units = a.delta.cols / 8;
  const int64_t q_bytes = QBytesPerRow<kBits, kSparse>(a.delta.cols);
  O* out = static_cast<O*>(a.out);
  for (int64_t i = blockIdx.y; i < a.num_rows; i += gridDim.y) {
    const int64_t src = a.src_rows != nullptr ? a.src_rows[i] : a.row_begin + i;
    if (src < 0 || src >= a.delta.rows) continue;
    const int64_t dst = a.dst_rows != nullptr ? a.dst_rows[i] : i;
    const uint8_t* q_row = a.delta.q + src * q_bytes;
    const uint8_t* index_row = kSparse ? a.delta.index + src * (a.delta.cols / 8) : nullptr;
    const float scale = a.delta.scale[src];
    for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units;
         u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float w[8];
      DecodeUnit<kBits, kSparse>(q_row, index_row, u, w);
#pragma unroll
      for (int k = 0; k < 8; ++k) w[k] *= scale;
      Store8<O, kVec>(out + dst * a.ld_out + u * 8, w, a.accumulate);
    }
  }
}

// The tensor-core form of DeltaGemvKernel (16-bit activations): a block takes kMmaRows rows of x
// against kMmaCols rows of Δ, walking the columns kMmaK at a time. Each step's units of Δ are
// decoded into shared memory as T (code minus zero point, exact in f16 and bf16 for codes of up to
// 8 bits) beside the step's columns of x, while the next step's packed bytes and x are already
// loading into registers; warp w multiplies them into its 16 columns of the product with wmma (f32
// accumulators), and the row scales apply once, when the product is added to y. Blocks along x
// take successive row tiles of the same columns of Δ, so that with several row tiles Δ comes from
// L2 after the first.
constexpr int kMmaThreads = 128;
constexpr int kMmaRows = 64;                                 // rows of x per block
constexpr int kMmaCols = 64;                                 // rows of Δ per block
constexpr int kMmaK = 128;                                   // columns per step
constexpr int kMmaUnits = kMmaK / 8;                         // units per row per step
constexpr int kMmaLd = kMmaK + 8;                            // 16-bit pitch of x and Δ tiles
constexpr int kMmaLdc = kMmaCols + 4;                        // f32 pitch of the product
constexpr int kMmaPer = kMmaRows * kMmaUnits / kMmaThreads;  // units (and x vectors) a thread
static_assert(kMmaRows == kMmaCols, "a thread's x vectors and Δ units share their (row, unit)");
static_assert(kMmaCols == 16 * (kMmaThreads / 32), "a warp per 16 columns of the product");
static_assert(size_t{kMmaRows} * kMmaLdc * 4 <= size_t{2} * kMmaRows * kMmaLd * 2,
              "the product fits the tiles' bytes");

// With gridDim.z > 1 block z takes steps [z * steps_per_split, ...) and the tile's partial
// products meet in a.split_workspace ([tile, split, kMmaRows * kMmaCols] f32), summed by the last
// of its blocks to finish (a counter per tile, reset by that block).
template <typename T, typename O, int kBits, bool kSparse>
__global__ void __launch_bounds__(kMmaThreads, 3)
    DeltaMmaKernel(DeltaGemvArgs a, int64_t steps_per_split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(128) unsigned char smem[size_t{2} * kMmaRows * kMmaLd * sizeof(T)];
  __shared__ int64_t xrow_s[kMmaRows];  // the batch row of each tile row; -1 past m
  __shared__ int last_s;
  T* const xs = reinterpret_cast<T*>(smem);
  T* const ws = xs + kMmaRows * kMmaLd;

  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kMmaRows;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kMmaCols;
  const int mrows = static_cast<int>(a.m - m0 < kMmaRows ? a.m - m0 : kMmaRows);
  const int mtiles = (mrows + 15) / 16;
  if (tid < kMmaRows) {
    xrow_s[tid] =
        tid < mrows ? (a.rows != nullptr ? a.rows[m0 + tid] : m0 + tid) + a.row_offset : -1;
  }
  __syncthreads();

  const int64_t units = a.delta.cols / 8;
  const int64_t q_bytes = QBytesPerRow<kBits, kSparse>(a.delta.cols);
  const int64_t all_steps = (units + kMmaUnits - 1) / kMmaUnits;
  const int64_t first_step = static_cast<int64_t>(blockIdx.z) * steps_per_split;
  const int64_t steps = min(all_steps, first_step + steps_per_split);
  const T* const x = static_cast<const T*>(a.x);
  // Thread tid's slots: tile row tid / kMmaUnits + i * (kMmaThreads / kMmaUnits), unit tid %
  // kMmaUnits of the step, for i < kMmaPer.
  constexpr int kRowStep = kMmaThreads / kMmaUnits;
  const int cu = tid % kMmaUnits, r0 = tid / kMmaUnits;
  RawUnit raw[kMmaPer];
  uint4 xv[kMmaPer];
  uint32_t live = 0;  // bit i: slot i's unit of Δ exists
  auto fetch = [&](int64_t step) {
    const int64_t u = step * kMmaUnits + cu;
    live = 0;
#pragma unroll
    for (int i = 0; i < kMmaPer; ++i) {
      const int r = r0 + i * kRowStep;
      const int64_t j = j0 + r;
      if (u < units && j < a.delta.rows) {
        raw[i] = LoadUnit<kBits, kSparse>(
            a.delta.q + j * q_bytes, kSparse ? a.delta.index + j * (a.delta.cols / 8) : nullptr, u);
        live |= 1u << i;
      }
      xv[i] = make_uint4(0, 0, 0, 0);
      if (u < units && r < mrows) {
        xv[i] = __ldg(reinterpret_cast<const uint4*>(x + xrow_s[r] * a.ldx + u * 8));
      }
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kMmaRows / 16];
#pragma unroll
  for (int t = 0; t < kMmaRows / 16; ++t) wmma::fill_fragment(acc[t], 0.0f);
  fetch(first_step);
  for (int64_t step = first_step; step < steps; ++step) {
#pragma unroll
    for (int i = 0; i < kMmaPer; ++i) {
      const int r = r0 + i * kRowStep;
      float w[8];
      if (live & (1u << i)) {
        DecodeRaw<kBits, kSparse>(raw[i], w);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) w[e] = 0.0f;
      }
      uint4 packed;
      T* pe = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int e = 0; e < 8; ++e) pe[e] = FromF<T>(w[e]);
      *reinterpret_cast<uint4*>(ws + r * kMmaLd + cu * 8) = packed;
      *reinterpret_cast<uint4*>(xs + r * kMmaLd + cu * 8) = xv[i];
    }
    __syncthreads();
    if (step + 1 < steps) fetch(step + 1);  // in flight while the tensor cores work
#pragma unroll
    for (int kk = 0; kk < kMmaK / 16; ++kk) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
      wmma::load_matrix_sync(b, ws + (16 * warp) * kMmaLd + kk * 16, kMmaLd);
#pragma unroll
      for (int t = 0; t < kMmaRows / 16; ++t) {
        if (t < mtiles) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
          wmma::load_matrix_sync(af, xs + (16 * t) * kMmaLd + kk * 16, kMmaLd);
          wmma::mma_sync(acc[t], af, b, acc[t]);
        }
      }
    }
    __syncthreads();
  }

  // The product tile (in the tiles' bytes), scaled by its rows of Δ and added to y.
  float* const cs = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int t = 0; t < kMmaRows / 16; ++t) {
    if (t < mtiles) {
      wmma::store_matrix_sync(cs + (16 * t) * kMmaLdc + 16 * warp, acc[t], kMmaLdc,
                              wmma::mem_row_major);
    }
  }
  __syncthreads();
  // Thread tid's elements of the tile are i = tid + q * kMmaThreads (row i / kMmaCols): every
  // load of an epilogue is issued before any of its results is used, so that the block waits for
  // one round trip to memory rather than one per element.
  constexpr int kTileFloats = kMmaRows * kMmaCols;
  constexpr int kMine = kTileFloats / kMmaThreads;
  float sum[kMine];
#pragma unroll
  for (int q = 0; q < kMine; ++q) {
    const int i = tid + q * kMmaThreads;
    sum[q] = cs[(i / kMmaCols) * kMmaLdc + i % kMmaCols];
  }
  if (gridDim.z > 1) {
    // Split: this block's partial product into the workspace; the tile's last block adds them
    // up, in split order.
    const int64_t tile = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
    float* const parts = a.split_workspace + tile * gridDim.z * kTileFloats;
#pragma unroll
    for (int q = 0; q < kMine; ++q) {
      const int i = tid + q * kMmaThreads;
      if (i < mrows * kMmaCols) parts[blockIdx.z * kTileFloats + i] = sum[q];
    }
    __threadfence();  // this thread's partial products, before the count
    __syncthreads();
    if (tid == 0) {
      __threadfence();
      const uint32_t done = atomicAdd(a.split_counters + tile, 1u) + 1;
      __threadfence();
      last_s = done == gridDim.z;
    }
    __syncthreads();
    if (!last_s) return;
    __threadfence();
#pragma unroll
    for (int q = 0; q < kMine; ++q) sum[q] = 0.0f;
    for (unsigned z = 0; z < gridDim.z; ++z) {
#pragma unroll
      for (int q = 0; q < kMine; ++q) {
        const int i = tid + q * kMmaThreads;
        if (i < mrows * kMmaCols) sum[q] += __ldcg(parts + z * kTileFloats + i);
      }
    }
    if (tid == 0) a.split_counters[tile] = 0;  // ready for the next launch
  }
  // y += sum * scale: the tile's old values first, then the new ones. kMmaThreads is a multiple
  // of kMmaCols, so all of a thread's elements are in one column, j.
  static_assert(kMmaThreads % kMmaCols == 0, "a thread's elements share a column");
  const int64_t j = j0 + tid % kMmaCols;
  if (j >= a.delta.rows) return;
  const float scale = a.delta.scale[j];
  O* const y = static_cast<O*>(a.y);
  float old[kMine];
#pragma unroll
  for (int q = 0; q < kMine; ++q) {
    const int i = tid + q * kMmaThreads;
    old[q] = i < mrows * kMmaCols ? ToF(y[xrow_s[i / kMmaCols] * a.ldy + j]) : 0.0f;
  }
#pragma unroll
  for (int q = 0; q < kMine; ++q) {
    const int i = tid + q * kMmaThreads;
    if (i < mrows * kMmaCols)
      y[xrow_s[i / kMmaCols] * a.ldy + j] = FromF<O>(old[q] + sum[q] * scale);
  }
#endif
}

// Multiprocessors of the current device (0 where it cannot be read).
int DeviceSms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  return sms;
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

cudaError_t LaunchDeltaMma(const DeltaGemvArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.delta.rows == 0) return cudaSuccess;
  const int64_t row_tiles = (a.m + kMmaRows - 1) / kMmaRows;
  const int64_t col_tiles = (a.delta.rows + kMmaCols - 1) / kMmaCols;
  if (row_tiles > 0x7fffffff || col_tiles > 65535) return cudaErrorInvalidValue;
  // Split the columns where the tiles alone leave the GPU short of about four blocks per
  // multiprocessor (three or four fit at once: 128-168 registers and 35 KB of shared memory each),
  // keeping at least 4 steps a split and the workspace's room.
  const int64_t tiles = row_tiles * col_tiles;
  const int64_t steps = (a.delta.cols / 8 + kMmaUnits - 1) / kMmaUnits;
  int64_t splits = 1;
  if (a.split_workspace != nullptr && a.split_counters != nullptr &&
      tiles <= a.split_counters_count) {
    static const int sms = DeviceSms();
    const int64_t want = (4 * int64_t{sms} + tiles - 1) / tiles;
    const int64_t room = a.split_workspace_floats / (tiles * kMmaRows * kMmaCols);
    splits = std::min({want, steps / 4, room, int64_t{16}});
    if (splits < 2) splits = 1;
  }
  const int64_t per = (steps + splits - 1) / splits;
  splits = (steps + per - 1) / per;  // none empty
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles),
                  static_cast<unsigned>(splits));
  auto launch = [&](auto t) -> cudaError_t {
    using T = decltype(t);
    return DispatchAct(a.out_type, [&](auto o) {
      using O = decltype(o);
      return DispatchFormat(a.delta, [&]<int kBits, bool kSparse>() {
        DeltaMmaKernel<T, O, kBits, kSparse><<<grid, kMmaThreads, 0, stream>>>(a, per);
        return cudaGetLastError();
      });
    });
  };
  switch (a.act) {
    case ActType::kF16:
      return launch(__half{});
    case ActType::kBF16:
      return launch(__nv_bfloat16{});
    case ActType::kF32:
      break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t LaunchUnpackDelta(const UnpackDeltaArgs& a, cudaStream_t stream) {
  if (a.num_rows == 0) return cudaSuccess;
  constexpr int kThreads = 128;
  const dim3 grid(GridFor(a.delta.cols / 8, kThreads, 1024),
                  static_cast<unsigned>(a.num_rows < 65535 ? a.num_rows : 65535));
  const bool vec =
      reinterpret_cast<uintptr_t>(a.out) % 16 == 0 && (a.ld_out * ActBytes(a.out_type)) % 16 == 0;
  return DispatchAct(a.out_type, [&](auto o) {
    using O = decltype(o);
    return DispatchFormat(a.delta, [&]<int kBits, bool kSparse>() {
      if (vec) {
        UnpackDeltaKernel<O, kBits, kSparse, true><<<grid, kThreads, 0, stream>>>(a);
      } else {
        UnpackDeltaKernel<O, kBits, kSparse, false><<<grid, kThreads, 0, stream>>>(a);
      }
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
