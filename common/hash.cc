#include "common/hash.h"

#include <bit>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#define XXH_STATIC_LINKING_ONLY  // for XXH3_state_t on the stack
#include "xxhash.h"

namespace strata {
namespace {

static_assert(std::endian::native == std::endian::little,
              "the block hash encoding assumes a little-endian host");

void UpdateU64(XXH3_state_t* state, uint64_t v) { XXH3_64bits_update(state, &v, sizeof(v)); }

void UpdateString(XXH3_state_t* state, absl::string_view s) {
  UpdateU64(state, s.size());
  XXH3_64bits_update(state, s.data(), s.size());
}

// XXH3 streaming state on the stack (XXH3_state_t is 64-byte aligned and large; one per call is
// fine).
class Xxh3 {
 public:
  Xxh3() { XXH3_64bits_reset(&state_); }
  XXH3_state_t* get() { return &state_; }
  uint64_t Digest() { return XXH3_64bits_digest(&state_); }

 private:
  XXH3_state_t state_;
};

}  // namespace

uint64_t Hash64(absl::string_view bytes, uint64_t seed) {
  return XXH3_64bits_withSeed(bytes.data(), bytes.size(), seed);
}

std::string FineTuneNamespaceId(absl::string_view fine_tune_id, absl::string_view revision) {
  if (fine_tune_id.empty() || revision.empty()) return std::string(fine_tune_id);
  return absl::StrCat(fine_tune_id, "@", revision);
}

uint64_t CacheNamespace(absl::string_view model, absl::string_view fine_tune_id,
                        absl::string_view cache_salt) {
  Xxh3 h;
  UpdateString(h.get(), model);
  UpdateString(h.get(), fine_tune_id);
  UpdateString(h.get(), cache_salt);
  return h.Digest();
}

BlockHash ChainBlockHash(BlockHash parent, uint64_t cache_namespace,
                         absl::Span<const int32_t> tokens) {
  Xxh3 h;
  UpdateU64(h.get(), parent);
  UpdateU64(h.get(), cache_namespace);
  XXH3_64bits_update(h.get(), tokens.data(), tokens.size() * sizeof(int32_t));
  return h.Digest();
}

std::vector<BlockHash> PrefixBlockHashes(uint64_t cache_namespace, absl::Span<const int32_t> tokens,
                                         int block_tokens) {
  CHECK_GT(block_tokens, 0);
  const size_t n = tokens.size() / static_cast<size_t>(block_tokens);
  std::vector<BlockHash> out;
  out.reserve(n);
  BlockHash parent = kRootBlockHash;
  for (size_t i = 0; i < n; ++i) {
    parent =
        ChainBlockHash(parent, cache_namespace, tokens.subspan(i * block_tokens, block_tokens));
    out.push_back(parent);
  }
  return out;
}

}  // namespace strata
