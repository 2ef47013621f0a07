#include "common/copy.h"

#include <cstdint>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

// Every size around the vector loop's unrolling and thresholds, at every source and destination
// offset within a cache line: the bytes arrive, and nothing outside the destination changes.
TEST(CopyBytesTest, CopiesExactlyTheBytesAtEverySizeAndOffset) {
  std::vector<size_t> sizes = {0,
                               1,
                               7,
                               63,
                               64,
                               65,
                               127,
                               128,
                               129,
                               2047,
                               2048,
                               2049,
                               4096 + 17,
                               65536 + 100,
                               (size_t{4} << 20) - 1,
                               size_t{4} << 20,
                               (size_t{4} << 20) + 1};
  constexpr size_t kPad = 64;
  for (size_t n : sizes) {
    for (size_t src_off : {size_t{0}, size_t{1}, size_t{16}, size_t{33}}) {
      for (size_t dst_off : {size_t{0}, size_t{5}, size_t{16}, size_t{31}}) {
        std::vector<uint8_t> src(n + kPad), dst(n + 3 * kPad, 0xee);
        for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 131 + n);
        const size_t at = kPad + dst_off;
        CopyBytes(dst.data() + at, src.data() + src_off, n);
        bool same = true;
        for (size_t i = 0; i < n && same; ++i) same = dst[at + i] == src[src_off + i];
        EXPECT_TRUE(same) << n << " bytes from +" << src_off << " to +" << dst_off;
        for (size_t i = 0; i < at; ++i) ASSERT_EQ(dst[i], 0xee) << "wrote before: " << n;
        for (size_t i = at + n; i < dst.size(); ++i) ASSERT_EQ(dst[i], 0xee) << "wrote past: " << n;
      }
    }
  }
}

}  // namespace
}  // namespace strata
