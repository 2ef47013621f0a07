#include "grammar/grammar.h"

#include <algorithm>
#include <map>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/hash.h"
#include "common/utf8.h"

namespace strata {
namespace {

// Past these the matcher drops stacks instead of following them (and marks its state truncated):
// nesting deeper than kMaxStackDepth frames, and more than kMaxClosureStacks stacks visited in one
// step.
constexpr int32_t kMaxStackDepth = 4096;
constexpr size_t kMaxClosureStacks = 4096;

std::string ByteSetString(const ByteSet& s) {
  auto ch = [](int b) -> std::string {
    if (b == '\\' || b == ']' || b == '-' || b == '[' || b == '^') {
      return absl::StrCat("\\", std::string(1, static_cast<char>(b)));
    }
    if (b >= 0x21 && b < 0x7f) return std::string(1, static_cast<char>(b));
    return absl::StrFormat("\\x%02x", b);
  };
  int count = 0;
  for (int b = 0; b < 256; ++b) count += s.Has(static_cast<uint8_t>(b));
  if (count == 1) {
    for (int b = 0; b < 256; ++b) {
      if (s.Has(static_cast<uint8_t>(b))) {
        if (b >= 0x21 && b < 0x7f && b != '"' && b != '\\') {
          return absl::StrCat("\"", std::string(1, static_cast<char>(b)), "\"");
        }
        return absl::StrCat("[", ch(b), "]");
      }
    }
  }
  std::string out = "[";
  for (int b = 0; b < 256;) {
    if (!s.Has(static_cast<uint8_t>(b))) {
      ++b;
      continue;
    }
    int e = b;
    while (e + 1 < 256 && s.Has(static_cast<uint8_t>(e + 1))) ++e;
    absl::StrAppend(&out, ch(b));
    if (e > b) absl::StrAppend(&out, "-", ch(e));
    b = e + 1;
  }
  return out + "]";
}

int Utf8Length(char32_t cp) { return cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4; }

// Splits [lo, hi] (one encoded length, no surrogates) into ranges whose encodings are byte-wise
// ranges: every code point in the piece has each byte between the ends' bytes at that position.
void SplitUtf8(char32_t lo, char32_t hi, CodePointRanges* out) {
  const int n = Utf8Length(lo);
  for (int i = 1; i < n; ++i) {
    const char32_t m = (char32_t{1} << (6 * i)) - 1;
    if ((lo & ~m) != (hi & ~m)) {
      if ((lo & m) != 0) {
        SplitUtf8(lo, lo | m, out);
        SplitUtf8((lo | m) + 1, hi, out);
        return;
      }
      if ((hi & m) != m) {
        SplitUtf8(lo, (hi & ~m) - 1, out);
        SplitUtf8(hi & ~m, hi, out);
        return;
      }
    }
  }
  out->push_back({lo, hi});
}

uint64_t HashStack(absl::Span<const int32_t> s) {
  return Hash64(
      absl::string_view(reinterpret_cast<const char*>(s.data()), s.size() * sizeof(int32_t)));
}

// The closure's scratch: raw stacks in one buffer, the ones still to expand, and the set of
// stacks seen (by content) so that loops through rules that consume nothing end.
struct Closure {
  struct Key {
    uint64_t hash;
    int32_t offset;
    int32_t length;
  };
  struct KeyHash {
    size_t operator()(const Key& k) const { return k.hash; }
  };
  struct KeyEq {
    const std::vector<int32_t>* buf;
    bool operator()(const Key& a, const Key& b) const {
      return a.hash == b.hash && a.length == b.length &&
             std::equal(buf->begin() + a.offset, buf->begin() + a.offset + a.length,
                        buf->begin() + b.offset);
    }
  };

  Closure() : seen(16, KeyHash(), KeyEq{&buf}) {}

  void Reset() {
    buf.clear();
    pending.clear();
    seen.clear();
    truncated = false;
  }

  // Adds the stack in buf[offset, end) (just appended) unless seen before.
  void Commit(int32_t offset) {
    const int32_t length = static_cast<int32_t>(buf.size()) - offset;
    if (length > kMaxStackDepth || seen.size() >= kMaxClosureStacks) {
      buf.resize(offset);
      truncated = true;
      return;
    }
    const Key k{HashStack(absl::Span<const int32_t>(buf).subspan(offset, length)), offset, length};
    if (seen.insert(k).second) {
      pending.push_back(k);
    } else {
      buf.resize(offset);
    }
  }

  // Appends a copy of buf[offset, offset + length); returns where it starts.
  int32_t AppendCopy(int32_t offset, int32_t length) {
    const size_t at = buf.size();
    buf.resize(at + length);
    std::copy_n(buf.begin() + offset, length, buf.begin() + at);
    return static_cast<int32_t>(at);
  }

  // Expands every pending stack until each has a byte set on top, into `out`.
  void Run(const Grammar& g, GrammarState* out) {
    const absl::Span<const int32_t> el = g.elements();
    while (!pending.empty()) {
      const Key k = pending.back();
      pending.pop_back();
      if (k.length == 0) {
        out->complete = true;
        continue;
      }
      const int32_t top = buf[k.offset + k.length - 1];
      const int32_t e = el[top];
      if (e >= 0) {
        out->starts.push_back(static_cast<int32_t>(out->data.size()));
        out->data.insert(out->data.end(), buf.begin() + k.offset,
                         buf.begin() + k.offset + k.length);
        continue;
      }
      if (e == Grammar::kEnd) {
        const int32_t offset = AppendCopy(k.offset, k.length - 1);
        Commit(offset);
        continue;
      }
      // A rule: its caller continues after it (unless the rule ends the alternative), under each
      // of its alternatives.
      const bool tail = el[top + 1] == Grammar::kEnd;
      for (int32_t alt : g.alternatives(Grammar::RuleOf(e))) {
        const int32_t offset = AppendCopy(k.offset, k.length - 1);
        if (!tail) buf.push_back(top + 1);
        buf.push_back(alt);
        Commit(offset);
      }
    }
    out->truncated = out->truncated || truncated;
  }

  std::vector<int32_t> buf;
  std::vector<Key> pending;
  absl::flat_hash_set<Key, KeyHash, KeyEq> seen;
  bool truncated = false;  // a stack was dropped at the limits
};

Closure& ThreadClosure() {
  thread_local Closure c;
  return c;
}

}  // namespace

std::string Grammar::ToString() const {
  std::string out;
  for (int32_t r = 0; r < num_rules(); ++r) {
    absl::StrAppend(&out, rule_names_[r], " ::=");
    bool first = true;
    for (int32_t a : rule_alts_[r]) {
      absl::StrAppend(&out, first ? " " : " | ");
      first = false;
      if (elements_[a] == kEnd) absl::StrAppend(&out, "\"\"");
      for (int32_t p = a; elements_[p] != kEnd; ++p) {
        if (p != a) absl::StrAppend(&out, " ");
        const int32_t e = elements_[p];
        absl::StrAppend(&out, e >= 0 ? ByteSetString(byte_sets_[e]) : rule_names_[RuleOf(e)]);
      }
    }
    absl::StrAppend(&out, "\n");
  }
  return out;
}

int32_t GrammarBuilder::NewRule(absl::string_view name) {
  if (static_cast<int64_t>(rule_alts_.size()) >= kMaxRules) over_budget_ = true;
  rule_alts_.emplace_back();
  rule_names_.push_back(absl::StrCat(name, "#", rule_alts_.size() - 1));
  return static_cast<int32_t>(rule_alts_.size()) - 1;
}

void GrammarBuilder::AddAlternative(int32_t rule, Seq seq) {
  num_elements_ += static_cast<int64_t>(seq.size()) + 1;
  if (num_elements_ > kMaxElements) over_budget_ = true;
  rule_alts_[rule].push_back(std::move(seq));
}

int32_t GrammarBuilder::Bytes(const ByteSet& set) {
  for (size_t i = 0; i < byte_sets_.size(); ++i) {
    if (byte_sets_[i] == set) return static_cast<int32_t>(i);
  }
  byte_sets_.push_back(set);
  return static_cast<int32_t>(byte_sets_.size()) - 1;
}

GrammarBuilder::Seq GrammarBuilder::Literal(absl::string_view text) {
  Seq seq;
  for (char c : text) seq.push_back(Byte(static_cast<uint8_t>(c)));
  return seq;
}

int32_t GrammarBuilder::Choice(absl::string_view name, std::vector<Seq> alternatives) {
  const int32_t r = NewRule(name);
  for (Seq& s : alternatives) AddAlternative(r, std::move(s));
  return Ref(r);
}

int32_t GrammarBuilder::Repeat(absl::string_view name, Seq seq, int64_t min_count,
                               int64_t max_count) {
  const int32_t r = NewRule(name);
  RepeatRecord record;
  record.head = r;
  record.min_count = min_count;
  Seq head;
  for (int64_t i = 0; i < min_count; ++i) head.insert(head.end(), seq.begin(), seq.end());
  if (max_count < 0) {
    // tail ::= seq tail | ""
    const int32_t tail = NewRule(absl::StrCat(name, "*"));
    Seq again = seq;
    again.push_back(Ref(tail));
    AddAlternative(tail, std::move(again));
    AddAlternative(tail, {});
    head.push_back(Ref(tail));
  } else if (max_count > min_count) {
    // opt_k ::= seq opt_(k-1) | "", opt_1 ::= seq | ""
    int32_t next = -1;
    for (int64_t k = 1; k <= max_count - min_count; ++k) {
      const int32_t opt = NewRule(absl::StrCat(name, "?", k));
      Seq s = seq;
      if (next >= 0) s.push_back(Ref(next));
      AddAlternative(opt, std::move(s));
      AddAlternative(opt, {});
      next = opt;
      record.optional.push_back(opt);
    }
    head.push_back(Ref(next));
  }
  AddAlternative(r, std::move(head));
  if (!seq.empty() && (min_count >= 2 || record.optional.size() >= 2)) {
    record.seq = std::move(seq);
    repeats_.push_back(std::move(record));
  }
  return Ref(r);
}

absl::StatusOr<int32_t> GrammarBuilder::BoundedRepeat(absl::string_view name, Seq seq,
                                                      int64_t min_count, int64_t max_count) {
  if (min_count < 0 || (max_count >= 0 && max_count < min_count)) {
    return absl::InvalidArgumentError(
        absl::StrCat("repetition bounds {", min_count, ",", max_count, "} are out of order"));
  }
  if (min_count > kMaxRepeat || (max_count >= 0 && max_count - min_count > kMaxRepeat)) {
    return absl::InvalidArgumentError(
        absl::StrCat("repetition bounds {", min_count, ",", max_count, "} exceed ", kMaxRepeat));
  }
  // What it will take, checked before it is built.
  const int64_t copies = std::max<int64_t>(min_count, max_count) + 1;
  if (num_rules() + copies + 2 > kMaxRules ||
      num_elements_ + copies * (static_cast<int64_t>(seq.size()) + 2) > kMaxElements) {
    return absl::InvalidArgumentError(absl::StrCat("repetition bounds {", min_count, ",", max_count,
                                                   "} make the grammar too large (more than ",
                                                   kMaxRules, " rules or ", kMaxElements,
                                                   " elements)"));
  }
  return Repeat(name, std::move(seq), min_count, max_count);
}

CodePointRanges ComplementCodePoints(CodePointRanges ranges) {
  std::sort(ranges.begin(), ranges.end());
  CodePointRanges out;
  char32_t next = 0;
  for (auto [lo, hi] : ranges) {
    if (lo > next) out.push_back({next, lo - 1});
    next = std::max<char32_t>(next, hi + 1);
  }
  if (next <= 0x10FFFF) out.push_back({next, 0x10FFFF});
  return out;
}

int32_t GrammarBuilder::Utf8Class(absl::string_view name, CodePointRanges ranges) {
  std::sort(ranges.begin(), ranges.end());
  // Merge, clip to Unicode and cut out the surrogates.
  CodePointRanges merged;
  for (auto [lo, hi] : ranges) {
    hi = std::min<char32_t>(hi, 0x10FFFF);
    if (lo > hi) continue;
    if (!merged.empty() && lo <= merged.back().second + 1) {
      merged.back().second = std::max(merged.back().second, hi);
    } else {
      merged.push_back({lo, hi});
    }
  }
  CodePointRanges pieces;
  for (auto [lo, hi] : merged) {
    CodePointRanges parts;
    if (lo < 0xD800 && hi > 0xDFFF) {
      parts = {{lo, 0xD7FF}, {0xE000, hi}};
    } else if (lo >= 0xD800 && hi <= 0xDFFF) {
      continue;
    } else if (lo >= 0xD800 && lo <= 0xDFFF) {
      parts = {{0xE000, hi}};
    } else if (hi >= 0xD800 && hi <= 0xDFFF) {
      parts = {{lo, 0xD7FF}};
    } else {
      parts = {{lo, hi}};
    }
    for (auto [a, b] : parts) {
      // Split at the encoded-length boundaries.
      for (char32_t bound :
           {char32_t{0x7F}, char32_t{0x7FF}, char32_t{0xFFFF}, char32_t{0x10FFFF}}) {
        if (a > b) break;
        if (a <= bound) {
          SplitUtf8(a, std::min(b, bound), &pieces);
          a = bound + 1;
        }
      }
    }
  }
  const int32_t r = NewRule(name);
  // ASCII pieces share one byte set.
  ByteSet ascii;
  for (auto [lo, hi] : pieces) {
    if (hi < 0x80) {
      ascii.AddRange(static_cast<uint8_t>(lo), static_cast<uint8_t>(hi));
      continue;
    }
    // Each piece's ends encode to the same length, byte by byte the bounds of the piece.
    std::string a, b;
    AppendUtf8(lo, &a);
    AppendUtf8(hi, &b);
    Seq seq;
    for (size_t i = 0; i < a.size(); ++i) {
      seq.push_back(Bytes(ByteSet::Range(static_cast<uint8_t>(a[i]), static_cast<uint8_t>(b[i]))));
    }
    AddAlternative(r, std::move(seq));
  }
  if (!ascii.Empty()) AddAlternative(r, {Bytes(ascii)});
  return Ref(r);
}

absl::StatusOr<std::shared_ptr<const Grammar>> GrammarBuilder::Build(int32_t root) && {
  const int32_t n = num_rules();
  if (root < 0 || root >= n) return absl::InternalError("grammar root is not a rule");
  if (over_budget_) {
    return absl::InvalidArgumentError(absl::StrCat("the grammar is too large (more than ",
                                                   kMaxRules, " rules or ", kMaxElements,
                                                   " elements)"));
  }
  // Which alternatives hold each rule (once per occurrence), for the fixpoints below: a rule
  // becomes productive (derives some finite text) when one of its alternatives has only
  // productive rules left, and nullable (derives the empty text) when one has only nullable rules.
  std::vector<std::vector<std::pair<int32_t, int32_t>>> users(n);
  for (int32_t r = 0; r < n; ++r) {
    for (size_t a = 0; a < rule_alts_[r].size(); ++a) {
      for (int32_t e : rule_alts_[r][a]) {
        if (e < 0) users[Grammar::RuleOf(e)].push_back({r, static_cast<int32_t>(a)});
      }
    }
  }
  // Marks rules by propagation; `pending[r][a]` counts the rules alternative a of r still waits
  // for (-1: it can never qualify).
  auto fixpoint = [&](auto&& initial) {
    std::vector<bool> done(n, false);
    std::vector<std::vector<int32_t>> pending(n);
    std::vector<int32_t> queue;
    for (int32_t r = 0; r < n; ++r) {
      for (const Seq& alt : rule_alts_[r]) {
        pending[r].push_back(initial(alt));
        if (pending[r].back() == 0 && !done[r]) {
          done[r] = true;
          queue.push_back(r);
        }
      }
    }
    while (!queue.empty()) {
      const int32_t v = queue.back();
      queue.pop_back();
      for (const auto& [u, a] : users[v]) {
        if (pending[u][a] > 0 && --pending[u][a] == 0 && !done[u]) {
          done[u] = true;
          queue.push_back(u);
        }
      }
    }
    return done;
  };
  const std::vector<bool> productive = fixpoint([](const Seq& alt) {
    return static_cast<int32_t>(
        std::count_if(alt.begin(), alt.end(), [](int32_t e) { return e < 0; }));
  });
  if (!productive[root]) {
    return absl::InvalidArgumentError("the grammar derives no finite text");
  }
  auto seq_productive = [&](const Seq& s) {
    return std::all_of(s.begin(), s.end(),
                       [&](int32_t e) { return e >= 0 || productive[Grammar::RuleOf(e)]; });
  };
  for (int32_t r = 0; r < n; ++r) {
    auto& alts = rule_alts_[r];
    alts.erase(
        std::remove_if(alts.begin(), alts.end(), [&](const Seq& s) { return !seq_productive(s); }),
        alts.end());
  }
  for (auto& list : users) list.clear();
  for (int32_t r = 0; r < n; ++r) {
    for (size_t a = 0; a < rule_alts_[r].size(); ++a) {
      for (int32_t e : rule_alts_[r][a]) {
        if (e < 0) users[Grammar::RuleOf(e)].push_back({r, static_cast<int32_t>(a)});
      }
    }
  }
  const std::vector<bool> nullable = fixpoint([](const Seq& alt) {
    const bool bytes = std::any_of(alt.begin(), alt.end(), [](int32_t e) { return e >= 0; });
    return bytes ? -1 : static_cast<int32_t>(alt.size());
  });
  // Left corners: rule u reaches v if v can be the first thing u expands to. An edge where v is
  // not last in its alternative leaves a frame behind; a cycle through one would stack frames
  // without end. Such an edge is on a cycle when both ends are in one strongly connected
  // component of the corner graph (Tarjan's algorithm, iteratively).
  std::vector<std::vector<int32_t>> corners(n);
  std::vector<std::pair<int32_t, int32_t>> stacking;
  for (int32_t r = 0; r < n; ++r) {
    for (const Seq& s : rule_alts_[r]) {
      for (size_t i = 0; i < s.size() && s[i] < 0; ++i) {
        const int32_t v = Grammar::RuleOf(s[i]);
        corners[r].push_back(v);
        if (i + 1 < s.size()) stacking.push_back({r, v});
        if (!nullable[v]) break;
      }
    }
  }
  std::vector<int32_t> index(n, -1), low(n, 0), component(n, -1), scc_stack;
  std::vector<bool> on_stack(n, false);
  int32_t next_index = 0, num_components = 0;
  for (int32_t start = 0; start < n; ++start) {
    if (index[start] >= 0) continue;
    std::vector<std::pair<int32_t, size_t>> dfs = {{start, 0}};
    index[start] = low[start] = next_index++;
    scc_stack.push_back(start);
    on_stack[start] = true;
    while (!dfs.empty()) {
      auto& [v, edge] = dfs.back();
      if (edge < corners[v].size()) {
        const int32_t w = corners[v][edge++];
        if (index[w] < 0) {
          index[w] = low[w] = next_index++;
          scc_stack.push_back(w);
          on_stack[w] = true;
          dfs.push_back({w, 0});
        } else if (on_stack[w]) {
          low[v] = std::min(low[v], index[w]);
        }
        continue;
      }
      if (low[v] == index[v]) {
        int32_t w;
        do {
          w = scc_stack.back();
          scc_stack.pop_back();
          on_stack[w] = false;
          component[w] = num_components;
        } while (w != v);
        ++num_components;
      }
      const int32_t done = v;
      dfs.pop_back();
      if (!dfs.empty()) low[dfs.back().first] = std::min(low[dfs.back().first], low[done]);
    }
  }
  for (const auto& [u, v] : stacking) {
    if (component[u] == component[v]) {
      return absl::InvalidArgumentError(
          absl::StrCat("the grammar is left-recursive at ", rule_names_[u],
                       " (it can reach itself without consuming text)"));
    }
  }
  auto g = std::make_shared<Grammar>();
  g->byte_sets_ = std::move(byte_sets_);
  g->rule_names_ = std::move(rule_names_);
  g->rule_alts_.resize(n);
  g->root_ = root;
  for (int32_t r = 0; r < n; ++r) {
    for (const Seq& s : rule_alts_[r]) {
      g->rule_alts_[r].push_back(static_cast<int32_t>(g->elements_.size()));
      g->elements_.insert(g->elements_.end(), s.begin(), s.end());
      g->elements_.push_back(Grammar::kEnd);
    }
  }
  RecordRepeatRuns(nullable, g.get());
  return std::shared_ptr<const Grammar>(std::move(g));
}

void GrammarBuilder::RecordRepeatRuns(const std::vector<bool>& nullable, Grammar* g) const {
  for (const RepeatRecord& rec : repeats_) {
    // A copy that may match nothing lets a short text pass any number of copies.
    if (std::all_of(rec.seq.begin(), rec.seq.end(),
                    [&](int32_t e) { return e < 0 && nullable[Grammar::RuleOf(e)]; })) {
      continue;
    }
    const int32_t len = static_cast<int32_t>(rec.seq.size());
    // Whether `rule` kept its `alternatives` and the first begins with the copy, at `at`.
    auto laid_out = [&](int32_t rule, int32_t at, size_t alternatives) {
      const auto& alts = rule_alts_[rule];
      return alts.size() == alternatives && g->rule_alts_[rule][0] == at &&
             alts[0].size() >= rec.seq.size() &&
             std::equal(rec.seq.begin(), rec.seq.end(), alts[0].begin());
    };
    auto start = [&](int32_t rule) {
      return g->rule_alts_[rule].empty() ? -1 : g->rule_alts_[rule][0];
    };
    // The head: min_count copies in one alternative, min_count - j to go at copy j.
    if (rec.min_count >= 2 && laid_out(rec.head, start(rec.head), 1)) {
      g->repeat_runs_.push_back({start(rec.head), len, static_cast<int32_t>(rec.min_count),
                                 static_cast<int32_t>(rec.min_count), /*ascending=*/false});
    }
    // The optional copies from opt_2 on, each `seq opt_(k-1) | ""` and laid out one after the
    // other: opt_k at first + (k - 2) * (len + 3).
    if (rec.optional.size() >= 2) {
      const int32_t stride = len + 3;
      const int32_t first = start(rec.optional[1]);
      bool regular = first >= 0;
      for (size_t k = 2; regular && k <= rec.optional.size(); ++k) {
        regular = laid_out(rec.optional[k - 1], first + static_cast<int32_t>(k - 2) * stride, 2) &&
                  rule_alts_[rec.optional[k - 1]][0].size() == rec.seq.size() + 1;
      }
      if (regular) {
        g->repeat_runs_.push_back({first, stride, static_cast<int32_t>(rec.optional.size()) - 1, 2,
                                   /*ascending=*/true});
      }
    }
  }
  std::sort(
      g->repeat_runs_.begin(), g->repeat_runs_.end(),
      [](const Grammar::RepeatRun& a, const Grammar::RepeatRun& b) { return a.first < b.first; });
}

int32_t Grammar::EquivalentPosition(int32_t position, int64_t max_bytes) const {
  if (max_bytes < 1) return position;  // (no text to tell positions apart: nothing to share)
  // The last run starting at or before the position.
  auto it = std::upper_bound(repeat_runs_.begin(), repeat_runs_.end(), position,
                             [](int32_t p, const RepeatRun& r) { return p < r.first; });
  if (it == repeat_runs_.begin()) return position;
  const RepeatRun& run = *--it;
  const int64_t rel = int64_t{position} - run.first;
  if (rel >= int64_t{run.count} * run.stride) return position;
  const int64_t j = rel / run.stride, offset = rel % run.stride;
  // Copies to go, counting this one: with more than max_bytes after it, no text of max_bytes
  // bytes reaches past them (each copy takes a byte at least).
  const int64_t left = run.ascending ? run.base + j : run.base - j;
  const int64_t enough = max_bytes + 1;
  if (left <= enough) return position;
  const int64_t to = run.ascending ? enough - run.base : run.base - enough;
  if (to < 0 || to >= run.count) return position;
  return static_cast<int32_t>(run.first + to * run.stride + offset);
}

GrammarMatcher::GrammarMatcher(std::shared_ptr<const Grammar> grammar)
    : grammar_(std::move(grammar)) {
  Closure& c = ThreadClosure();
  c.Reset();
  for (int32_t alt : grammar_->alternatives(grammar_->root())) {
    const int32_t offset = static_cast<int32_t>(c.buf.size());
    c.buf.push_back(alt);
    c.Commit(offset);
  }
  c.Run(*grammar_, &state_);
}

bool GrammarMatcher::Step(const Grammar& g, const GrammarState& from, uint8_t b, GrammarState* to) {
  to->Clear();
  Closure& c = ThreadClosure();
  c.Reset();
  const absl::Span<const int32_t> el = g.elements();
  for (int32_t i = 0; i < from.num_stacks(); ++i) {
    const absl::Span<const int32_t> s = from.stack(i);
    if (!g.byte_set(el[s.back()]).Has(b)) continue;
    const int32_t offset = static_cast<int32_t>(c.buf.size());
    c.buf.insert(c.buf.end(), s.begin(), s.end());
    ++c.buf.back();
    c.Commit(offset);
  }
  to->truncated = from.truncated;
  c.Run(g, to);
  return !to->Dead();
}

bool GrammarMatcher::Advance(absl::string_view bytes) {
  if (bytes.empty()) return true;
  GrammarState cur;
  const GrammarState* from = &state_;
  for (char ch : bytes) {
    if (!Step(*grammar_, *from, static_cast<uint8_t>(ch), &scratch_)) return false;
    std::swap(cur, scratch_);
    from = &cur;
  }
  state_ = std::move(cur);
  return true;
}

ByteSet GrammarMatcher::NextBytes() const {
  ByteSet out;
  for (int32_t i = 0; i < state_.num_stacks(); ++i) {
    out.AddAll(grammar_->byte_set(grammar_->elements()[state_.stack(i).back()]));
  }
  return out;
}

absl::StatusOr<std::optional<std::pair<int64_t, int64_t>>> ReadRepetition(absl::string_view text,
                                                                          size_t* at, bool spaces) {
  size_t i = *at;
  if (i >= text.size()) return std::nullopt;
  auto skip = [&] {
    while (spaces && i < text.size() && (text[i] == ' ' || text[i] == '\t')) ++i;
  };
  auto number = [&]() -> std::optional<int64_t> {
    int64_t v = 0;
    const size_t start = i;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9' && i - start < 9) {
      v = v * 10 + (text[i++] - '0');
    }
    if (i == start) return std::nullopt;
    return v;
  };
  std::pair<int64_t, int64_t> bounds;
  switch (text[i]) {
    case '*':
      bounds = {0, -1};
      break;
    case '+':
      bounds = {1, -1};
      break;
    case '?':
      bounds = {0, 1};
      break;
    case '{': {
      ++i;
      skip();
      const std::optional<int64_t> lo = number();
      if (!lo.has_value()) return std::nullopt;
      bounds = {*lo, *lo};
      skip();
      if (i < text.size() && text[i] == ',') {
        ++i;
        skip();
        bounds.second = number().value_or(-1);
        skip();
      }
      if (i >= text.size() || text[i] != '}') {
        return absl::InvalidArgumentError("unterminated repetition {m,n}");
      }
      break;
    }
    default:
      return std::nullopt;
  }
  *at = i + 1;
  return bounds;
}

namespace {

std::optional<std::string> Walk(const std::shared_ptr<const Grammar>& grammar,
                                absl::string_view start, std::mt19937_64& rng, size_t max_bytes,
                                const std::function<void(const GrammarMatcher&)>& visit) {
  GrammarMatcher m(grammar);
  if (!m.Advance(start)) return std::nullopt;
  std::string text(start);
  static constexpr absl::string_view kStructural = "\"}],:0123456789tfn";
  std::vector<uint8_t> all, preferred, ascii;
  while (text.size() < max_bytes) {
    if (visit) visit(m);
    if (m.IsComplete() && (!m.CanContinue() || rng() % 2 == 0)) return text;
    const ByteSet next = m.NextBytes();
    all.clear();
    preferred.clear();
    ascii.clear();
    for (int b = 0; b < 256; ++b) {
      if (!next.Has(static_cast<uint8_t>(b))) continue;
      all.push_back(static_cast<uint8_t>(b));
      if (b < 0x80) ascii.push_back(static_cast<uint8_t>(b));
      if (kStructural.find(static_cast<char>(b)) != absl::string_view::npos) {
        preferred.push_back(static_cast<uint8_t>(b));
      }
    }
    if (all.empty()) return std::nullopt;
    const std::vector<uint8_t>& from = !preferred.empty() && rng() % 3 == 0 ? preferred
                                       : !ascii.empty() && rng() % 8 != 0   ? ascii
                                                                            : all;
    const char c = static_cast<char>(from[rng() % from.size()]);
    if (!m.Advance(absl::string_view(&c, 1))) return std::nullopt;
    text += c;
  }
  return std::nullopt;
}

}  // namespace

std::optional<std::string> RandomSentence(const std::shared_ptr<const Grammar>& grammar,
                                          std::mt19937_64& rng, size_t max_bytes,
                                          const std::function<void(const GrammarMatcher&)>& visit) {
  return Walk(grammar, "", rng, max_bytes, visit);
}

std::optional<std::string> RandomSentenceFrom(const std::shared_ptr<const Grammar>& grammar,
                                              absl::string_view start, std::mt19937_64& rng,
                                              size_t max_bytes) {
  return Walk(grammar, start, rng, max_bytes, nullptr);
}

bool GrammarAccepts(const std::shared_ptr<const Grammar>& grammar, absl::string_view text) {
  GrammarMatcher m(grammar);
  return m.Advance(text) && m.IsComplete();
}

}  // namespace strata
