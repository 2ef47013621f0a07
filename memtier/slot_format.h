// The on-media format of one KV block slot in the host and disk tiers.
//
// Durability protocol. A slot is [64-byte header][payload][zero padding to the slot size]. The
// header names the block (chain hash and cache namespace, common/hash.h), the layout version of the
// payload, its length, an XXH3 checksum of the payload, a write generation, and an XXH3 checksum
// of the header's first 56 bytes. A slot is trusted only when the magic, the version, both
// checksums and the length all check out; anything else (a torn write, truncation, bit rot, a slot
// never written) is a miss, reported as DATA_LOSS (or NOT_FOUND for an all-zero slot), never data.
// Because the payload checksum is in the header and the header is written with the payload in one
// write, a write torn at any point fails one of the checks. The disk tier rebuilds its index at
// start-up by reading every slot's header (ValidateSlotHeader), and verifies the payload on each
// read (ValidateSlot).
#ifndef STRATA_MEMTIER_SLOT_FORMAT_H_
#define STRATA_MEMTIER_SLOT_FORMAT_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/hash.h"

namespace strata {

inline constexpr size_t kSlotHeaderBytes = 64;
inline constexpr uint64_t kSlotMagic = 0x31305654'4B525453ull;  // "STRKTV01" little-endian
inline constexpr uint32_t kSlotLayoutVersion = 1;

struct SlotHeader {
  BlockHash block_hash = 0;
  uint64_t cache_namespace = 0;
  // What the payload holds (for example the KV dtype and layout); readers refuse other values.
  uint32_t payload_layout = 0;
  uint64_t payload_bytes = 0;
  // Increases with every write of the slot; the newest valid copy of a block wins on rebuild.
  uint64_t generation = 0;
};

// Bytes a slot needs for `payload_bytes`, rounded up to `alignment` (a power of two; 4096 for
// O_DIRECT).
size_t SlotBytesFor(size_t payload_bytes, size_t alignment);

// Writes header, payload and zero padding into `slot` (slot.size() >= kSlotHeaderBytes +
// payload.size(); INVALID_ARGUMENT otherwise).
absl::Status EncodeSlot(const SlotHeader& header, absl::Span<const uint8_t> payload,
                        absl::Span<uint8_t> slot);

// Writes the header for a payload already in place at slot[kSlotHeaderBytes, + payload_bytes)
// (encoded there by a codec) and zeroes the padding after it. INVALID_ARGUMENT when it does not
// fit.
absl::Status SealSlot(const SlotHeader& header, size_t payload_bytes, absl::Span<uint8_t> slot);

// Rewrites the generation of a sealed slot (and its header checksum), leaving the rest as is.
void SetSlotGeneration(absl::Span<uint8_t> slot, uint64_t generation);

// Checks the header alone (magic, version, header checksum, length within the slot size).
// NOT_FOUND for an all-zero header (never written), DATA_LOSS for anything else that is wrong.
absl::StatusOr<SlotHeader> ValidateSlotHeader(absl::Span<const uint8_t> slot);

// Checks the header and the payload checksum; the payload is slot[kSlotHeaderBytes,
// kSlotHeaderBytes + payload_bytes).
absl::StatusOr<SlotHeader> ValidateSlot(absl::Span<const uint8_t> slot);

}  // namespace strata

#endif  // STRATA_MEMTIER_SLOT_FORMAT_H_
