#include "memtier/host_tier.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "memtier/slot_format.h"

#ifdef STRATA_HAVE_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace strata {

absl::Status CheckSlotImage(absl::Span<const uint8_t> image, BlockKey key, const KvCodec& codec) {
  absl::StatusOr<SlotHeader> h = ValidateSlot(image);
  if (!h.ok()) return h.status();
  if (h->block_hash != key.hash || h->cache_namespace != key.cache_namespace) {
    return absl::DataLossError("slot holds another block");
  }
  if (h->payload_layout != codec.payload_layout() ||
      static_cast<int64_t>(h->payload_bytes) != codec.encoded_bytes()) {
    return absl::DataLossError("slot holds a block in another encoding or layout");
  }
  return absl::OkStatus();
}

int64_t HostTier::SlotBytesFor(const KvCodec& codec) {
  return static_cast<int64_t>(strata::SlotBytesFor(codec.encoded_bytes(), 4096));
}

absl::StatusOr<std::unique_ptr<HostTier>> HostTier::Create(HostTierConfig config) {
  if (config.num_slots <= 0) return absl::InvalidArgumentError("host tier: needs slots");
  const int64_t slot_bytes = SlotBytesFor(config.codec);
  const int64_t bytes = slot_bytes * config.num_slots;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrCat("host tier: cannot map ", bytes, " bytes: ", strerror(errno)));
  }
  if (bytes >= (int64_t{2} << 20)) madvise(p, bytes, MADV_HUGEPAGE);
  auto tier = std::unique_ptr<HostTier>(
      new HostTier(std::move(config), static_cast<uint8_t*>(p), bytes, slot_bytes));
  if (tier->config_.pin) {
#ifdef STRATA_HAVE_CUDA
    tier->cuda_registered_ = RegisterPinnedHostMemory(p, bytes).ok();
#endif
    tier->locked_ = mlock(p, bytes) == 0;
    if (!tier->pinned()) {
      LOG(WARNING) << "host tier: " << bytes << " bytes could not be locked (" << strerror(errno)
                   << "); the pool works unpinned";
    }
  }
  return tier;
}

HostTier::HostTier(HostTierConfig config, uint8_t* base, int64_t bytes, int64_t slot_bytes)
    : config_(std::move(config)), base_(base), bytes_(bytes), slot_bytes_(slot_bytes) {}

HostTier::~HostTier() {
#ifdef STRATA_HAVE_CUDA
  if (cuda_registered_) UnregisterPinnedHostMemory(base_).IgnoreError();
#endif
  munmap(base_, bytes_);
}

namespace {

// Writes the header of `key`'s image in `img`, whose payload (n encoded bytes) is in place.
absl::Status SealImage(absl::Span<uint8_t> img, BlockKey key, const KvCodec& codec) {
  SlotHeader h;
  h.block_hash = key.hash;
  h.cache_namespace = key.cache_namespace;
  h.payload_layout = codec.payload_layout();
  return SealSlot(h, codec.encoded_bytes(), img);
}

}  // namespace

void HostTier::Write(int64_t slot, BlockKey key, absl::Span<const uint8_t> payload, Done done) {
  absl::Status status = CheckSlotAccess(*this, slot, payload.size());
  if (status.ok()) {
    absl::Span<uint8_t> img = image(slot);
    config_.codec.Encode(payload, img.subspan(kSlotHeaderBytes, config_.codec.encoded_bytes()));
    status = SealImage(img, key, config_.codec);
  }
  Finish(std::move(done), std::move(status));
}

void HostTier::Read(int64_t slot, BlockKey key, absl::Span<uint8_t> out, Done done) {
  absl::Status status = CheckSlotAccess(*this, slot, out.size());
  if (status.ok()) status = Check(slot, key);
  if (status.ok()) {
    config_.codec.Decode(image(slot).subspan(kSlotHeaderBytes, config_.codec.encoded_bytes()), out);
  }
  Finish(std::move(done), std::move(status));
}

absl::Span<uint8_t> HostTier::raw_payload(int64_t slot) const {
  if (!stores_raw() || slot < 0 || slot >= config_.num_slots) return {};
  return image(slot).subspan(kSlotHeaderBytes, static_cast<size_t>(payload_bytes()));
}

absl::Status HostTier::Seal(int64_t slot, BlockKey key) {
  if (!stores_raw()) return absl::FailedPreconditionError("host tier: Seal needs raw blocks");
  if (absl::Status s = CheckSlotAccess(*this, slot, static_cast<size_t>(payload_bytes()));
      !s.ok()) {
    return s;
  }
  return SealImage(image(slot), key, config_.codec);
}

absl::Status HostTier::Check(int64_t slot, BlockKey key) const {
  if (absl::Status s = CheckSlotAccess(*this, slot, static_cast<size_t>(payload_bytes()));
      !s.ok()) {
    return s;
  }
  absl::Status status = CheckSlotImage(image(slot), key, config_.codec);
  if (status.ok()) return status;
  return absl::Status(status.code(),
                      absl::StrCat("host tier: slot ", slot, ": ", status.message()));
}

}  // namespace strata
