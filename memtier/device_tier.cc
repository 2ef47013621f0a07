#include "memtier/device_tier.h"

#include <cstring>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/copy.h"
#include "common/status_macros.h"

#ifdef STRATA_HAVE_CUDA
#include "kernels/cuda/runtime.h"
#include "kernels/kv_block_copy.h"
#endif

namespace strata {

#ifdef STRATA_HAVE_CUDA
// The GPU path: a stream, and one device allocation holding the segment pointer table, the slot
// ids 0..num_slots-1 (kv_block_copy takes its block ids from device memory) and one packed block.
struct DeviceTier::Gpu {
  explicit Gpu(CudaStream s) : stream(std::move(s)) {}
  CudaStream stream;
  DeviceBuffer tables;
  DeviceBuffer owned;  // the segment arrays, when the tier allocated them
  void** segments = nullptr;
  int32_t* slot_ids = nullptr;
  uint8_t* packed = nullptr;
};
#else
struct DeviceTier::Gpu {};
#endif

namespace {

#ifdef STRATA_HAVE_CUDA
constexpr size_t Align256(size_t n) { return (n + 255) / 256 * 256; }
#endif

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceTier>> DeviceTier::Create(DeviceTierConfig config) {
  if (!config.layout.valid() || config.num_slots <= 0) {
    return absl::InvalidArgumentError(
        "device tier: needs a valid block layout (f32, f16 or bf16 elements) and slots");
  }
  if (config.num_slots > int64_t{1} << 31) {
    return absl::InvalidArgumentError("device tier: more than 2^31 slots");
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
  std::unique_ptr<Gpu> gpu;
#ifdef STRATA_HAVE_CUDA
  const bool on_gpu =
      config.gpu_memory || (!config.segments.empty() && IsDeviceMemory(config.segments[0]));
  if (on_gpu) {
    RETURN_IF_ERROR(CudaDeviceCount().status());
    if (config.layout.segment_bytes() % 16 != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("device tier: a block's segment is ", config.layout.segment_bytes(),
                       " bytes; the GPU copy needs a multiple of 16"));
    }
    for (void* p : config.segments) {
      if (!IsDeviceMemory(p)) {
        return absl::InvalidArgumentError(
            "device tier: segment arrays are partly in host and partly in GPU memory");
      }
    }
    ASSIGN_OR_RETURN(CudaStream stream, CudaStream::Create());
    gpu = std::make_unique<Gpu>(std::move(stream));
    const int64_t per_segment = config.num_slots * config.layout.segment_bytes();
    if (config.gpu_memory) {
      ASSIGN_OR_RETURN(
          gpu->owned,
          DeviceBuffer::Allocate(static_cast<size_t>(per_segment * config.layout.num_segments)));
      RETURN_IF_ERROR(gpu->owned.Fill(0));
      for (int64_t s = 0; s < config.layout.num_segments; ++s) {
        config.segments.push_back(gpu->owned.as<uint8_t>() + s * per_segment);
      }
    }
    const size_t table_bytes = Align256(config.segments.size() * sizeof(void*));
    const size_t ids_bytes = Align256(static_cast<size_t>(config.num_slots) * sizeof(int32_t));
    ASSIGN_OR_RETURN(gpu->tables,
                     DeviceBuffer::Allocate(table_bytes + ids_bytes +
                                            static_cast<size_t>(config.layout.block_bytes())));
    uint8_t* base = gpu->tables.as<uint8_t>();
    gpu->segments = reinterpret_cast<void**>(base);
    gpu->slot_ids = reinterpret_cast<int32_t*>(base + table_bytes);
    gpu->packed = base + table_bytes + ids_bytes;
    std::vector<int32_t> ids(static_cast<size_t>(config.num_slots));
    std::iota(ids.begin(), ids.end(), 0);
    RETURN_IF_ERROR(
        CopyMemory(gpu->segments, config.segments.data(), config.segments.size() * sizeof(void*)));
    RETURN_IF_ERROR(CopyMemory(gpu->slot_ids, ids.data(), ids.size() * sizeof(int32_t)));
  }
#else
  if (config.gpu_memory) {
    return absl::UnavailableError("device tier: GPU memory needs a CUDA build");
  }
#endif
  auto tier = std::unique_ptr<DeviceTier>(new DeviceTier(std::move(config)));
  tier->gpu_ = std::move(gpu);
  return tier;
}

DeviceTier::~DeviceTier() = default;

DeviceTier::DeviceTier(DeviceTierConfig config)
    : config_(std::move(config)), keys_(config_.num_slots) {
  if (config_.segments.empty()) {
    const int64_t per_segment = config_.num_slots * config_.layout.segment_bytes();
    owned_.assign(per_segment * config_.layout.num_segments, 0);
    for (int64_t s = 0; s < config_.layout.num_segments; ++s) {
      config_.segments.push_back(owned_.data() + s * per_segment);
    }
  }
}

absl::Status DeviceTier::Copy(int64_t slot, bool gather, uint8_t* packed) {
  const int64_t bytes = config_.layout.segment_bytes();
  if (gpu_ == nullptr) {
    for (size_t s = 0; s < config_.segments.size(); ++s) {
      uint8_t* cache = static_cast<uint8_t*>(config_.segments[s]) + slot * bytes;
      uint8_t* pack = packed + s * bytes;
      if (gather) {
        CopyBytes(pack, cache, static_cast<size_t>(bytes));
      } else {
        CopyBytes(cache, pack, static_cast<size_t>(bytes));
      }
    }
    return absl::OkStatus();
  }
#ifdef STRATA_HAVE_CUDA
  KvBlockCopyParams p;
  p.direction = gather ? KvBlockCopyDirection::kGather : KvBlockCopyDirection::kScatter;
  p.num_segments = config_.layout.num_segments;
  p.segment_bytes = bytes;
  p.cache_blocks = config_.num_slots;
  p.num_blocks = 1;
  p.segments = gpu_->segments;
  p.block_ids = gpu_->slot_ids + slot;
  p.packed = gpu_->packed;
  const size_t block_bytes = static_cast<size_t>(config_.layout.block_bytes());
  const CudaStreamHandle stream = gpu_->stream.handle();
  absl::Status status;
  if (gather) {
    status = KvBlockCopyCuda(p, stream);
    if (status.ok()) status = CopyMemoryAsync(packed, gpu_->packed, block_bytes, stream);
  } else {
    status = CopyMemoryAsync(gpu_->packed, packed, block_bytes, stream);
    if (status.ok()) status = KvBlockCopyCuda(p, stream);
  }
  // Whatever was queued finishes before the caller reuses `packed`, failed or not.
  absl::Status idle = gpu_->stream.Synchronize();
  return status.ok() ? idle : status;
#else
  return absl::InternalError("device tier: GPU path in a build without CUDA");
#endif
}

void DeviceTier::Bind(int64_t slot, BlockKey key) { keys_[slot] = key; }

void DeviceTier::Write(int64_t slot, BlockKey key, absl::Span<const uint8_t> payload, Done done) {
  absl::Status status = CheckSlotAccess(*this, slot, payload.size());
  if (status.ok()) {
    keys_[slot].reset();  // a copy that fails halfway leaves no block here
    // The scatter only reads the payload.
    status = Copy(slot, /*gather=*/false, const_cast<uint8_t*>(payload.data()));
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
      status = Copy(slot, /*gather=*/true, out.data());
    }
  }
  Finish(std::move(done), std::move(status));
}

}  // namespace strata
