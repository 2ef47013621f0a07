#include "grammar/regex_grammar.h"

#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/json.h"
#include "common/status_macros.h"
#include "common/utf8.h"

namespace strata {
namespace {

using Ranges = CodePointRanges;
using Seq = GrammarBuilder::Seq;

const Ranges& Digits() {
  static const Ranges r = {{'0', '9'}};
  return r;
}
const Ranges& Word() {
  static const Ranges r = {{'0', '9'}, {'A', 'Z'}, {'_', '_'}, {'a', 'z'}};
  return r;
}
// ECMA-262's white space and line terminators (JSON Schema's patterns are ECMA-262's).
const Ranges& Space() {
  static const Ranges r = {{'\t', '\r'},     {' ', ' '},       {0xA0, 0xA0},     {0x1680, 0x1680},
                           {0x2000, 0x200A}, {0x2028, 0x2029}, {0x202F, 0x202F}, {0x205F, 0x205F},
                           {0x3000, 0x3000}, {0xFEFF, 0xFEFF}};
  return r;
}

constexpr int kMaxRegexDepth = 64;

// Recursive descent over the pattern; every parse function returns elements of `b_`.
class RegexParser {
 public:
  RegexParser(GrammarBuilder* b, absl::string_view p, RegexText text)
      : b_(b), p_(p), json_(text == RegexText::kJsonString) {}

  // The top level: alternatives, each anchored at its start by '^' and its end by '$' (with
  // kSearch, an alternative not anchored may have any text before or after it).
  absl::StatusOr<Seq> Parse(RegexMatch match) {
    std::vector<Seq> alts;
    while (true) {
      const bool anchored_start = !AtEnd() && p_[i_] == '^';
      if (anchored_start) ++i_;
      saw_end_anchor_ = false;
      ASSIGN_OR_RETURN(Seq branch, Concatenation());
      if (match == RegexMatch::kSearch) {
        Seq wrapped;
        if (!anchored_start) wrapped.push_back(AnyText());
        wrapped.insert(wrapped.end(), branch.begin(), branch.end());
        if (!saw_end_anchor_) wrapped.push_back(AnyText());
        branch = std::move(wrapped);
      }
      alts.push_back(std::move(branch));
      if (AtEnd() || p_[i_] != '|') break;
      ++i_;
    }
    if (i_ < p_.size()) return Error("unbalanced ')'");
    if (alts.size() == 1) return std::move(alts[0]);
    return Seq{b_->Choice("re|", std::move(alts))};
  }

 private:
  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(what, " at offset ", i_));
  }
  bool AtEnd() const { return i_ >= p_.size(); }
  // `$` that ends a top-level alternative, or that only closing parentheses follow: an anchor.
  bool AtEndAnchor() const {
    if (p_[i_] != '$') return false;
    if (depth_ == 0) return i_ + 1 == p_.size() || p_[i_ + 1] == '|';
    return p_.find_first_not_of(')', i_ + 1) == absl::string_view::npos;
  }

  // Any text (inside a JSON string: any characters, escaped where they must be).
  int32_t AnyText() { return b_->Star("re.*", OneOf({{0, 0x10FFFF}})); }

  absl::StatusOr<Seq> Alternation() {
    std::vector<Seq> alts;
    ASSIGN_OR_RETURN(Seq first, Concatenation());
    alts.push_back(std::move(first));
    while (!AtEnd() && p_[i_] == '|') {
      ++i_;
      ASSIGN_OR_RETURN(Seq next, Concatenation());
      alts.push_back(std::move(next));
    }
    if (alts.size() == 1) return std::move(alts[0]);
    return Seq{b_->Choice("re|", std::move(alts))};
  }

  absl::StatusOr<Seq> Concatenation() {
    Seq out;
    while (!AtEnd() && p_[i_] != '|' && p_[i_] != ')') {
      if (AtEndAnchor()) {
        ++i_;
        saw_end_anchor_ = true;
        continue;
      }
      ASSIGN_OR_RETURN(Seq atom, Atom());
      ASSIGN_OR_RETURN(atom, Quantified(std::move(atom)));
      out.insert(out.end(), atom.begin(), atom.end());
    }
    return out;
  }

  absl::StatusOr<Seq> Quantified(Seq atom) {
    while (true) {
      absl::StatusOr<std::optional<std::pair<int64_t, int64_t>>> q =
          ReadRepetition(p_, &i_, /*spaces=*/false);
      if (!q.ok()) return Error(q.status().message());
      if (!q->has_value()) return atom;  // none (a '{' without a count is a literal)
      // Lazy and possessive forms match the same texts.
      if (!AtEnd() && (p_[i_] == '?' || p_[i_] == '+')) ++i_;
      absl::StatusOr<int32_t> r =
          b_->BoundedRepeat("re*", std::move(atom), (*q)->first, (*q)->second);
      if (!r.ok()) return Error(r.status().message());
      atom = Seq{*r};
    }
  }

  absl::StatusOr<char32_t> CodePoint() {
    char32_t cp = 0;
    const size_t n = DecodeUtf8(p_.substr(i_), &cp);
    if (n == 0) return Error("invalid UTF-8");
    i_ += n;
    return cp;
  }

  absl::StatusOr<uint32_t> Hex(int digits) {
    uint32_t v = 0;
    for (int k = 0; k < digits; ++k, ++i_) {
      if (AtEnd()) return Error("truncated hex escape");
      const char c = p_[i_];
      int d = c >= '0' && c <= '9'   ? c - '0'
              : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                     : -1;
      if (d < 0) return Error("bad hex digit");
      v = v * 16 + static_cast<uint32_t>(d);
    }
    return v;
  }

  // After a backslash: the escape as code point ranges.
  absl::StatusOr<Ranges> Escape() {
    if (AtEnd()) return Error("trailing backslash");
    const char c = p_[i_++];
    switch (c) {
      case 'd':
        return Digits();
      case 'D':
        return ComplementCodePoints(Digits());
      case 'w':
        return Word();
      case 'W':
        return ComplementCodePoints(Word());
      case 's':
        return Space();
      case 'S':
        return ComplementCodePoints(Space());
      case 'n':
        return Ranges{{'\n', '\n'}};
      case 'r':
        return Ranges{{'\r', '\r'}};
      case 't':
        return Ranges{{'\t', '\t'}};
      case 'f':
        return Ranges{{'\f', '\f'}};
      case 'v':
        return Ranges{{'\v', '\v'}};
      case '0':
        return Ranges{{0, 0}};
      case 'x': {
        ASSIGN_OR_RETURN(uint32_t v, Hex(2));
        return Ranges{{v, v}};
      }
      case 'u': {
        ASSIGN_OR_RETURN(uint32_t v, Hex(4));
        // A surrogate pair spells one character; a lone surrogate is none.
        if (v >= 0xD800 && v <= 0xDBFF && p_.substr(i_, 2) == "\\u") {
          const size_t save = i_;
          i_ += 2;
          ASSIGN_OR_RETURN(uint32_t lo, Hex(4));
          if (lo >= 0xDC00 && lo <= 0xDFFF) {
            const uint32_t cp = 0x10000 + ((v - 0xD800) << 10) + (lo - 0xDC00);
            return Ranges{{cp, cp}};
          }
          i_ = save;
        }
        if (v >= 0xD800 && v <= 0xDFFF) return Error("a lone surrogate is not a character");
        return Ranges{{v, v}};
      }
      case 'b':
      case 'B':
        --i_;
        return Error("word boundaries are not supported");
      default:
        if (c >= '1' && c <= '9') {
          --i_;
          return Error("backreferences are not supported");
        }
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
          --i_;
          return Error(absl::StrCat("unknown escape \\", std::string(1, c)));
        }
        --i_;
        ASSIGN_OR_RETURN(char32_t cp, CodePoint());
        return Ranges{{cp, cp}};
    }
  }

  absl::StatusOr<Ranges> Class() {
    // After '['.
    bool negate = false;
    if (!AtEnd() && p_[i_] == '^') {
      negate = true;
      ++i_;
    }
    Ranges r;
    bool first = true;
    while (true) {
      if (AtEnd()) return Error("unterminated character class");
      if (p_[i_] == ']' && !first) {
        ++i_;
        break;
      }
      first = false;
      if (p_[i_] == '[' && i_ + 1 < p_.size() && p_[i_ + 1] == ':') {
        return Error("POSIX classes are not supported");
      }
      Ranges item;
      if (p_[i_] == '\\') {
        ++i_;
        ASSIGN_OR_RETURN(item, Escape());
      } else {
        ASSIGN_OR_RETURN(char32_t cp, CodePoint());
        item = {{cp, cp}};
      }
      // A range a-b (a single character each side).
      if (item.size() == 1 && item[0].first == item[0].second && i_ + 1 < p_.size() &&
          p_[i_] == '-' && p_[i_ + 1] != ']') {
        ++i_;
        char32_t hi;
        if (p_[i_] == '\\') {
          ++i_;
          ASSIGN_OR_RETURN(Ranges e, Escape());
          if (e.size() != 1 || e[0].first != e[0].second) return Error("bad class range");
          hi = e[0].first;
        } else {
          ASSIGN_OR_RETURN(hi, CodePoint());
        }
        if (hi < item[0].first) return Error("class range out of order");
        item[0].second = hi;
      }
      r.insert(r.end(), item.begin(), item.end());
    }
    return negate ? ComplementCodePoints(std::move(r)) : r;
  }

  // One character of `r`.
  Seq OneOf(Ranges r) {
    if (!json_) return Seq{b_->Utf8Class("re[]", std::move(r))};
    // Inside a JSON string: what may stand unescaped, and the escapes of the rest.
    Ranges plain;
    std::vector<Seq> alts;
    for (auto [lo, hi] : r) {
      for (auto [a, z] : Ranges{{0x20, 0x21}, {0x23, 0x5B}, {0x5D, 0x10FFFF}}) {
        if (std::max(lo, a) <= std::min(hi, z)) plain.push_back({std::max(lo, a), std::min(hi, z)});
      }
      for (char32_t c = lo; c <= std::min<char32_t>(hi, 0x5C); ++c) {
        if (c < 0x20 || c == '"' || c == '\\') alts.push_back(Char(c));
      }
    }
    if (!plain.empty()) alts.push_back(Seq{b_->Utf8Class("re[]", std::move(plain))});
    if (alts.size() == 1) return std::move(alts[0]);
    return Seq{b_->Choice("re[]", std::move(alts))};
  }

  // The character `cp` (escaped inside a JSON string).
  Seq Char(char32_t cp) {
    std::string bytes;
    AppendUtf8(cp, &bytes);
    if (json_) {
      bytes = JsonQuote(bytes);
      bytes = bytes.substr(1, bytes.size() - 2);
    }
    return b_->Literal(bytes);
  }

  absl::StatusOr<Seq> Atom() {
    const char c = p_[i_];
    switch (c) {
      case '(': {
        if (depth_ >= kMaxRegexDepth) {
          return Error(absl::StrCat("groups nest deeper than ", kMaxRegexDepth));
        }
        ++i_;
        if (!AtEnd() && p_[i_] == '?') {
          ++i_;
          if (!AtEnd() && p_[i_] == ':') {
            ++i_;
          } else if (p_.substr(i_, 2) == "P<" ||
                     (p_.substr(i_, 1) == "<" && p_.substr(i_, 2) != "<=" &&
                      p_.substr(i_, 2) != "<!")) {
            // A named group: (?P<name>...) or (?<name>...).
            i_ += p_[i_] == 'P' ? 2 : 1;
            const size_t start = i_;
            while (!AtEnd() && (absl::ascii_isalnum(p_[i_]) || p_[i_] == '_')) ++i_;
            if (i_ == start || AtEnd() || p_[i_] != '>') return Error("bad group name");
            ++i_;
          } else if (p_.substr(i_, 2) == "P=") {
            return Error("backreferences are not supported");
          } else {
            return Error("lookaround and inline flags are not supported");
          }
        }
        ++depth_;
        ASSIGN_OR_RETURN(Seq inner, Alternation());
        --depth_;
        if (AtEnd() || p_[i_] != ')') return Error("missing ')'");
        ++i_;
        // A group of its own, so that a quantifier after it repeats all of it.
        return Seq{b_->Choice("re()", {std::move(inner)})};
      }
      case '[': {
        ++i_;
        ASSIGN_OR_RETURN(Ranges r, Class());
        return OneOf(std::move(r));
      }
      case '.':
        ++i_;
        return OneOf({{0, '\n' - 1}, {'\n' + 1, 0x10FFFF}});
      case '\\': {
        ++i_;
        ASSIGN_OR_RETURN(Ranges r, Escape());
        if (r.size() == 1 && r[0].first == r[0].second) return Char(r[0].first);
        return OneOf(std::move(r));
      }
      case '*':
      case '+':
      case '?':
        return Error("nothing to repeat");
      case '^':
        return Error("'^' is supported only at the start");
      case '$':
        return Error("'$' is supported only at the end");
      default: {
        ASSIGN_OR_RETURN(char32_t cp, CodePoint());
        return Char(cp);
      }
    }
  }

  GrammarBuilder* b_;
  absl::string_view p_;
  const bool json_;
  size_t i_ = 0;
  int depth_ = 0;                // groups open
  bool saw_end_anchor_ = false;  // the current top-level alternative ended with '$'
};

}  // namespace

absl::StatusOr<GrammarBuilder::Seq> AddRegex(GrammarBuilder* b, absl::string_view pattern,
                                             RegexText text, RegexMatch match) {
  return RegexParser(b, pattern, text).Parse(match);
}

absl::StatusOr<std::shared_ptr<const Grammar>> RegexGrammar(absl::string_view pattern) {
  GrammarBuilder b;
  const int32_t root = b.NewRule("regex");
  ASSIGN_OR_RETURN(Seq s, AddRegex(&b, pattern));
  b.AddAlternative(root, std::move(s));
  return std::move(b).Build(root);
}

}  // namespace strata
