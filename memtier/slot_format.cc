#include "memtier/slot_format.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace strata {
namespace {

// Header layout, little-endian (x86-64 and aarch64 hosts):
//   0 magic u64 | 8 layout_version u32 | 12 payload_layout u32 | 16 block_hash u64 |
//   24 cache_namespace u64 | 32 payload_bytes u64 | 40 payload_checksum u64 | 48 generation u64 |
//   56 header_checksum u64 (XXH3 of bytes 0..55)
template <typename T>
void Put(uint8_t* p, size_t offset, T v) {
  std::memcpy(p + offset, &v, sizeof(v));
}
template <typename T>
T Get(const uint8_t* p, size_t offset) {
  T v;
  std::memcpy(&v, p + offset, sizeof(v));
  return v;
}

uint64_t Checksum(const uint8_t* p, size_t n) {
  return Hash64(absl::string_view(reinterpret_cast<const char*>(p), n));
}

}  // namespace

size_t SlotBytesFor(size_t payload_bytes, size_t alignment) {
  const size_t n = kSlotHeaderBytes + payload_bytes;
  return (n + alignment - 1) / alignment * alignment;
}

absl::Status EncodeSlot(const SlotHeader& h, absl::Span<const uint8_t> payload,
                        absl::Span<uint8_t> slot) {
  if (slot.size() < kSlotHeaderBytes + payload.size()) {
    return absl::InvalidArgumentError(absl::StrCat("slot of ", slot.size(), " bytes cannot hold ",
                                                   payload.size(), " payload bytes"));
  }
  if (!payload.empty()) std::memcpy(slot.data() + kSlotHeaderBytes, payload.data(), payload.size());
  return SealSlot(h, payload.size(), slot);
}

absl::Status SealSlot(const SlotHeader& h, size_t payload_bytes, absl::Span<uint8_t> slot) {
  if (slot.size() < kSlotHeaderBytes + payload_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("slot of ", slot.size(), " bytes cannot hold ",
                                                   payload_bytes, " payload bytes"));
  }
  uint8_t* p = slot.data();
  Put<uint64_t>(p, 0, kSlotMagic);
  Put<uint32_t>(p, 8, kSlotLayoutVersion);
  Put<uint32_t>(p, 12, h.payload_layout);
  Put<uint64_t>(p, 16, h.block_hash);
  Put<uint64_t>(p, 24, h.cache_namespace);
  Put<uint64_t>(p, 32, payload_bytes);
  Put<uint64_t>(p, 40, Checksum(p + kSlotHeaderBytes, payload_bytes));
  Put<uint64_t>(p, 48, h.generation);
  Put<uint64_t>(p, 56, Checksum(p, 56));
  std::memset(p + kSlotHeaderBytes + payload_bytes, 0,
              slot.size() - kSlotHeaderBytes - payload_bytes);
  return absl::OkStatus();
}

void SetSlotGeneration(absl::Span<uint8_t> slot, uint64_t generation) {
  uint8_t* p = slot.data();
  Put<uint64_t>(p, 48, generation);
  Put<uint64_t>(p, 56, Checksum(p, 56));
}

absl::StatusOr<SlotHeader> ValidateSlotHeader(absl::Span<const uint8_t> slot) {
  if (slot.size() < kSlotHeaderBytes) return absl::DataLossError("slot shorter than its header");
  const uint8_t* p = slot.data();
  bool all_zero = true;
  for (size_t i = 0; i < kSlotHeaderBytes && all_zero; ++i) all_zero = p[i] == 0;
  if (all_zero) return absl::NotFoundError("slot never written");
  if (Get<uint64_t>(p, 0) != kSlotMagic) return absl::DataLossError("slot magic mismatch");
  if (Get<uint64_t>(p, 56) != Checksum(p, 56)) {
    return absl::DataLossError("slot header checksum mismatch");
  }
  if (Get<uint32_t>(p, 8) != kSlotLayoutVersion) {
    return absl::DataLossError(
        absl::StrCat("slot layout version ", Get<uint32_t>(p, 8), " is not ", kSlotLayoutVersion));
  }
  SlotHeader h;
  h.payload_layout = Get<uint32_t>(p, 12);
  h.block_hash = Get<uint64_t>(p, 16);
  h.cache_namespace = Get<uint64_t>(p, 24);
  h.payload_bytes = Get<uint64_t>(p, 32);
  h.generation = Get<uint64_t>(p, 48);
  if (h.payload_bytes > slot.size() - kSlotHeaderBytes) {
    return absl::DataLossError(absl::StrCat("slot claims ", h.payload_bytes,
                                            " payload bytes; it holds ",
                                            slot.size() - kSlotHeaderBytes));
  }
  return h;
}

absl::StatusOr<SlotHeader> ValidateSlot(absl::Span<const uint8_t> slot) {
  absl::StatusOr<SlotHeader> h = ValidateSlotHeader(slot);
  if (!h.ok()) return h;
  if (Checksum(slot.data() + kSlotHeaderBytes, h->payload_bytes) !=
      Get<uint64_t>(slot.data(), 40)) {
    return absl::DataLossError("slot payload checksum mismatch");
  }
  return h;
}

}  // namespace strata
