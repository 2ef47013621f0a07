// Context-free grammars over bytes, and the matcher that follows a generation through one: the
// core of structured output (JSON schemas, regular expressions and choices all compile to a
// Grammar; see json_schema.h and regex_grammar.h).
//
// A Grammar is a set of rules, each a list of alternatives, each a sequence of elements: a byte set
// (matches one byte in the set) or another rule. Text is bytes, so a multi-byte UTF-8 character is
// a sequence of byte sets (Utf8Class builds them), and tokens that end inside a character are
// matched as far as they go.
//
// The matcher is a pushdown automaton: its state is a set of stacks of grammar positions (several
// while the grammar is ambiguous so far), each with a byte set on top. A rule referenced last in
// an alternative replaces its caller's frame instead of stacking on it, so right recursion (every
// repetition) runs in constant stack depth. Build rejects grammars on which that automaton would
// not terminate (left recursion through a rule that is not last in its alternative) and prunes
// alternatives that can never finish, so that every state a matcher reaches can be completed.
#ifndef STRATA_GRAMMAR_GRAMMAR_H_
#define STRATA_GRAMMAR_GRAMMAR_H_

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace strata {

// A set of byte values.
class ByteSet {
 public:
  ByteSet() = default;
  static ByteSet Of(uint8_t b) {
    ByteSet s;
    s.Add(b);
    return s;
  }
  static ByteSet Range(uint8_t lo, uint8_t hi) {
    ByteSet s;
    s.AddRange(lo, hi);
    return s;
  }
  void Add(uint8_t b) { bits_[b >> 6] |= uint64_t{1} << (b & 63); }
  void AddRange(uint8_t lo, uint8_t hi) {
    for (int b = lo; b <= hi; ++b) Add(static_cast<uint8_t>(b));
  }
  void AddAll(const ByteSet& o) {
    for (int i = 0; i < 4; ++i) bits_[i] |= o.bits_[i];
  }
  bool Has(uint8_t b) const { return (bits_[b >> 6] >> (b & 63)) & 1; }
  bool Empty() const { return (bits_[0] | bits_[1] | bits_[2] | bits_[3]) == 0; }
  const std::array<uint64_t, 4>& bits() const { return bits_; }
  bool operator==(const ByteSet& o) const { return bits_ == o.bits_; }

 private:
  std::array<uint64_t, 4> bits_{};
};

// Code points as inclusive ranges [first, second].
using CodePointRanges = std::vector<std::pair<char32_t, char32_t>>;

// The code points in [0, U+10FFFF] that none of `ranges` holds (sorted; `ranges` in any order,
// overlapping or not).
CodePointRanges ComplementCodePoints(CodePointRanges ranges);

// An immutable grammar, built by GrammarBuilder. Shared read-only between matchers (and threads).
class Grammar {
 public:
  // An element, as stored: >= 0 is a byte set's index, kEnd ends an alternative, and anything
  // below is a rule (RuleElement / RuleOf).
  static constexpr int32_t kEnd = -1;
  static int32_t RuleElement(int32_t rule) { return -2 - rule; }
  static int32_t RuleOf(int32_t element) { return -2 - element; }

  int32_t num_rules() const { return static_cast<int32_t>(rule_alts_.size()); }
  int32_t root() const { return root_; }
  // Positions (indices into elements()) where the alternatives of `rule` start.
  absl::Span<const int32_t> alternatives(int32_t rule) const { return rule_alts_[rule]; }
  absl::Span<const int32_t> elements() const { return elements_; }
  const ByteSet& byte_set(int32_t index) const { return byte_sets_[index]; }

  // The grammar as text, one rule a line (for errors and tests): `name ::= [a-z] other | ""`.
  std::string ToString() const;

  // A position that, as a stack frame, lets exactly the same texts of up to `max_bytes` bytes
  // through as `position` does, whatever the frames around it: the same position in another copy
  // of a bounded repetition (GrammarBuilder::Repeat) when both copies have more than `max_bytes`
  // copies left to go (a text that short cannot tell them apart), else `position` itself. So a
  // string of at most 1000 characters has as many distinct positions as a token has bytes, not
  // 1000 (TokenMasker keys its results by them). Only repetitions of a sequence that cannot match
  // the empty text count.
  int32_t EquivalentPosition(int32_t position, int64_t max_bytes) const;

 private:
  friend class GrammarBuilder;
  // Positions first + j * stride + offset (offset < stride, j < count) are copy j's of one
  // repeated sequence, which has remaining(j) copies to go (counting its own): ascending,
  // base + j; else base - j.
  struct RepeatRun {
    int32_t first = 0;
    int32_t stride = 0;
    int32_t count = 0;
    int32_t base = 0;
    bool ascending = true;
  };
  std::vector<int32_t> elements_;
  std::vector<ByteSet> byte_sets_;
  std::vector<std::vector<int32_t>> rule_alts_;
  std::vector<std::string> rule_names_;
  std::vector<RepeatRun> repeat_runs_;  // by first, not overlapping
  int32_t root_ = 0;
};

// Builds a Grammar. Symbols are elements as Grammar stores them (byte-set indices and
// RuleElement(rule)); the helpers that take sequences make rules of their own.
class GrammarBuilder {
 public:
  using Seq = std::vector<int32_t>;

  // A new rule with no alternatives yet.
  int32_t NewRule(absl::string_view name);
  void AddAlternative(int32_t rule, Seq seq);
  int32_t Ref(int32_t rule) const { return Grammar::RuleElement(rule); }

  int32_t Bytes(const ByteSet& set);
  int32_t Byte(uint8_t b) { return Bytes(ByteSet::Of(b)); }
  Seq Literal(absl::string_view text);

  // Rules made of others, each returned as the element that references it.
  int32_t Choice(absl::string_view name, std::vector<Seq> alternatives);
  int32_t Optional(absl::string_view name, Seq seq) { return Repeat(name, std::move(seq), 0, 1); }
  int32_t Star(absl::string_view name, Seq seq) { return Repeat(name, std::move(seq), 0, -1); }
  // `seq` between min_count and max_count times (-1: no limit). A bounded repetition takes a rule
  // per optional copy; INVALID_ARGUMENT past kMaxRepeat.
  static constexpr int64_t kMaxRepeat = 4096;
  absl::StatusOr<int32_t> BoundedRepeat(absl::string_view name, Seq seq, int64_t min_count,
                                        int64_t max_count);
  int32_t Repeat(absl::string_view name, Seq seq, int64_t min_count, int64_t max_count);

  // One UTF-8 character whose code point is in any of `ranges` (sorted or not, may overlap;
  // surrogates left out), as a rule.
  int32_t Utf8Class(absl::string_view name, CodePointRanges ranges);

  int32_t num_rules() const { return static_cast<int32_t>(rule_alts_.size()); }
  // Past kMaxRules or kMaxElements already: Build will refuse the grammar, so callers adding to it
  // step by step can stop early.
  bool over_budget() const { return over_budget_; }

  // Past these Build refuses the grammar (and BoundedRepeat refuses a repetition that would pass
  // them before building it): a request's grammar must not take unbounded memory.
  static constexpr int64_t kMaxRules = 200000;
  static constexpr int64_t kMaxElements = 4000000;

  // The grammar rooted at `root`. Alternatives that can never finish are dropped; INVALID_ARGUMENT
  // when the root can derive no finite text, when a rule is left-recursive in a way the matcher
  // cannot follow (naming the rule), or past the size limits. Linear in the grammar's size.
  absl::StatusOr<std::shared_ptr<const Grammar>> Build(int32_t root) &&;

 private:
  // What Repeat built, for Grammar::EquivalentPosition: `head` holds min_count copies of `seq`
  // and then `optional` (rules opt_1, opt_2, ...: opt_k has k copies left).
  struct RepeatRecord {
    Seq seq;
    int32_t head = 0;
    int64_t min_count = 0;
    std::vector<int32_t> optional;
  };
  // Grammar::repeat_runs_ of the repetitions laid out as Repeat built them (none pruned).
  void RecordRepeatRuns(const std::vector<bool>& nullable, Grammar* g) const;

  std::vector<ByteSet> byte_sets_;
  std::vector<std::vector<Seq>> rule_alts_;
  std::vector<std::string> rule_names_;
  std::vector<RepeatRecord> repeats_;
  int64_t num_elements_ = 0;
  bool over_budget_ = false;
};

// A repetition operator at text[*at], as regular expressions and GBNF write them: *, +, ?, {m},
// {m,} or {m,n} (`spaces`: spaces allowed inside the braces). Its bounds (max -1: no limit) with
// *at moved past it; nullopt, *at unchanged, when there is none (a '{' not followed by a count is
// not one); INVALID_ARGUMENT for braces that open a count and do not close.
absl::StatusOr<std::optional<std::pair<int64_t, int64_t>>> ReadRepetition(absl::string_view text,
                                                                          size_t* at, bool spaces);

// A matcher's state: its stacks (each a list of grammar positions, the top last, with a byte set
// at every top) and whether the text so far is a complete sentence. Value type.
struct GrammarState {
  std::vector<int32_t> data;
  // Stack i is data[starts[i], starts[i + 1]) (data.size() for the last).
  std::vector<int32_t> starts;
  bool complete = false;
  // The matcher dropped readings at its limits (nesting past 4096 frames, or more than 4096 stacks
  // in one step's closure) on the way here: what it allows from here on may be too little.
  bool truncated = false;

  int32_t num_stacks() const { return static_cast<int32_t>(starts.size()); }
  absl::Span<const int32_t> stack(int32_t i) const {
    const int32_t end = i + 1 < num_stacks() ? starts[i + 1] : static_cast<int32_t>(data.size());
    return absl::Span<const int32_t>(data).subspan(starts[i], end - starts[i]);
  }
  // Neither more text nor the end is possible (never reached by a matcher of a built grammar).
  bool Dead() const { return starts.empty() && !complete; }
  void Clear() {
    data.clear();
    starts.clear();
    complete = false;
    truncated = false;
  }
};

// Follows text through a grammar. Thread-compatible; the grammar must outlive it.
class GrammarMatcher {
 public:
  explicit GrammarMatcher(std::shared_ptr<const Grammar> grammar);

  // Consumes `bytes` if the grammar allows all of them here; otherwise false and no change.
  bool Advance(absl::string_view bytes);
  // The text so far is a complete sentence of the grammar.
  bool IsComplete() const { return state_.complete; }
  // Some byte may follow.
  bool CanContinue() const { return state_.num_stacks() > 0; }
  // The bytes that may follow.
  ByteSet NextBytes() const;
  // More readings than a request should carry (kMaxMatcherStacks), or readings dropped at the
  // matcher's limits: a grammar this ambiguous is refused rather than followed slowly or wrongly.
  static constexpr int32_t kMaxMatcherStacks = 256;
  bool Overloaded() const { return state_.truncated || state_.num_stacks() > kMaxMatcherStacks; }

  const GrammarState& state() const { return state_; }
  const Grammar& grammar() const { return *grammar_; }
  const std::shared_ptr<const Grammar>& shared_grammar() const { return grammar_; }

  // The state after byte `b` from `from`, into `*to` (cleared first; its buffers are reused).
  // False when `b` is not allowed (`*to` is then dead).
  static bool Step(const Grammar& g, const GrammarState& from, uint8_t b, GrammarState* to);

 private:
  std::shared_ptr<const Grammar> grammar_;
  GrammarState state_;
  GrammarState scratch_;
};

// A random sentence of `grammar`: a walk that takes a random allowed byte at each step (JSON's
// structural bytes and ASCII more often than the rest, so that walks end) and stops at a complete
// sentence half of the time; nullopt past `max_bytes`. `visit` (may be null) sees the matcher
// before each byte. For tests, and for warming token masks.
std::optional<std::string> RandomSentence(
    const std::shared_ptr<const Grammar>& grammar, std::mt19937_64& rng, size_t max_bytes,
    const std::function<void(const GrammarMatcher&)>& visit = nullptr);
// The same walk from the end of `start` (a structured output's prefix): a random sentence that
// begins with it, or nullopt when the grammar does not take it.
std::optional<std::string> RandomSentenceFrom(const std::shared_ptr<const Grammar>& grammar,
                                              absl::string_view start, std::mt19937_64& rng,
                                              size_t max_bytes);

// Whether `text` is a complete sentence of `grammar` (for tests and validation).
bool GrammarAccepts(const std::shared_ptr<const Grammar>& grammar, absl::string_view text);

}  // namespace strata

#endif  // STRATA_GRAMMAR_GRAMMAR_H_
