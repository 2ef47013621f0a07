// The CUDA runtime's resources as move-only RAII types, and cudaError_t as absl::Status. Every use
// of a stream or device allocation in Strata goes through these. Built only where the build has
// CUDA.
#ifndef STRATA_KERNELS_CUDA_RUNTIME_H_
#define STRATA_KERNELS_CUDA_RUNTIME_H_

#include <cuda_runtime_api.h>

#include <cstddef>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/stream.h"

namespace strata {

// OK for cudaSuccess. Otherwise UNAVAILABLE when there is no usable device or driver (so callers
// can skip or fall back to the CPU), RESOURCE_EXHAUSTED when out of device memory, INTERNAL for the
// rest; the message is "what: cudaErrorName: description".
absl::Status CudaStatus(cudaError_t error, absl::string_view what);

// Number of visible devices; UNAVAILABLE when the driver is missing or too old ("insufficient
// driver") or there is no device.
absl::StatusOr<int> CudaDeviceCount();

// Page-locks `bytes` of existing host memory at `ptr` for the current device (cudaHostRegister,
// portable), so that copies between it and device memory run as asynchronous DMA. UNAVAILABLE
// without a usable driver or device.
absl::Status RegisterPinnedHostMemory(void* ptr, size_t bytes);
absl::Status UnregisterPinnedHostMemory(void* ptr);

// Copies `bytes` between any two of host and device memory (cudaMemcpyDefault, unified addressing),
// complete on return (so work on any stream sees the result).
absl::Status CopyMemory(void* dst, const void* src, size_t bytes);
// Enqueues the same copy on `stream`; pinned host memory makes it asynchronous DMA.
absl::Status CopyMemoryAsync(void* dst, const void* src, size_t bytes, CudaStreamHandle stream);

// True when `ptr` is device (or managed) memory of the current device.
bool IsDeviceMemory(const void* ptr);

// An owned, non-blocking CUDA stream on the current device.
class CudaStream {
 public:
  static absl::StatusOr<CudaStream> Create();
  CudaStream(CudaStream&& other) noexcept : stream_(other.stream_) { other.stream_ = nullptr; }
  CudaStream& operator=(CudaStream&& other) noexcept;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  ~CudaStream();

  CudaStreamHandle handle() const { return stream_; }
  cudaStream_t get() const { return stream_; }
  // Blocks until all work on the stream is done; returns the first error it raised.
  absl::Status Synchronize() const;

 private:
  explicit CudaStream(cudaStream_t stream) : stream_(stream) {}
  cudaStream_t stream_ = nullptr;
};

// An owned device allocation (cudaMalloc). Contents are uninitialized.
class DeviceBuffer {
 public:
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& other) noexcept : data_(other.data_), bytes_(other.bytes_) {
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

  // Copies of the first `bytes` bytes, complete on return (so work on any stream sees them);
  // INVALID_ARGUMENT when bytes exceeds the buffer.
  absl::Status CopyFromHost(const void* src, size_t bytes);
  absl::Status CopyToHost(void* dst, size_t bytes) const;
  // Sets every byte to `value` (for poisoning outputs in tests), complete on return.
  absl::Status Fill(int value);

 private:
  DeviceBuffer(void* data, size_t bytes) : data_(data), bytes_(bytes) {}
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// An owned page-locked host allocation (cudaHostAlloc): copies between it and device memory are
// asynchronous DMA, so the host may not touch it until a copy that reads or writes it is done.
// Contents are uninitialized.
class PinnedHostBuffer {
 public:
  static absl::StatusOr<PinnedHostBuffer> Allocate(size_t bytes);
  PinnedHostBuffer() = default;
  PinnedHostBuffer(PinnedHostBuffer&& other) noexcept : data_(other.data_), bytes_(other.bytes_) {
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  PinnedHostBuffer& operator=(PinnedHostBuffer&& other) noexcept;
  PinnedHostBuffer(const PinnedHostBuffer&) = delete;
  PinnedHostBuffer& operator=(const PinnedHostBuffer&) = delete;
  ~PinnedHostBuffer();

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  PinnedHostBuffer(void* data, size_t bytes) : data_(data), bytes_(bytes) {}
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace strata

#endif  // STRATA_KERNELS_CUDA_RUNTIME_H_
