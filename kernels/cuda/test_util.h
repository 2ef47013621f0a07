// Host helpers shared by the CUDA ops' differential tests (testonly): values rounded to and
// encoded in an activation type, and device buffers uploaded, poisoned and read back. Every
// helper that writes device memory waits for the device before returning: Fill and the
// host-to-device copy run on the legacy default stream, which does not order with the
// non-blocking streams the ops run on.
#ifndef STRATA_KERNELS_CUDA_TEST_UTIL_H_
#define STRATA_KERNELS_CUDA_TEST_UTIL_H_

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/ops_kernel.h"
#include "kernels/cuda/runtime.h"
#include "kernels/dtype.h"

namespace strata::cuda_test {

using gpu::ActType;

inline float RoundTo(ActType t, float x) {
  switch (t) {
    case ActType::kF32:
      return x;
    case ActType::kF16:
      return F16ToFloat(FloatToF16(x));
    case ActType::kBF16:
      return Bf16ToFloat(FloatToBf16(x));
  }
  return x;
}

inline std::vector<float> Rounded(ActType t, std::vector<float> v) {
  for (float& x : v) x = RoundTo(t, x);
  return v;
}

// The bytes of `v` in type t (exact when v is already rounded to t).
inline std::vector<uint8_t> Encode(ActType t, const std::vector<float>& v) {
  const size_t bytes = gpu::ActBytes(t);
  std::vector<uint8_t> out(v.size() * bytes);
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == ActType::kF32) {
      std::memcpy(out.data() + i * bytes, &v[i], bytes);
    } else {
      const uint16_t h = t == ActType::kF16 ? FloatToF16(v[i]) : FloatToBf16(v[i]);
      std::memcpy(out.data() + i * bytes, &h, bytes);
    }
  }
  return out;
}

inline float DecodeOne(ActType t, const uint8_t* p) {
  if (t == ActType::kF32) {
    float f;
    std::memcpy(&f, p, sizeof(f));
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return t == ActType::kF16 ? F16ToFloat(h) : Bf16ToFloat(h);
}

// `rows` rows of `width` values of type t, row stride `stride` elements, as dense f32.
inline std::vector<float> DecodeRows(ActType t, const std::vector<uint8_t>& bytes, int64_t rows,
                                     int64_t width, int64_t stride) {
  const int64_t eb = gpu::ActBytes(t);
  std::vector<float> out(rows * width);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < width; ++i) {
      out[r * width + i] = DecodeOne(t, &bytes[(r * stride + i) * eb]);
    }
  }
  return out;
}

// Every value of `bytes` (type t), as f32.
inline std::vector<float> Decode(ActType t, const std::vector<uint8_t>& bytes) {
  const int64_t n = static_cast<int64_t>(bytes.size()) / gpu::ActBytes(t);
  return DecodeRows(t, bytes, 1, n, n);
}

inline absl::Status Settle() {
  return CudaStatus(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

inline absl::StatusOr<DeviceBuffer> UploadBytes(const void* data, size_t bytes) {
  absl::StatusOr<DeviceBuffer> b = DeviceBuffer::Allocate(std::max<size_t>(bytes, 16));
  if (!b.ok()) return b.status();
  if (bytes > 0) {
    if (absl::Status s = b->CopyFromHost(data, bytes); !s.ok()) return s;
  }
  if (absl::Status s = Settle(); !s.ok()) return s;
  return b;
}

template <typename T>
absl::StatusOr<DeviceBuffer> UploadPod(const std::vector<T>& v) {
  return UploadBytes(v.data(), v.size() * sizeof(T));
}

// `v` (already rounded to t) as a device array of type t.
inline absl::StatusOr<DeviceBuffer> Upload(ActType t, const std::vector<float>& v) {
  const std::vector<uint8_t> bytes = Encode(t, v);
  return UploadBytes(bytes.data(), bytes.size());
}

// A device buffer of `bytes` bytes, every byte 0xff (NaN in f32, f16 and bf16; -1 in integers).
inline absl::StatusOr<DeviceBuffer> Poisoned(size_t bytes) {
  absl::StatusOr<DeviceBuffer> b = DeviceBuffer::Allocate(std::max<size_t>(bytes, 16));
  if (!b.ok()) return b.status();
  if (absl::Status s = b->Fill(0xff); !s.ok()) return s;
  if (absl::Status s = Settle(); !s.ok()) return s;
  return b;
}

inline absl::StatusOr<std::vector<uint8_t>> DownloadBytes(const DeviceBuffer& b, size_t bytes) {
  std::vector<uint8_t> out(bytes);
  if (absl::Status s = b.CopyToHost(out.data(), bytes); !s.ok()) return s;
  return out;
}

}  // namespace strata::cuda_test

#endif  // STRATA_KERNELS_CUDA_TEST_UTIL_H_
