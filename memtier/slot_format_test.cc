#include "memtier/slot_format.h"

#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

std::vector<uint8_t> Payload(size_t n) {
  std::vector<uint8_t> p(n);
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(i * 7 + 3);
  return p;
}

SlotHeader Header() {
  SlotHeader h;
  h.block_hash = 0x1234;
  h.cache_namespace = 0x99;
  h.payload_layout = 2;
  h.generation = 5;
  return h;
}

TEST(SlotFormatTest, RoundTrip) {
  const std::vector<uint8_t> payload = Payload(5000);
  std::vector<uint8_t> slot(SlotBytesFor(payload.size(), 4096));
  EXPECT_EQ(slot.size(), 8192u);
  ASSERT_TRUE(EncodeSlot(Header(), payload, absl::MakeSpan(slot)).ok());
  absl::StatusOr<SlotHeader> h = ValidateSlot(slot);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->block_hash, 0x1234u);
  EXPECT_EQ(h->cache_namespace, 0x99u);
  EXPECT_EQ(h->payload_layout, 2u);
  EXPECT_EQ(h->generation, 5u);
  EXPECT_EQ(h->payload_bytes, 5000u);
  EXPECT_TRUE(std::equal(payload.begin(), payload.end(), slot.begin() + kSlotHeaderBytes));
  std::vector<uint8_t> small(100);
  EXPECT_EQ(EncodeSlot(Header(), payload, absl::MakeSpan(small)).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SlotFormatTest, EveryDamageIsAMissNeverData) {
  const std::vector<uint8_t> payload = Payload(3000);
  std::vector<uint8_t> good(SlotBytesFor(payload.size(), 4096));
  ASSERT_TRUE(EncodeSlot(Header(), payload, absl::MakeSpan(good)).ok());
  // A never-written slot.
  std::vector<uint8_t> zero(good.size(), 0);
  EXPECT_EQ(ValidateSlot(zero).status().code(), absl::StatusCode::kNotFound);
  // One flipped bit anywhere in the header or payload.
  for (size_t pos : {size_t{0}, size_t{9}, size_t{20}, size_t{33}, size_t{44}, size_t{60},
                     kSlotHeaderBytes, kSlotHeaderBytes + 1500, kSlotHeaderBytes + 2999}) {
    std::vector<uint8_t> bad = good;
    bad[pos] ^= 0x10;
    EXPECT_EQ(ValidateSlot(bad).status().code(), absl::StatusCode::kDataLoss) << "byte " << pos;
  }
  // A torn write: the new header landed, the payload is still the old one.
  std::vector<uint8_t> torn = good;
  std::vector<uint8_t> other = Payload(2900);
  for (uint8_t& b : other) b ^= 0x5A;
  std::vector<uint8_t> newer(good.size());
  SlotHeader h = Header();
  h.generation = 6;
  ASSERT_TRUE(EncodeSlot(h, other, absl::MakeSpan(newer)).ok());
  std::copy(newer.begin(), newer.begin() + kSlotHeaderBytes, torn.begin());
  EXPECT_EQ(ValidateSlot(torn).status().code(), absl::StatusCode::kDataLoss);
  // The header alone still reads (index rebuild), the payload check catches it.
  EXPECT_TRUE(ValidateSlotHeader(torn).ok());
  // Truncated: the slot is shorter than the length the header claims.
  EXPECT_EQ(ValidateSlot(absl::MakeConstSpan(good).subspan(0, 1000)).status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(ValidateSlot(absl::MakeConstSpan(good).subspan(0, 10)).status().code(),
            absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace strata
