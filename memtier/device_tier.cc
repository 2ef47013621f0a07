#include "memtier/device_tier.h"

#include <cstring>

#include "absl/strings/str_cat.h"

#ifdef STRATA_HAVE_CUDA
#include "kernels/cuda/runtime.h"
#else
namespace strata {
class DeviceBuffer {};
}  // namespace strata
#endif

namespace strata {

absl::StatusOr<std::unique_ptr<DeviceTier>> DeviceTier::Create(DeviceTierConfig config) {
  if (!config.layout.valid() || config.num_slots <= 0) {
    return absl::InvalidArgumentError("device tier: needs a valid block layout and slots");
  }
  if (!config.segments.empty() &&
      static_cast<int64_t>(config.segments.size()) != config.layout.num_segments) {
    return absl::InvalidArgumentError(absl::StrCat("device tier: ", config.segments.size(),
                                                   " segment arrays for a layout of ",
                                                   config.layout.num_segments));
  }
  if (config.gpu_memory && !config.segments.empty()) {
    return absl::InvalidArgumentError("device tier: gpu_memory is for a pool the tier allocates");
  }
  std::unique_ptr<DeviceBuffer> gpu;
  bool on_gpu = false;
#ifdef STRATA_HAVE_CUDA
  if (config.gpu_memory) {
    if (absl::StatusOr<int> n = CudaDeviceCount(); !n.ok()) return n.status();
    const size_t bytes = static_cast<size_t>(config.num_slots * config.layout.block_bytes());
    absl::StatusOr<DeviceBuffer> b = DeviceBuffer::Allocate(bytes);
    if (!b.ok()) return b.status();
    if (absl::Status s = b->Fill(0); !s.ok()) return s;
    gpu = std::make_unique<DeviceBuffer>(*std::move(b));
    const int64_t per_segment = config.num_slots * config.layout.segment_floats();
    for (int64_t s = 0; s < config.layout.num_segments; ++s) {
      config.segments.push_back(gpu->as<float>() + s * per_segment);
    }
  }
  on_gpu = !config.segments.empty() && IsDeviceMemory(config.segments[0]);
#else
  if (config.gpu_memory) {
    return absl::UnavailableError("device tier: GPU memory needs a CUDA build");
  }
#endif
  auto tier = std::unique_ptr<DeviceTier>(new DeviceTier(std::move(config)));
  tier->gpu_owned_ = std::move(gpu);
  tier->on_gpu_ = on_gpu;
  return tier;
}

DeviceTier::~DeviceTier() = default;

absl::Status DeviceTier::Copy(void* dst, const void* src, size_t bytes) const {
#ifdef STRATA_HAVE_CUDA
  if (on_gpu_) return CopyMemory(dst, src, bytes);
#endif
  std::memcpy(dst, src, bytes);
  return absl::OkStatus();
}

DeviceTier::DeviceTier(DeviceTierConfig config)
    : config_(std::move(config)), keys_(config_.num_slots) {
  if (config_.segments.empty()) {
    const int64_t per_segment = config_.num_slots * config_.layout.segment_floats();
    owned_.assign(per_segment * config_.layout.num_segments, 0.0f);
    for (int64_t s = 0; s < config_.layout.num_segments; ++s) {
      config_.segments.push_back(owned_.data() + s * per_segment);
    }
  }
}

void DeviceTier::Bind(int64_t slot, BlockKey key) { keys_[slot] = key; }

void DeviceTier::Write(int64_t slot, BlockKey key, absl::Span<const uint8_t> payload, Done done) {
  absl::Status status = CheckSlotAccess(*this, slot, payload.size());
  if (status.ok()) {
    keys_[slot].reset();  // a copy that fails halfway leaves no block here
    const int64_t n = config_.layout.segment_floats();
    const int64_t bytes = config_.layout.segment_bytes();
    for (size_t s = 0; s < config_.segments.size() && status.ok(); ++s) {
      status = Copy(config_.segments[s] + slot * n, payload.data() + s * bytes, bytes);
    }
    if (status.ok()) keys_[slot] = key;
  }
  Finish(std::move(done), std::move(status));
}

void DeviceTier::Read(int64_t slot, BlockKey key, absl::Span<uint8_t> out, Done done) {
  absl::Status status = CheckSlotAccess(*this, slot, out.size());
  if (status.ok()) {
    if (!keys_[slot].has_value()) {
      status = absl::NotFoundError(absl::StrCat("device tier: slot ", slot, " holds no block"));
    } else if (!(*keys_[slot] == key)) {
      status = absl::DataLossError(
          absl::StrCat("device tier: slot ", slot, " holds another block than the one asked for"));
    } else {
      const int64_t n = config_.layout.segment_floats();
      const int64_t bytes = config_.layout.segment_bytes();
      for (size_t s = 0; s < config_.segments.size() && status.ok(); ++s) {
        status = Copy(out.data() + s * bytes, config_.segments[s] + slot * n, bytes);
      }
    }
  }
  Finish(std::move(done), std::move(status));
}

}  // namespace strata
