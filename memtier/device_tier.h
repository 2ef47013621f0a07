// DeviceTier: the engine's KV cache blocks, seen as a BlockTier.
//
// A slot is one block of the paged KV cache: for each segment (K or V of a layer), the `slot`-th
// [block_tokens, num_heads, head_dim] row of that segment's array. Write scatters a raw payload
// into the segments, Read gathers them. The engine computes most blocks in place rather than
// writing them here; Bind names such a block so that Read can check the key it is asked for.
//
// Memory: the segment arrays belong to the caller (the engine's KV cache, on the host or a GPU),
// or to the tier when the config names none: host memory, or GPU memory with `gpu_memory` (a CUDA
// build with a device). Host copies are memcpy. GPU copies gather a block's segments into one
// packed device buffer (kv_block_copy) and move it with one copy, or the reverse, on the tier's
// own stream; they are complete when Write/Read return (callbacks still wait for Poll, per the
// BlockTier contract). The caller orders them after the compute that wrote a block and before the
// compute that reads it: the GPU engine's steps end synchronized, and tier copies run between
// them.
//
// Thread contract: the engine's step thread owns it, like the cache it views.
#ifndef STRATA_MEMTIER_DEVICE_TIER_H_
#define STRATA_MEMTIER_DEVICE_TIER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "memtier/block_tier.h"

namespace strata {

struct DeviceTierConfig {
  KvBlockLayout layout;
  int64_t num_slots = 0;
  // Per segment, the base of its [num_slots, block_tokens, num_heads, head_dim] array of
  // layout.dtype, all in host memory or all in the current GPU's memory; empty: the tier
  // allocates its own (zeroed).
  std::vector<void*> segments;
  // When the tier allocates: in GPU memory (UNAVAILABLE without a CUDA device) instead of host.
  bool gpu_memory = false;
};

class DeviceTier final : public ImmediateTier {
 public:
  // INVALID_ARGUMENT for an invalid layout, no slots, or a segment count that does not match.
  static absl::StatusOr<std::unique_ptr<DeviceTier>> Create(DeviceTierConfig config);
  ~DeviceTier() override;

  // The block in `slot` was computed in place and is `key` now.
  void Bind(int64_t slot, BlockKey key);

  Tier tier() const override { return Tier::kDevice; }
  int64_t num_slots() const override { return config_.num_slots; }
  int64_t payload_bytes() const override { return config_.layout.block_bytes(); }
  int64_t slot_bytes() const override { return config_.layout.block_bytes(); }
  void Write(int64_t slot, BlockKey key, absl::Span<const uint8_t> payload, Done done) override;
  void Read(int64_t slot, BlockKey key, absl::Span<uint8_t> out, Done done) override;

 private:
  struct Gpu;  // the GPU path's stream and buffers (device_tier.cc)

  explicit DeviceTier(DeviceTierConfig config);
  // Moves one block between `slot` of the segments and a packed host payload.
  absl::Status Copy(int64_t slot, bool gather, uint8_t* packed);

  DeviceTierConfig config_;
  std::vector<uint8_t> owned_;
  std::unique_ptr<Gpu> gpu_;
  std::vector<std::optional<BlockKey>> keys_;
};

}  // namespace strata

#endif  // STRATA_MEMTIER_DEVICE_TIER_H_
