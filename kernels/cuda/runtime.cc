#include "kernels/cuda/runtime.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace strata {

absl::Status CudaStatus(cudaError_t error, absl::string_view what) {
  if (error == cudaSuccess) return absl::OkStatus();
  const std::string message =
      absl::StrCat(what, ": ", cudaGetErrorName(error), ": ", cudaGetErrorString(error));
  switch (error) {
    case cudaErrorInsufficientDriver:
    case cudaErrorNoDevice:
    case cudaErrorDevicesUnavailable:
    case cudaErrorInitializationError:
      return absl::UnavailableError(message);
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorInvalidValue:
      return absl::InvalidArgumentError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::StatusOr<int> CudaDeviceCount() {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return CudaStatus(error, "cudaGetDeviceCount");
  }
  if (count == 0) return absl::UnavailableError("cudaGetDeviceCount: no CUDA device");
  return count;
}

absl::Status RegisterPinnedHostMemory(void* ptr, size_t bytes) {
  absl::Status s =
      CudaStatus(cudaHostRegister(ptr, bytes, cudaHostRegisterPortable), "cudaHostRegister");
  if (!s.ok()) cudaGetLastError();
  return s;
}

absl::Status UnregisterPinnedHostMemory(void* ptr) {
  return CudaStatus(cudaHostUnregister(ptr), "cudaHostUnregister");
}

absl::Status CopyMemory(void* dst, const void* src, size_t bytes) {
  // From pageable memory cudaMemcpy may return before the data lands: wait for it.
  if (absl::Status s = CudaStatus(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), "cudaMemcpy");
      !s.ok()) {
    return s;
  }
  return CudaStatus(cudaStreamSynchronize(nullptr), "cudaMemcpy");
}

absl::Status CopyMemoryAsync(void* dst, const void* src, size_t bytes, CudaStreamHandle stream) {
  return CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream), "cudaMemcpyAsync");
}

bool IsDeviceMemory(const void* ptr) {
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, ptr) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged;
}

absl::StatusOr<CudaStream> CudaStream::Create() {
  cudaStream_t stream = nullptr;
  if (absl::Status s = CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                                  "cudaStreamCreateWithFlags");
      !s.ok()) {
    return s;
  }
  return CudaStream(stream);
}

CudaStream& CudaStream::operator=(CudaStream&& other) noexcept {
  if (this != &other) {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

CudaStream::~CudaStream() {
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status CudaStream::Synchronize() const {
  return CudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  void* data = nullptr;
  if (bytes > 0) {
    if (absl::Status s =
            CudaStatus(cudaMalloc(&data, bytes), absl::StrCat("cudaMalloc(", bytes, ")"));
        !s.ok()) {
      return s;
    }
  }
  return DeviceBuffer(data, bytes);
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) cudaFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr) cudaFree(data_);
}

absl::StatusOr<PinnedHostBuffer> PinnedHostBuffer::Allocate(size_t bytes) {
  void* data = nullptr;
  if (bytes > 0) {
    if (absl::Status s = CudaStatus(cudaHostAlloc(&data, bytes, cudaHostAllocDefault),
                                    absl::StrCat("cudaHostAlloc(", bytes, ")"));
        !s.ok()) {
      return s;
    }
  }
  return PinnedHostBuffer(data, bytes);
}

PinnedHostBuffer& PinnedHostBuffer::operator=(PinnedHostBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) cudaFreeHost(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

PinnedHostBuffer::~PinnedHostBuffer() {
  if (data_ != nullptr) cudaFreeHost(data_);
}

absl::Status DeviceBuffer::CopyFromHost(const void* src, size_t bytes) {
  if (bytes > bytes_) {
    return absl::InvalidArgumentError(
        absl::StrCat("CopyFromHost: ", bytes, " bytes into a ", bytes_, "-byte buffer"));
  }
  // From pageable memory cudaMemcpy may return before the data lands, and work on non-blocking
  // streams is not ordered after it: wait for it.
  if (absl::Status s =
          CudaStatus(cudaMemcpy(data_, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
      !s.ok()) {
    return s;
  }
  return CudaStatus(cudaStreamSynchronize(nullptr), "cudaMemcpy H2D");
}

absl::Status DeviceBuffer::CopyToHost(void* dst, size_t bytes) const {
  if (bytes > bytes_) {
    return absl::InvalidArgumentError(
        absl::StrCat("CopyToHost: ", bytes, " bytes from a ", bytes_, "-byte buffer"));
  }
  return CudaStatus(cudaMemcpy(dst, data_, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
}

absl::Status DeviceBuffer::Fill(int value) {
  // cudaMemset is asynchronous on the legacy stream, which non-blocking streams do not wait for.
  if (absl::Status s = CudaStatus(cudaMemset(data_, value, bytes_), "cudaMemset"); !s.ok()) {
    return s;
  }
  return CudaStatus(cudaStreamSynchronize(nullptr), "cudaMemset");
}

}  // namespace strata
