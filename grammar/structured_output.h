// A request's structured output (strata.v1.StructuredOutput) as a grammar, and a cache of the
// grammars compiled, since clients send the same schema with request after request.
#ifndef STRATA_GRAMMAR_STRUCTURED_OUTPUT_H_
#define STRATA_GRAMMAR_STRUCTURED_OUTPUT_H_

#include <cstddef>
#include <list>
#include <memory>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "grammar/grammar.h"
#include "proto/strata/v1/common.pb.h"

namespace strata {

inline constexpr size_t kMaxJsonSchemaBytes = 64 << 10;
inline constexpr size_t kMaxRegexBytes = 4 << 10;
inline constexpr int kMaxChoices = 256;
inline constexpr size_t kMaxChoiceBytes = 1024;
inline constexpr size_t kMaxPrefixBytes = 4 << 10;

// The grammar of `spec`, or null when it sets nothing (free text). INVALID_ARGUMENT naming the
// field under `field` (the message's path, e.g. "sampling.structured_output") for a bad schema,
// pattern or choice list, a prefix the grammar does not take, one too ambiguous to follow
// (GrammarMatcher::Overloaded) from its start or after its prefix, or one past the limits above.
// (The prefix is checked, not applied: the engine's matcher consumes it.)
absl::StatusOr<std::shared_ptr<const Grammar>> CompileStructuredOutput(
    const v1::StructuredOutput& spec, absl::string_view field);

// Compiled grammars by spec, the least recently used dropped past `capacity`. Failures are not
// kept. Thread-safe.
class GrammarCache {
 public:
  explicit GrammarCache(size_t capacity) : capacity_(capacity) {}

  // CompileStructuredOutput's result, from the cache when the same spec was compiled before.
  absl::StatusOr<std::shared_ptr<const Grammar>> Get(const v1::StructuredOutput& spec,
                                                     absl::string_view field)
      ABSL_LOCKS_EXCLUDED(mu_);

  int64_t hits() const ABSL_LOCKS_EXCLUDED(mu_);
  int64_t misses() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  using Entry = std::pair<std::string, std::shared_ptr<const Grammar>>;
  const size_t capacity_;
  mutable absl::Mutex mu_;
  std::list<Entry> lru_ ABSL_GUARDED_BY(mu_);  // most recently used first
  absl::flat_hash_map<std::string, std::list<Entry>::iterator> index_ ABSL_GUARDED_BY(mu_);
  int64_t hits_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t misses_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace strata

#endif  // STRATA_GRAMMAR_STRUCTURED_OUTPUT_H_
