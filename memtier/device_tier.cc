#include "memtier/device_tier.h"

#include <cstring>

#include "absl/strings/str_cat.h"

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
  return std::unique_ptr<DeviceTier>(new DeviceTier(std::move(config)));
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

void DeviceTier::Unbind(int64_t slot) { keys_[slot].reset(); }

void DeviceTier::Write(int64_t slot, BlockKey key, absl::Span<const uint8_t> payload, Done done) {
  absl::Status status = CheckSlotAccess(*this, slot, payload.size());
  if (status.ok()) {
    const int64_t n = config_.layout.segment_floats();
    const int64_t bytes = config_.layout.segment_bytes();
    for (size_t s = 0; s < config_.segments.size(); ++s) {
      std::memcpy(config_.segments[s] + slot * n, payload.data() + s * bytes, bytes);
    }
    keys_[slot] = key;
  }
  ready_.Add(std::move(done), std::move(status));
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
      for (size_t s = 0; s < config_.segments.size(); ++s) {
        std::memcpy(out.data() + s * bytes, config_.segments[s] + slot * n, bytes);
      }
    }
  }
  ready_.Add(std::move(done), std::move(status));
}

}  // namespace strata
