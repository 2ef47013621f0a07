#include "grammar/gbnf.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/utf8.h"

namespace strata {
namespace {

using Seq = GrammarBuilder::Seq;
using Ranges = CodePointRanges;

bool IsNameChar(char c) { return absl::ascii_isalnum(c) || c == '-' || c == '_'; }

class GbnfParser {
 public:
  explicit GbnfParser(absl::string_view text) : t_(text) {}

  absl::StatusOr<std::shared_ptr<const Grammar>> Parse() {
    SkipSpace();
    while (!AtEnd()) {
      const size_t at = i_;
      const std::string name = Name();
      if (name.empty()) return Error("expected a rule name");
      SkipSpace();
      if (t_.substr(i_, 3) != "::=") return Error("expected ::= after the rule name");
      i_ += 3;
      const int32_t rule = RuleNamed(name);
      if (!defined_.emplace(name, at).second) {
        i_ = at;
        return Error(absl::StrCat("rule ", name, " is defined twice"));
      }
      ASSIGN_OR_RETURN(std::vector<Seq> alts, Alternatives());
      for (Seq& s : alts) b_.AddAlternative(rule, std::move(s));
      SkipSpace();
      if (!AtEnd() && !AtRuleStart()) return Error("unexpected text");
    }
    for (const auto& [name, at] : referenced_) {
      if (!defined_.contains(name)) {
        i_ = at;
        return Error(absl::StrCat("rule ", name, " is used but not defined"));
      }
    }
    if (!defined_.contains("root")) {
      return absl::InvalidArgumentError("the grammar has no rule named root");
    }
    return std::move(b_).Build(rules_.at("root"));
  }

 private:
  absl::Status Error(absl::string_view what) const {
    int line = 1, column = 1;
    for (size_t k = 0; k < i_ && k < t_.size(); ++k) {
      if (t_[k] == '\n') {
        ++line;
        column = 1;
      } else {
        ++column;
      }
    }
    return absl::InvalidArgumentError(absl::StrCat(what, " at line ", line, ", column ", column));
  }
  bool AtEnd() const { return i_ >= t_.size(); }

  // Spaces, newlines and comments.
  void SkipSpace() {
    while (!AtEnd()) {
      if (t_[i_] == '#') {
        while (!AtEnd() && t_[i_] != '\n') ++i_;
      } else if (absl::ascii_isspace(t_[i_])) {
        ++i_;
      } else {
        break;
      }
    }
  }

  std::string Name() {
    const size_t start = i_;
    while (!AtEnd() && IsNameChar(t_[i_])) ++i_;
    return std::string(t_.substr(start, i_ - start));
  }

  // At `name ::=`: the next rule's definition, which ends this one's body.
  bool AtRuleStart() const {
    size_t k = i_;
    while (k < t_.size() && IsNameChar(t_[k])) ++k;
    if (k == i_) return false;
    while (k < t_.size() && (t_[k] == ' ' || t_[k] == '\t' || t_[k] == '\n' || t_[k] == '\r')) {
      ++k;
    }
    return t_.substr(k, 3) == "::=";
  }

  int32_t RuleNamed(const std::string& name) {
    auto it = rules_.find(name);
    if (it != rules_.end()) return it->second;
    const int32_t r = b_.NewRule(name);
    rules_.emplace(name, r);
    return r;
  }

  absl::StatusOr<std::vector<Seq>> Alternatives() {
    std::vector<Seq> alts;
    ASSIGN_OR_RETURN(Seq first, Sequence());
    alts.push_back(std::move(first));
    while (true) {
      SkipSpace();
      if (AtEnd() || t_[i_] != '|') break;
      ++i_;
      ASSIGN_OR_RETURN(Seq next, Sequence());
      alts.push_back(std::move(next));
    }
    return alts;
  }

  absl::StatusOr<Seq> Sequence() {
    Seq out;
    while (true) {
      SkipSpace();
      if (AtEnd() || t_[i_] == '|' || t_[i_] == ')' || AtRuleStart()) break;
      ASSIGN_OR_RETURN(Seq item, Item());
      ASSIGN_OR_RETURN(item, Postfix(std::move(item)));
      out.insert(out.end(), item.begin(), item.end());
    }
    return out;
  }

  absl::StatusOr<Seq> Postfix(Seq item) {
    while (true) {
      // A quantifier may stand apart from its item on the same line.
      size_t k = i_;
      while (k < t_.size() && (t_[k] == ' ' || t_[k] == '\t')) ++k;
      if (k < t_.size() && (t_[k] == '*' || t_[k] == '+' || t_[k] == '?' || t_[k] == '{')) i_ = k;
      absl::StatusOr<std::optional<std::pair<int64_t, int64_t>>> q =
          ReadRepetition(t_, &i_, /*spaces=*/true);
      if (!q.ok()) return Error(q.status().message());
      if (!q->has_value()) return item;
      absl::StatusOr<int32_t> r =
          b_.BoundedRepeat("repeat", std::move(item), (*q)->first, (*q)->second);
      if (!r.ok()) return Error(r.status().message());
      item = Seq{*r};
    }
  }

  absl::StatusOr<uint32_t> Hex(int digits) {
    uint32_t v = 0;
    for (int k = 0; k < digits; ++k, ++i_) {
      if (AtEnd() || !absl::ascii_isxdigit(t_[i_])) return Error("bad hex escape");
      const char c = absl::ascii_tolower(t_[i_]);
      v = v * 16 + static_cast<uint32_t>(c <= '9' ? c - '0' : c - 'a' + 10);
    }
    return v;
  }

  // One character of a literal or class, escapes read.
  absl::StatusOr<char32_t> Char() {
    if (AtEnd()) return Error("unexpected end");
    if (t_[i_] != '\\') {
      char32_t cp = 0;
      const size_t n = DecodeUtf8(t_.substr(i_), &cp);
      if (n == 0) return Error("invalid UTF-8");
      i_ += n;
      return cp;
    }
    ++i_;
    if (AtEnd()) return Error("unexpected end after a backslash");
    const char c = t_[i_++];
    switch (c) {
      case 'n':
        return U'\n';
      case 'r':
        return U'\r';
      case 't':
        return U'\t';
      case '\\':
      case '"':
      case '[':
      case ']':
      case '-':
      case '^':
        return static_cast<char32_t>(c);
      case 'x':
        return Hex(2);
      case 'u':
        return Hex(4);
      case 'U': {
        ASSIGN_OR_RETURN(uint32_t v, Hex(8));
        if (v > 0x10FFFF) return Error("escape beyond U+10FFFF");
        return v;
      }
      default:
        --i_;
        return Error(absl::StrCat("unknown escape \\", std::string(1, c)));
    }
  }

  absl::StatusOr<Seq> Item() {
    const char c = t_[i_];
    if (c == '"') {
      ++i_;
      std::string bytes;
      while (true) {
        if (AtEnd()) return Error("unterminated literal");
        if (t_[i_] == '"') break;
        ASSIGN_OR_RETURN(char32_t cp, Char());
        if (cp >= 0xD800 && cp <= 0xDFFF) return Error("a surrogate is not a character");
        AppendUtf8(cp, &bytes);
      }
      ++i_;
      if (bytes.empty()) return Seq{};
      return b_.Literal(bytes);
    }
    if (c == '[') {
      ++i_;
      const bool negate = !AtEnd() && t_[i_] == '^';
      if (negate) ++i_;
      Ranges ranges;
      while (true) {
        if (AtEnd()) return Error("unterminated character class");
        if (t_[i_] == ']') break;
        ASSIGN_OR_RETURN(char32_t lo, Char());
        char32_t hi = lo;
        if (i_ + 1 < t_.size() && t_[i_] == '-' && t_[i_ + 1] != ']') {
          ++i_;
          ASSIGN_OR_RETURN(hi, Char());
          if (hi < lo) return Error("class range out of order");
        }
        ranges.push_back({lo, hi});
      }
      ++i_;
      if (negate) ranges = ComplementCodePoints(std::move(ranges));
      // Surrogates are not characters: a class of nothing else matches none.
      if (std::all_of(ranges.begin(), ranges.end(),
                      [](const auto& r) { return r.first >= 0xD800 && r.second <= 0xDFFF; })) {
        return Error("the class matches no character");
      }
      return Seq{b_.Utf8Class("class", std::move(ranges))};
    }
    if (c == '.') {
      ++i_;
      return Seq{b_.Utf8Class("any", {{0, 0x10FFFF}})};
    }
    if (c == '(') {
      if (depth_ >= kMaxDepth) return Error(absl::StrCat("groups nest deeper than ", kMaxDepth));
      ++i_;
      ++depth_;
      absl::StatusOr<std::vector<Seq>> group = Alternatives();
      --depth_;
      if (!group.ok()) return group.status();
      std::vector<Seq> alts = *std::move(group);
      SkipSpace();
      if (AtEnd() || t_[i_] != ')') return Error("expected )");
      ++i_;
      return Seq{b_.Choice("group", std::move(alts))};
    }
    if (IsNameChar(c)) {
      const size_t at = i_;
      const std::string name = Name();
      referenced_.emplace(name, at);
      return Seq{b_.Ref(RuleNamed(name))};
    }
    return Error(absl::StrCat("unexpected '", std::string(1, c), "'"));
  }

  static constexpr int kMaxDepth = 64;
  absl::string_view t_;
  size_t i_ = 0;
  int depth_ = 0;  // groups open
  GrammarBuilder b_;
  absl::flat_hash_map<std::string, int32_t> rules_;
  absl::flat_hash_map<std::string, size_t> defined_;     // name -> where it is defined
  absl::flat_hash_map<std::string, size_t> referenced_;  // name -> where it is first used
};

}  // namespace

absl::StatusOr<std::shared_ptr<const Grammar>> GbnfGrammar(absl::string_view text) {
  return GbnfParser(text).Parse();
}

}  // namespace strata
