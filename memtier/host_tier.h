// HostTier: a pool of KV block slots in pinned host memory.
//
// Each slot holds a block as a slot image (slot_format.h): a checksummed header, the payload
// encoded by the tier's KvCodec (raw or quantized), zero padding to a multiple of 4096 bytes. The
// disk tier uses the same images, so blocks move between host and disk as they are (image(),
// with the pool registered as an io_uring fixed buffer), and a block read back from disk is
// checked once more when it is read from here.
//
// Memory: one anonymous mapping, locked (mlock) and, in a CUDA build with a driver, registered with
// CUDA (cudaHostRegister) so that device copies from and to it are asynchronous DMA. When neither
// succeeds (no memlock allowance, no GPU), the pool still works, unpinned; pinned() says which.
//
// Thread contract: one owning thread (the engine's step thread). Copies happen within Write/Read;
// callbacks wait for Poll.
#ifndef STRATA_MEMTIER_HOST_TIER_H_
#define STRATA_MEMTIER_HOST_TIER_H_

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "memtier/block_tier.h"
#include "memtier/kv_codec.h"

namespace strata {

struct HostTierConfig {
  KvCodec codec{KvBlockLayout{1, 1, 1, 1}, KvCompression::kNone};
  int64_t num_slots = 0;
  // Lock the pool in RAM (and register it with CUDA where there is a device).
  bool pin = true;
};

class HostTier final : public ImmediateTier {
 public:
  // RESOURCE_EXHAUSTED when the pool cannot be mapped.
  static absl::StatusOr<std::unique_ptr<HostTier>> Create(HostTierConfig config);
  ~HostTier() override;

  // Slot bytes for a codec: header plus encoded payload, rounded up to 4096.
  static int64_t SlotBytesFor(const KvCodec& codec);

  // The whole pool, and one slot's image, for transfers to and from the disk tier. The caller
  // keeps the slot pinned (no Write) while a transfer uses its image.
  absl::Span<uint8_t> region() const { return absl::MakeSpan(base_, bytes_); }
  absl::Span<uint8_t> image(int64_t slot) const {
    return absl::MakeSpan(base_ + slot * slot_bytes_, slot_bytes_);
  }
  const KvCodec& codec() const { return config_.codec; }
  bool pinned() const { return locked_ || cuda_registered_; }

  // Raw blocks (no compression) sit in a slot's image as they are, so another tier can copy
  // straight into or out of the image (KvStore: device <-> host with no staging copy):
  //   - raw_payload(slot): the payload's bytes in the image (payload_bytes() of them);
  //   - Seal(slot, key): after filling raw_payload(slot), writes the header and checksum, as
  //     Write would have;
  //   - Check(slot, key): whether the slot holds a valid copy of `key` (Read's checks, same
  //     statuses), before reading raw_payload(slot) in place.
  // For compressed codecs raw_payload is empty and Seal is FAILED_PRECONDITION.
  bool stores_raw() const { return config_.codec.compression() == KvCompression::kNone; }
  absl::Span<uint8_t> raw_payload(int64_t slot) const;
  absl::Status Seal(int64_t slot, BlockKey key);
  absl::Status Check(int64_t slot, BlockKey key) const;

  Tier tier() const override { return Tier::kHost; }
  int64_t num_slots() const override { return config_.num_slots; }
  int64_t payload_bytes() const override { return config_.codec.raw_bytes(); }
  int64_t slot_bytes() const override { return slot_bytes_; }
  void Write(int64_t slot, BlockKey key, absl::Span<const uint8_t> payload, Done done) override;
  void Read(int64_t slot, BlockKey key, absl::Span<uint8_t> out, Done done) override;

 private:
  HostTier(HostTierConfig config, uint8_t* base, int64_t bytes, int64_t slot_bytes);

  HostTierConfig config_;
  uint8_t* base_;
  int64_t bytes_;
  int64_t slot_bytes_;
  bool locked_ = false;
  bool cuda_registered_ = false;
};

// Checks that `image` is a valid slot image of `key` written with `codec`: OK, NOT_FOUND (never
// written) or DATA_LOSS (another block, another encoding, a checksum mismatch).
absl::Status CheckSlotImage(absl::Span<const uint8_t> image, BlockKey key, const KvCodec& codec);

}  // namespace strata

#endif  // STRATA_MEMTIER_HOST_TIER_H_
