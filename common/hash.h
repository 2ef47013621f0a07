// Hashing: XXH3 (64-bit) for bytes, and the chained KV block hash that names a block cluster-wide.
//
// Block identity protocol. A KV block holds `block_tokens` consecutive tokens of one sequence. Its
// hash covers the hash of the block before it (kRootBlockHash for the first), the cache namespace,
// and the block's token ids, so equal hashes mean equal prefixes under one model, fine-tune and
// tenant salt. Coordinators compute these hashes to route by prefix; workers compute them to find
// cached blocks; both must agree across versions, so the encoding below is fixed
// (common/hash_test.cc pins values):
//   namespace = XXH3_64(u64le(len(model)) model u64le(len(fine_tune_id)) fine_tune_id
//                       u64le(len(cache_salt)) cache_salt)
//   block     = XXH3_64(u64le(parent) u64le(namespace) i32le(token_0) ... i32le(token_{n-1}))
// A 64-bit hash collides with probability about n^2 / 2^65 among n distinct blocks (1e-8 for 6e5
// blocks); workers also store the token ids with each block and check them before reuse.
#ifndef STRATA_COMMON_HASH_H_
#define STRATA_COMMON_HASH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace strata {

// XXH3, 64 bits.
uint64_t Hash64(absl::string_view bytes, uint64_t seed = 0);

using BlockHash = uint64_t;
inline constexpr BlockHash kRootBlockHash = 0;

// The fine-tune part of a cache namespace: the id, and for a served delta its revision (the delta
// file's checksum), as "id@revision"; the id alone when either is empty.
std::string FineTuneNamespaceId(absl::string_view fine_tune_id, absl::string_view revision);

// The namespace that separates caches of different models, fine-tunes and tenants.
uint64_t CacheNamespace(absl::string_view model, absl::string_view fine_tune_id,
                        absl::string_view cache_salt);

// The hash of one block given its parent's hash.
BlockHash ChainBlockHash(BlockHash parent, uint64_t cache_namespace,
                         absl::Span<const int32_t> tokens);

// Hashes of the full blocks of `tokens` (a trailing partial block has none), in order.
// block_tokens must be positive.
std::vector<BlockHash> PrefixBlockHashes(uint64_t cache_namespace, absl::Span<const int32_t> tokens,
                                         int block_tokens);

}  // namespace strata

#endif  // STRATA_COMMON_HASH_H_
