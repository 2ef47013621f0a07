#include "common/hash.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

void AppendU64(std::string* out, uint64_t v) { out->append(reinterpret_cast<const char*>(&v), 8); }

TEST(HashTest, Xxh3KnownAnswer) {
  // XXH3_64bits("") from the xxHash reference.
  EXPECT_EQ(Hash64(""), 0x2D06800538D394C2ull);
  EXPECT_NE(Hash64("a"), Hash64("b"));
  EXPECT_NE(Hash64("a", 1), Hash64("a", 2));
}

TEST(HashTest, EncodingIsTheDocumentedOne) {
  std::string ns_bytes;
  for (absl::string_view part : {"llama", "tenant-7-delta", "salt"}) {
    AppendU64(&ns_bytes, part.size());
    ns_bytes.append(part.data(), part.size());
  }
  const uint64_t ns = CacheNamespace("llama", "tenant-7-delta", "salt");
  EXPECT_EQ(ns, Hash64(ns_bytes));

  const std::vector<int32_t> tokens = {1, 15043, -1, 2};
  std::string block_bytes;
  AppendU64(&block_bytes, 0x1234);
  AppendU64(&block_bytes, ns);
  block_bytes.append(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 4);
  EXPECT_EQ(ChainBlockHash(0x1234, ns, tokens), Hash64(block_bytes));
}

TEST(HashTest, PinnedValuesNeverChange) {
  // Coordinators and workers of different versions must agree: these values are part of the
  // protocol.
  const uint64_t ns = CacheNamespace("strata-tiny", "", "");
  EXPECT_EQ(ns, 0x8985a3e85cda8632ull);
  const std::vector<int32_t> tokens = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  EXPECT_EQ(ChainBlockHash(kRootBlockHash, ns, tokens), 0xd1eadd581fdb91eeull);
}

TEST(HashTest, NamespaceFieldsDoNotRunTogether) {
  EXPECT_NE(CacheNamespace("ab", "c", ""), CacheNamespace("a", "bc", ""));
  EXPECT_NE(CacheNamespace("m", "", "s"), CacheNamespace("m", "s", ""));
  EXPECT_NE(CacheNamespace("m", "", "tenant-a"), CacheNamespace("m", "", "tenant-b"));
}

TEST(HashTest, ChainDependsOnParentNamespaceAndEveryToken) {
  const std::vector<int32_t> a = {5, 6, 7, 8};
  const uint64_t base = ChainBlockHash(kRootBlockHash, 1, a);
  EXPECT_NE(base, ChainBlockHash(99, 1, a));
  EXPECT_NE(base, ChainBlockHash(kRootBlockHash, 2, a));
  for (size_t i = 0; i < a.size(); ++i) {
    std::vector<int32_t> b = a;
    b[i] += 1;
    EXPECT_NE(base, ChainBlockHash(kRootBlockHash, 1, b)) << i;
  }
  const std::vector<int32_t> swapped = {6, 5, 7, 8};
  EXPECT_NE(base, ChainBlockHash(kRootBlockHash, 1, swapped));
}

TEST(HashTest, PrefixBlockHashesChainFullBlocksOnly) {
  std::vector<int32_t> tokens(37);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i * 7);
  const uint64_t ns = CacheNamespace("m", "", "");
  const std::vector<BlockHash> h = PrefixBlockHashes(ns, tokens, 16);
  ASSERT_EQ(h.size(), 2u);  // 37 tokens: two full blocks of 16, 5 left over
  const absl::Span<const int32_t> all(tokens);
  EXPECT_EQ(h[0], ChainBlockHash(kRootBlockHash, ns, all.subspan(0, 16)));
  EXPECT_EQ(h[1], ChainBlockHash(h[0], ns, all.subspan(16, 16)));

  // A shared prefix gives shared leading hashes; the first differing block and all after differ.
  std::vector<int32_t> other = tokens;
  other[20] = -5;
  const std::vector<BlockHash> g = PrefixBlockHashes(ns, other, 16);
  EXPECT_EQ(g[0], h[0]);
  EXPECT_NE(g[1], h[1]);
  EXPECT_TRUE(PrefixBlockHashes(ns, absl::Span<const int32_t>(tokens).first(15), 16).empty());
}

TEST(FineTuneNamespaceIdTest, RevisionJoinsTheIdOnlyForAFineTune) {
  EXPECT_EQ(FineTuneNamespaceId("", ""), "");
  EXPECT_EQ(FineTuneNamespaceId("", "0123456789abcdef"), "");
  EXPECT_EQ(FineTuneNamespaceId("tenant", ""), "tenant");
  EXPECT_EQ(FineTuneNamespaceId("tenant", "0123456789abcdef"), "tenant@0123456789abcdef");
  EXPECT_NE(CacheNamespace("m", FineTuneNamespaceId("t", "aaaa"), ""),
            CacheNamespace("m", FineTuneNamespaceId("t", "bbbb"), ""));
}

}  // namespace
}  // namespace strata
