#include "coordinator/jinja.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>
#include <map>
#include <optional>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "common/utf8.h"

namespace strata::jinja {

// ---------------------------------------------------------------------------------------------
// Values

namespace {
// Nesting a value may have when printed or compared (a namespace can hold itself).
constexpr int kMaxDepth = 128;
}  // namespace

Value Value::None() {
  Value v;
  v.kind_ = Kind::kNone;
  return v;
}
Value::Value(bool b) : kind_(Kind::kBool), b_(b) {}
Value::Value(int64_t i) : kind_(Kind::kInt), i_(i) {}
Value::Value(double d) : kind_(Kind::kFloat), f_(d) {}
Value::Value(std::string s)
    : kind_(Kind::kString), s_(std::make_shared<std::string>(std::move(s))) {}
Value::Value(List l) : kind_(Kind::kList), list_(std::make_shared<List>(std::move(l))) {}
Value::Value(Dict d) : kind_(Kind::kDict), dict_(std::make_shared<Dict>(std::move(d))) {}
Value Value::Tuple(List l) {
  Value v(std::move(l));
  v.tuple_ = true;
  return v;
}
Value Value::Fn(Function f) {
  Value v;
  v.kind_ = Kind::kFunction;
  v.fn_ = std::make_shared<Function>(std::move(f));
  return v;
}

absl::StatusOr<Value> Value::FromJson(const JsonValue& json) {
  if (json.IsNull()) return None();
  if (json.IsBool()) return Value(*json.AsBool());
  if (json.IsString()) return Value(std::string(*json.AsString()));
  if (json.IsNumber()) {
    const auto type = json.raw().type();
    if (type == simdjson::dom::element_type::INT64 || type == simdjson::dom::element_type::UINT64) {
      if (absl::StatusOr<int64_t> i = json.AsInt(); i.ok()) return Value(*i);
    }
    ASSIGN_OR_RETURN(double d, json.AsDouble());
    return Value(d);
  }
  if (json.IsArray()) {
    ASSIGN_OR_RETURN(std::vector<JsonValue> items, json.AsArray());
    List l;
    for (const JsonValue& item : items) {
      ASSIGN_OR_RETURN(Value v, FromJson(item));
      l.push_back(std::move(v));
    }
    return Value(std::move(l));
  }
  ASSIGN_OR_RETURN(auto fields, json.AsObject());
  Dict d;
  for (const auto& [key, item] : fields) {
    ASSIGN_OR_RETURN(Value v, FromJson(item));
    d.emplace_back(std::string(key), std::move(v));
  }
  return Value(std::move(d));
}

Value Value::Get(absl::string_view key) const {
  if (kind_ != Kind::kDict) return Value();
  for (const auto& [k, v] : *dict_) {
    if (k == key) return v;
  }
  return Value();
}

void Value::Set(const std::string& key, Value v) const {
  if (kind_ != Kind::kDict) return;
  for (auto& [k, old] : *dict_) {
    if (k == key) {
      old = std::move(v);
      return;
    }
  }
  dict_->emplace_back(key, std::move(v));
}

bool Value::Truthy() const {
  switch (kind_) {
    case Kind::kUndefined:
    case Kind::kNone:
      return false;
    case Kind::kBool:
      return b_;
    case Kind::kInt:
      return i_ != 0;
    case Kind::kFloat:
      return f_ != 0;
    case Kind::kString:
      return !s_->empty();
    case Kind::kList:
      return !list_->empty();
    case Kind::kDict:
      return !dict_->empty();
    case Kind::kFunction:
      return true;
  }
  return false;
}

namespace {

// Python's repr of a float: the shortest digits that read back, with ".0" on whole numbers.
std::string FloatRepr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[400];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::fixed);
  std::string s(buf, end);
  // Python writes exponents from 1e16 up and below 1e-4; to_chars chooses the shorter form.
  const double a = std::fabs(d);
  if (a != 0 && (a >= 1e16 || a < 1e-4)) {
    auto [e2, ec2] = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
    s.assign(buf, e2);
    // Python: 1e+16, 1.5e-05 (two exponent digits at least).
    const size_t e = s.find('e');
    std::string mant = s.substr(0, e), exp = s.substr(e + 1);
    const char sign = exp[0] == '-' ? '-' : '+';
    if (exp[0] == '-' || exp[0] == '+') exp = exp.substr(1);
    while (exp.size() > 2 && exp[0] == '0') exp = exp.substr(1);
    if (exp.size() < 2) exp = "0" + exp;
    return absl::StrCat(mant, "e", std::string(1, sign), exp);
  }
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

std::string PyQuote(const std::string& s) {
  // Python prefers single quotes, double ones when the text has a single quote and no double.
  const bool dq = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
  const char q = dq ? '"' : '\'';
  std::string out(1, q);
  for (const char c : s) {
    if (c == q || c == '\\') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\r') {
      out += "\\r";
    } else {
      out += c;
    }
  }
  out += q;
  return out;
}

}  // namespace

std::string Value::Str() const {
  switch (kind_) {
    case Kind::kUndefined:
      return "";
    case Kind::kString:
      return *s_;
    default:
      return Repr();
  }
}

std::string Value::Repr() const { return ReprAt(0); }

std::string Value::ReprAt(int depth) const {
  if (depth > kMaxDepth && (kind_ == Kind::kList || kind_ == Kind::kDict)) {
    return kind_ == Kind::kList ? "[...]" : "{...}";
  }
  switch (kind_) {
    case Kind::kUndefined:
      return "";
    case Kind::kNone:
      return "None";
    case Kind::kBool:
      return b_ ? "True" : "False";
    case Kind::kInt:
      return absl::StrCat(i_);
    case Kind::kFloat:
      return FloatRepr(f_);
    case Kind::kString:
      return PyQuote(*s_);
    case Kind::kList: {
      std::vector<std::string> parts;
      for (const Value& v : *list_) parts.push_back(v.ReprAt(depth + 1));
      if (tuple_) {
        return absl::StrCat("(", absl::StrJoin(parts, ", "), parts.size() == 1 ? ",)" : ")");
      }
      return absl::StrCat("[", absl::StrJoin(parts, ", "), "]");
    }
    case Kind::kDict: {
      std::vector<std::string> parts;
      for (const auto& [k, v] : *dict_) {
        parts.push_back(absl::StrCat(PyQuote(k), ": ", v.ReprAt(depth + 1)));
      }
      return absl::StrCat("{", absl::StrJoin(parts, ", "), "}");
    }
    case Kind::kFunction:
      return "<function>";
  }
  return "";
}

namespace {
bool EqualAt(const Value& a, const Value& b, int depth);
}  // namespace

bool operator==(const Value& a, const Value& b) { return EqualAt(a, b, 0); }

namespace {
bool EqualAt(const Value& a, const Value& b, int depth) {
  if (depth > kMaxDepth) return false;
  if (a.IsNumber() && b.IsNumber()) {
    if (a.kind() == Value::Kind::kInt && b.kind() == Value::Kind::kInt) return a.i() == b.i();
    return a.f() == b.f();
  }
  if (a.kind() == Value::Kind::kBool && b.IsNumber()) return Value(int64_t{a.b()}) == b;
  if (b.kind() == Value::Kind::kBool && a.IsNumber()) return a == Value(int64_t{b.b()});
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return true;
    case Value::Kind::kBool:
      return a.b() == b.b();
    case Value::Kind::kString:
      return a.s() == b.s();
    case Value::Kind::kList: {
      if (a.list().size() != b.list().size()) return false;
      for (size_t k = 0; k < a.list().size(); ++k) {
        if (!EqualAt(a.list()[k], b.list()[k], depth + 1)) return false;
      }
      return true;
    }
    case Value::Kind::kDict: {
      if (a.dict().size() != b.dict().size()) return false;
      for (const auto& [k, v] : a.dict()) {
        if (!EqualAt(b.Get(k), v, depth + 1)) return false;
      }
      return true;
    }
    default:
      return false;
  }
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// Syntax

namespace {

enum class Tok { kName, kInt, kFloat, kString, kOp, kEnd };

// How deep expressions, and statements, may nest (real templates: under 10).
constexpr int kMaxNesting = 48;

// The filters and tests Renderer::Filter and Renderer::Test implement.
const absl::flat_hash_set<absl::string_view> kFilters = {
    "trim",   "upper",   "lower",     "capitalize", "title",      "string",     "safe",
    "e",      "escape",  "length",    "count",      "default",    "d",          "tojson",
    "first",  "last",    "join",      "replace",    "int",        "float",      "abs",
    "list",   "reverse", "unique",    "items",      "selectattr", "rejectattr", "select",
    "reject", "map",     "sort",      "dictsort",   "sum",        "min",        "max",
    "round",  "indent",  "wordcount", "format"};
const absl::flat_hash_set<absl::string_view> kTests = {
    "defined",     "undefined", "none",    "string", "number",   "integer",
    "float",       "boolean",   "true",    "false",  "mapping",  "iterable",
    "sequence",    "callable",  "lower",   "upper",  "odd",      "even",
    "divisibleby", "eq",        "equalto", "==",     "sameas",   "ne",
    "!=",          "in",        "<",       ">",      "<=",       ">=",
    "lt",          "gt",        "le",      "ge",     "lessthan", "greaterthan"};

struct Token {
  Tok kind = Tok::kEnd;
  std::string text;  // the name, the operator, the string's value
  int64_t i = 0;
  double f = 0;
};

absl::Status SyntaxError(int line, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("chat template line ", line, ": ", what));
}

absl::StatusOr<std::vector<Token>> Tokenize(absl::string_view s, int line) {
  std::vector<Token> out;
  size_t i = 0;
  while (i < s.size()) {
    const char c = s[i];
    if (absl::ascii_isspace(static_cast<unsigned char>(c))) {
      ++i;
      continue;
    }
    Token t;
    if (absl::ascii_isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < s.size() &&
             (absl::ascii_isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) {
        ++j;
      }
      t.kind = Tok::kName;
      t.text = std::string(s.substr(i, j - i));
      i = j;
    } else if (absl::ascii_isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      bool is_float = false;
      while (j < s.size() &&
             (absl::ascii_isdigit(static_cast<unsigned char>(s[j])) || s[j] == '_')) {
        ++j;
      }
      if (j + 1 < s.size() && s[j] == '.' &&
          absl::ascii_isdigit(static_cast<unsigned char>(s[j + 1]))) {
        is_float = true;
        ++j;
        while (j < s.size() && absl::ascii_isdigit(static_cast<unsigned char>(s[j]))) ++j;
      }
      if (j < s.size() && (s[j] == 'e' || s[j] == 'E')) {
        size_t k = j + 1;
        if (k < s.size() && (s[k] == '+' || s[k] == '-')) ++k;
        if (k < s.size() && absl::ascii_isdigit(static_cast<unsigned char>(s[k]))) {
          is_float = true;
          j = k;
          while (j < s.size() && absl::ascii_isdigit(static_cast<unsigned char>(s[j]))) ++j;
        }
      }
      std::string digits = absl::StrReplaceAll(s.substr(i, j - i), {{"_", ""}});
      if (is_float) {
        t.kind = Tok::kFloat;
        t.f = std::strtod(digits.c_str(), nullptr);
      } else {
        t.kind = Tok::kInt;
        auto [p, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), t.i);
        if (ec != std::errc()) return SyntaxError(line, absl::StrCat("bad number ", digits));
      }
      i = j;
    } else if (c == '\'' || c == '"') {
      std::string v;
      size_t j = i + 1;
      for (; j < s.size() && s[j] != c; ++j) {
        if (s[j] == '\\' && j + 1 < s.size()) {
          ++j;
          switch (s[j]) {
            case 'n':
              v += '\n';
              break;
            case 't':
              v += '\t';
              break;
            case 'r':
              v += '\r';
              break;
            case '\\':
            case '\'':
            case '"':
              v += s[j];
              break;
            case '0':
              v += '\0';
              break;
            case 'a':
              v += '\a';
              break;
            case 'b':
              v += '\b';
              break;
            case 'f':
              v += '\f';
              break;
            case 'v':
              v += '\v';
              break;
            case 'x':
            case 'u':
            case 'U': {
              // \xHH, \uHHHH, \UHHHHHHHH: the code point in UTF-8.
              const size_t digits = s[j] == 'x' ? 2 : s[j] == 'u' ? 4 : 8;
              uint32_t cp = 0;
              if (j + digits >= s.size()) {
                return SyntaxError(line, "truncated escape in a string");
              }
              for (size_t k = 1; k <= digits; ++k) {
                const char h = s[j + k];
                int d = absl::ascii_isdigit(static_cast<unsigned char>(h)) ? h - '0'
                        : (h >= 'a' && h <= 'f')                           ? h - 'a' + 10
                        : (h >= 'A' && h <= 'F')                           ? h - 'A' + 10
                                                                           : -1;
                if (d < 0) return SyntaxError(line, "bad escape in a string");
                cp = cp * 16 + static_cast<uint32_t>(d);
              }
              if (cp > 0x10FFFF) return SyntaxError(line, "escape beyond Unicode");
              AppendUtf8(cp, &v);
              j += digits;
              break;
            }
            default:
              v += '\\';
              v += s[j];
          }
        } else {
          v += s[j];
        }
      }
      if (j >= s.size()) return SyntaxError(line, "unterminated string");
      t.kind = Tok::kString;
      t.text = std::move(v);
      i = j + 1;
    } else {
      static constexpr absl::string_view kTwo[] = {"==", "!=", "<=", ">=", "//", "**"};
      t.kind = Tok::kOp;
      for (absl::string_view op : kTwo) {
        if (s.substr(i, 2) == op) t.text = std::string(op);
      }
      if (t.text.empty()) {
        if (absl::string_view("+-*/%~<>=()[]{}.,:|").find(c) == absl::string_view::npos) {
          return SyntaxError(line, absl::StrCat("unexpected character '", std::string(1, c), "'"));
        }
        t.text = std::string(1, c);
      }
      i += t.text.size();
    }
    out.push_back(std::move(t));
  }
  out.push_back(Token{});
  return out;
}

}  // namespace

struct Expr {
  enum class Kind {
    kLiteral,
    kName,
    kAttr,
    kItem,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kNeg,
    kNot,
    kAnd,
    kOr,
    kBinary,
    kCond,
    kList,
    kDict,
  };
  Kind kind = Kind::kLiteral;
  int line = 0;
  Value literal;
  std::string name;                         // variable, attribute, filter, test, operator
  std::vector<std::shared_ptr<Expr>> args;  // operands, call/filter arguments, list items
  std::vector<std::pair<std::string, std::shared_ptr<Expr>>> kwargs;
  bool negate = false;  // `is not`, `not in`
};
using ExprP = std::shared_ptr<Expr>;

struct Node {
  enum class Kind { kBody, kText, kOutput, kIf, kFor, kSet, kSetBlock, kMacro, kBreak, kContinue };
  Kind kind = Kind::kBody;
  int line = 0;
  std::string text;  // kText
  ExprP expr;        // kOutput, kSet value, kFor iterable
  std::vector<std::pair<ExprP, std::shared_ptr<Node>>> branches;  // kIf: (condition, body)
  std::shared_ptr<Node> else_body;                                // kIf, kFor
  std::vector<std::shared_ptr<Node>> children;  // kBody; the body of kFor, kSetBlock, kMacro
  std::vector<std::string> targets;             // kFor's loop variables; kSet's name (or ns, attr)
  ExprP filter;                                 // kFor's `if`
  std::vector<std::pair<std::string, ExprP>> params;  // kMacro (default or null)
};
using NodeP = std::shared_ptr<Node>;

namespace {

class ExprParser {
 public:
  ExprParser(std::vector<Token> toks, int line) : t_(std::move(toks)), line_(line) {}

  const Token& Peek(int k = 0) const { return t_[std::min(pos_ + k, t_.size() - 1)]; }
  bool AtEnd() const { return Peek().kind == Tok::kEnd; }
  bool IsOp(absl::string_view op, int k = 0) const {
    return Peek(k).kind == Tok::kOp && Peek(k).text == op;
  }
  bool IsName(absl::string_view n, int k = 0) const {
    return Peek(k).kind == Tok::kName && Peek(k).text == n;
  }
  bool Accept(absl::string_view op) {
    if (!IsOp(op)) return false;
    ++pos_;
    return true;
  }
  bool AcceptName(absl::string_view n) {
    if (!IsName(n)) return false;
    ++pos_;
    return true;
  }
  absl::Status Expect(absl::string_view op) {
    if (!Accept(op)) return Error(absl::StrCat("expected '", op, "'"));
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ExpectName() {
    if (Peek().kind != Tok::kName) return Error("expected a name");
    return t_[pos_++].text;
  }
  absl::Status Error(absl::string_view what) const {
    const Token& t = Peek();
    return SyntaxError(
        line_, absl::StrCat(what, t.kind == Tok::kEnd ? " at the end of the tag"
                                                      : absl::StrCat(" before '", t.text, "'")));
  }
  absl::Status ExpectEnd() {
    if (!AtEnd()) return Error("unexpected tokens");
    return absl::OkStatus();
  }

  ExprP Make(Expr::Kind kind) {
    auto e = std::make_shared<Expr>();
    e->kind = kind;
    e->line = line_;
    return e;
  }

  // expr := or ['if' or ['else' expr]]
  absl::StatusOr<ExprP> Parse() {
    Nest nest(this);
    if (depth_ > kMaxNesting) return Error("expression nested too deep");
    ASSIGN_OR_RETURN(ExprP e, ParseOr());
    if (IsName("if")) {
      ++pos_;
      ASSIGN_OR_RETURN(ExprP cond, ParseOr());
      ExprP other;
      if (AcceptName("else")) {
        ASSIGN_OR_RETURN(other, Parse());
      } else {
        other = Make(Expr::Kind::kLiteral);  // undefined
      }
      ExprP c = Make(Expr::Kind::kCond);
      c->args = {cond, e, other};
      return c;
    }
    return e;
  }
  // Without the conditional form (a `for`'s iterable, whose `if` is the loop's filter).
  absl::StatusOr<ExprP> ParseOr() {
    ASSIGN_OR_RETURN(ExprP e, ParseAnd());
    while (AcceptName("or")) {
      ASSIGN_OR_RETURN(ExprP r, ParseAnd());
      ExprP o = Make(Expr::Kind::kOr);
      o->args = {e, r};
      e = o;
    }
    return e;
  }

 private:
  absl::StatusOr<ExprP> ParseAnd() {
    ASSIGN_OR_RETURN(ExprP e, ParseNot());
    while (AcceptName("and")) {
      ASSIGN_OR_RETURN(ExprP r, ParseNot());
      ExprP o = Make(Expr::Kind::kAnd);
      o->args = {e, r};
      e = o;
    }
    return e;
  }
  absl::StatusOr<ExprP> ParseNot() {
    Nest nest(this);
    if (depth_ > kMaxNesting) return Error("expression nested too deep");
    if (AcceptName("not")) {
      ASSIGN_OR_RETURN(ExprP x, ParseNot());
      ExprP o = Make(Expr::Kind::kNot);
      o->args = {x};
      return o;
    }
    return ParseCompare();
  }
  // Comparisons chain as in Python: a < b <= c is (a < b) and (b <= c).
  absl::StatusOr<ExprP> ParseCompare() {
    ASSIGN_OR_RETURN(ExprP e, ParseAdd());
    ExprP chain, left = e;
    while (true) {
      std::string op;
      bool negate = false;
      if (Peek().kind == Tok::kOp &&
          (Peek().text == "==" || Peek().text == "!=" || Peek().text == "<" || Peek().text == ">" ||
           Peek().text == "<=" || Peek().text == ">=")) {
        op = t_[pos_++].text;
      } else if (IsName("in")) {
        ++pos_;
        op = "in";
      } else if (IsName("not") && IsName("in", 1)) {
        pos_ += 2;
        op = "in";
        negate = true;
      } else {
        return chain != nullptr ? chain : e;
      }
      ASSIGN_OR_RETURN(ExprP r, ParseAdd());
      ExprP b = Make(Expr::Kind::kBinary);
      b->name = op;
      b->negate = negate;
      b->args = {left, r};
      left = r;
      if (chain == nullptr) {
        chain = b;
      } else {
        ExprP a = Make(Expr::Kind::kAnd);
        a->args = {chain, b};
        chain = a;
      }
    }
  }
  absl::StatusOr<ExprP> ParseConcat() {
    ASSIGN_OR_RETURN(ExprP e, ParseMul());
    while (Accept("~")) {
      ASSIGN_OR_RETURN(ExprP r, ParseMul());
      ExprP b = Make(Expr::Kind::kBinary);
      b->name = "~";
      b->args = {e, r};
      e = b;
    }
    return e;
  }
  absl::StatusOr<ExprP> ParseAdd() {
    ASSIGN_OR_RETURN(ExprP e, ParseConcat());
    while (IsOp("+") || IsOp("-")) {
      const std::string op = t_[pos_++].text;
      ASSIGN_OR_RETURN(ExprP r, ParseConcat());
      ExprP b = Make(Expr::Kind::kBinary);
      b->name = op;
      b->args = {e, r};
      e = b;
    }
    return e;
  }
  absl::StatusOr<ExprP> ParseMul() {
    ASSIGN_OR_RETURN(ExprP e, ParsePow());
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      const std::string op = t_[pos_++].text;
      ASSIGN_OR_RETURN(ExprP r, ParsePow());
      ExprP b = Make(Expr::Kind::kBinary);
      b->name = op;
      b->args = {e, r};
      e = b;
    }
    return e;
  }
  // As Jinja: ** over signed operands, left to right (-2 ** 2 is 4, 2 ** 3 ** 2 is 64).
  absl::StatusOr<ExprP> ParsePow() {
    ASSIGN_OR_RETURN(ExprP e, ParseUnary());
    while (Accept("**")) {
      ASSIGN_OR_RETURN(ExprP r, ParseUnary());
      ExprP b = Make(Expr::Kind::kBinary);
      b->name = "**";
      b->args = {e, r};
      e = b;
    }
    return e;
  }
  // As Jinja: filters and tests after a sign apply to the signed value (-3|abs is 3).
  absl::StatusOr<ExprP> ParseUnary(bool with_filters = true) {
    Nest nest(this);
    if (depth_ > kMaxNesting) return Error("expression nested too deep");
    ExprP e;
    if (Accept("-")) {
      ASSIGN_OR_RETURN(ExprP x, ParseUnary(false));
      e = Make(Expr::Kind::kNeg);
      e->args = {x};
    } else if (Accept("+")) {
      ASSIGN_OR_RETURN(e, ParseUnary(false));
    } else {
      ASSIGN_OR_RETURN(e, ParsePrimary());
      ASSIGN_OR_RETURN(e, ParsePostfix(e));
    }
    return with_filters ? ParseFilters(e) : e;
  }
  absl::Status ParseArgs(Expr* call) {
    // After '(' : positional then keyword arguments, up to ')'.
    while (!Accept(")")) {
      if (Peek().kind == Tok::kName && IsOp("=", 1)) {
        const std::string key = t_[pos_].text;
        pos_ += 2;
        ASSIGN_OR_RETURN(ExprP v, Parse());
        call->kwargs.emplace_back(key, v);
      } else {
        ASSIGN_OR_RETURN(ExprP v, Parse());
        call->args.push_back(v);
      }
      if (!Accept(",")) {
        RETURN_IF_ERROR(Expect(")"));
        break;
      }
    }
    return absl::OkStatus();
  }
  absl::StatusOr<ExprP> ParsePostfix(ExprP e) {
    while (true) {
      if (Accept(".")) {
        ExprP a = Make(Expr::Kind::kAttr);
        if (Peek().kind == Tok::kInt) {
          a->kind = Expr::Kind::kItem;
          ExprP k = Make(Expr::Kind::kLiteral);
          k->literal = Value(t_[pos_++].i);
          a->args = {e, k};
        } else {
          ASSIGN_OR_RETURN(a->name, ExpectName());
          a->args = {e};
        }
        e = a;
      } else if (Accept("[")) {
        ExprP parts[3];
        bool slice = false;
        for (int k = 0; k < 3; ++k) {
          if (!IsOp(":") && !IsOp("]")) {
            ASSIGN_OR_RETURN(parts[k], Parse());
          }
          if (k < 2 && Accept(":")) {
            slice = true;
          } else {
            break;
          }
        }
        RETURN_IF_ERROR(Expect("]"));
        ExprP s = Make(slice ? Expr::Kind::kSlice : Expr::Kind::kItem);
        if (slice) {
          s->args = {e, parts[0], parts[1], parts[2]};
        } else {
          if (parts[0] == nullptr) return Error("empty subscript");
          s->args = {e, parts[0]};
        }
        e = s;
      } else if (Accept("(")) {
        ExprP c = Make(Expr::Kind::kCall);
        c->args = {e};
        RETURN_IF_ERROR(ParseArgs(c.get()));
        e = c;
      } else {
        return e;
      }
    }
  }
  absl::StatusOr<ExprP> ParseFilters(ExprP e) {
    while (true) {
      if (Accept("|")) {
        ExprP f = Make(Expr::Kind::kFilter);
        ASSIGN_OR_RETURN(f->name, ExpectName());
        // Known at parse time, so that a template using one Strata lacks falls back when the
        // model loads rather than failing requests later.
        if (!kFilters.contains(f->name)) {
          return SyntaxError(line_, absl::StrCat("unsupported filter '", f->name, "'"));
        }
        f->args = {e};
        if (Accept("(")) RETURN_IF_ERROR(ParseArgs(f.get()));
        e = f;
      } else if (AcceptName("is")) {
        ExprP t = Make(Expr::Kind::kTest);
        t->negate = AcceptName("not");
        if (Peek().kind == Tok::kName) {
          t->name = t_[pos_++].text;
        } else if (Peek().kind == Tok::kOp &&
                   (Peek().text == "==" || Peek().text == "!=" || Peek().text == "<" ||
                    Peek().text == ">" || Peek().text == "<=" || Peek().text == ">=")) {
          t->name = t_[pos_++].text;
        } else {
          return Error("expected a test name after 'is'");
        }
        if (!kTests.contains(t->name)) {
          return SyntaxError(line_, absl::StrCat("unsupported test '", t->name, "'"));
        }
        t->args = {e};
        if (Accept("(")) {
          RETURN_IF_ERROR(ParseArgs(t.get()));
        } else if (Peek().kind == Tok::kString || Peek().kind == Tok::kInt ||
                   Peek().kind == Tok::kFloat ||
                   (Peek().kind == Tok::kName && !IsName("and") && !IsName("or") && !IsName("if") &&
                    !IsName("else") && !IsName("in") && !IsName("not"))) {
          // `x is sameas y`, `n is divisibleby 3`: one argument without parentheses.
          ASSIGN_OR_RETURN(ExprP arg, ParsePrimary());
          ASSIGN_OR_RETURN(arg, ParsePostfix(arg));
          t->args.push_back(arg);
        }
        e = t;
      } else {
        return e;
      }
    }
  }
  absl::StatusOr<ExprP> ParsePrimary() {
    const Token& t = Peek();
    switch (t.kind) {
      case Tok::kInt: {
        ExprP e = Make(Expr::Kind::kLiteral);
        e->literal = Value(t.i);
        ++pos_;
        return e;
      }
      case Tok::kFloat: {
        ExprP e = Make(Expr::Kind::kLiteral);
        e->literal = Value(t.f);
        ++pos_;
        return e;
      }
      case Tok::kString: {
        std::string s;
        while (Peek().kind == Tok::kString) s += t_[pos_++].text;  // adjacent literals join
        ExprP e = Make(Expr::Kind::kLiteral);
        e->literal = Value(std::move(s));
        return e;
      }
      case Tok::kName: {
        const std::string n = t_[pos_++].text;
        ExprP e = Make(Expr::Kind::kLiteral);
        if (n == "true" || n == "True") {
          e->literal = Value(true);
        } else if (n == "false" || n == "False") {
          e->literal = Value(false);
        } else if (n == "none" || n == "None") {
          e->literal = Value::None();
        } else {
          e->kind = Expr::Kind::kName;
          e->name = n;
        }
        return e;
      }
      case Tok::kOp:
        if (Accept("(")) {
          ASSIGN_OR_RETURN(ExprP e, Parse());
          if (Accept(",")) {  // a tuple: a list here
            ExprP l = Make(Expr::Kind::kList);
            l->negate = true;  // a tuple
            l->args.push_back(e);
            while (!Accept(")")) {
              ASSIGN_OR_RETURN(ExprP x, Parse());
              l->args.push_back(x);
              if (!Accept(",")) {
                RETURN_IF_ERROR(Expect(")"));
                break;
              }
            }
            return l;
          }
          RETURN_IF_ERROR(Expect(")"));
          return e;
        }
        if (Accept("[")) {
          ExprP l = Make(Expr::Kind::kList);
          while (!Accept("]")) {
            ASSIGN_OR_RETURN(ExprP x, Parse());
            l->args.push_back(x);
            if (!Accept(",")) {
              RETURN_IF_ERROR(Expect("]"));
              break;
            }
          }
          return l;
        }
        if (Accept("{")) {
          ExprP d = Make(Expr::Kind::kDict);
          while (!Accept("}")) {
            ASSIGN_OR_RETURN(ExprP k, Parse());
            RETURN_IF_ERROR(Expect(":"));
            ASSIGN_OR_RETURN(ExprP v, Parse());
            d->args.push_back(k);
            d->args.push_back(v);
            if (!Accept(",")) {
              RETURN_IF_ERROR(Expect("}"));
              break;
            }
          }
          return d;
        }
        break;
      case Tok::kEnd:
        break;
    }
    return Error("expected an expression");
  }

  // Counts the recursion of the parse, so that a hostile template fails instead of overflowing
  // the stack.
  struct Nest {
    explicit Nest(ExprParser* p) : p(p) { ++p->depth_; }
    ~Nest() { --p->depth_; }
    ExprParser* p;
  };

  std::vector<Token> t_;
  size_t pos_ = 0;
  int line_;
  int depth_ = 0;
};

// The template's pieces after whitespace control: text, {{ expressions }} and {% statements %}.
struct Piece {
  enum class Kind { kText, kVar, kBlock };
  Kind kind;
  std::string text;  // the text, or the tag's inside
  int line;
};

// Line numbers of increasing positions without rescanning the source from its start.
class LineCounter {
 public:
  explicit LineCounter(absl::string_view src) : src_(src) {}
  int At(size_t pos) {
    if (pos < pos_) {  // not expected (positions only grow), but stay right
      pos_ = 0;
      line_ = 1;
    }
    line_ += static_cast<int>(std::count(src_.begin() + pos_, src_.begin() + pos, '\n'));
    pos_ = pos;
    return line_;
  }

 private:
  absl::string_view src_;
  size_t pos_ = 0;
  int line_ = 1;
};

// Where a tag whose inside starts at `from` closes: the index of `close`, skipping quoted text
// and braces the tag opens itself (`{{ {'a': {'b': 1}}.a }}`); npos if it does not.
size_t FindClose(absl::string_view src, size_t from, absl::string_view close) {
  char quote = 0;
  int depth = 0;
  for (size_t i = from; i < src.size(); ++i) {
    const char c = src[i];
    if (quote != 0) {
      if (c == '\\') {
        ++i;
      } else if (c == quote) {
        quote = 0;
      }
    } else if (c == '\'' || c == '"') {
      quote = c;
    } else if (depth == 0 && src.substr(i, close.size()) == close) {
      return i;
    } else if (c == '{') {
      ++depth;
    } else if (c == '}' && depth > 0) {
      --depth;
    }
  }
  return absl::string_view::npos;
}

// The next "{{", "{%" or "{#" from `from`, or npos.
size_t FindOpen(absl::string_view src, size_t from) {
  for (size_t k = src.find('{', from); k != absl::string_view::npos; k = src.find('{', k + 1)) {
    if (k + 1 < src.size() && (src[k + 1] == '{' || src[k + 1] == '%' || src[k + 1] == '#')) {
      return k;
    }
  }
  return absl::string_view::npos;
}

void StripLeft(absl::string_view* s) {
  while (!s->empty() && absl::ascii_isspace(static_cast<unsigned char>(s->front()))) {
    s->remove_prefix(1);
  }
}
void StripRight(absl::string_view* s) {
  while (!s->empty() && absl::ascii_isspace(static_cast<unsigned char>(s->back()))) {
    s->remove_suffix(1);
  }
}

// Splits the source into pieces, applying whitespace control as transformers' environment does:
// trim_blocks (the newline after a block or comment tag goes), lstrip_blocks (spaces and tabs
// from a line's start to a block or comment tag go, unless it opens with '+'), and '-' inside a
// tag's delimiters (all whitespace on that side goes).
absl::StatusOr<std::vector<Piece>> Split(absl::string_view src) {
  std::vector<Piece> out;
  LineCounter lines(src);
  bool strip_next = false;    // the tag before ended with '-'
  bool trim_newline = false;  // the tag before was a block or comment (trim_blocks)
  size_t i = 0;
  auto emit = [&](absl::string_view text, int line) {
    if (!text.empty()) out.push_back({Piece::Kind::kText, std::string(text), line});
  };
  while (true) {
    const size_t open = FindOpen(src, i);
    const int text_line = lines.At(i);
    absl::string_view chunk =
        src.substr(i, (open == absl::string_view::npos ? src.size() : open) - i);
    if (strip_next) {
      StripLeft(&chunk);
    } else if (trim_newline && absl::StartsWith(chunk, "\n")) {  // Parse made every \r a \n
      chunk.remove_prefix(1);
    }
    if (open == absl::string_view::npos) {
      emit(chunk, text_line);
      break;
    }
    const char kind = src[open + 1];
    const bool block = kind == '%' || kind == '#';
    size_t inner = open + 2;
    const bool minus_left = inner < src.size() && src[inner] == '-';
    const bool plus_left = inner < src.size() && src[inner] == '+';
    if (minus_left || plus_left) ++inner;
    const int line = lines.At(open);
    if (minus_left) {
      StripRight(&chunk);
    } else if (block && !plus_left) {
      size_t k = open;
      while (k > i && (src[k - 1] == ' ' || src[k - 1] == '\t')) --k;
      if (k == 0 || src[k - 1] == '\n') chunk.remove_suffix(std::min(open - k, chunk.size()));
    }
    emit(chunk, text_line);
    const absl::string_view close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    const size_t end = kind == '#' ? src.find("#}", inner) : FindClose(src, inner, close);
    if (end == absl::string_view::npos) {
      return SyntaxError(line, absl::StrCat("tag not closed (", close, ")"));
    }
    const bool minus_right = end > inner && src[end - 1] == '-';
    const bool plus_right = end > inner && src[end - 1] == '+' && block;
    absl::string_view body = src.substr(inner, end - inner - (minus_right || plus_right ? 1 : 0));
    i = end + 2;
    strip_next = minus_right;
    trim_newline = block && !plus_right;
    if (kind == '#') continue;
    if (kind == '{') {
      out.push_back({Piece::Kind::kVar, std::string(body), line});
      continue;
    }
    const std::string stmt(absl::StripAsciiWhitespace(body));
    if (stmt != "raw") {
      out.push_back({Piece::Kind::kBlock, stmt, line});
      continue;
    }
    // {% raw %}: verbatim up to {% endraw %}.
    size_t k = i;
    while (true) {
      const size_t t = src.find("{%", k);
      if (t == absl::string_view::npos) return SyntaxError(line, "raw not closed");
      size_t b = t + 2;
      const bool rm_left = b < src.size() && src[b] == '-';
      if (rm_left || (b < src.size() && src[b] == '+')) ++b;
      const size_t e = src.find("%}", b);
      if (e == absl::string_view::npos) return SyntaxError(line, "raw not closed");
      absl::string_view inside = src.substr(b, e - b);
      const bool rm_right = !inside.empty() && inside.back() == '-';
      if (rm_right) inside.remove_suffix(1);
      if (absl::StripAsciiWhitespace(inside) != "endraw") {
        k = e + 2;
        continue;
      }
      absl::string_view raw = src.substr(i, t - i);
      if (strip_next) {
        StripLeft(&raw);
      } else if (absl::StartsWith(raw, "\n")) {
        raw.remove_prefix(1);
      }
      if (rm_left) StripRight(&raw);
      emit(raw, line);
      i = e + 2;
      strip_next = rm_right;
      trim_newline = true;
      break;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Statements

class StmtParser {
 public:
  explicit StmtParser(std::vector<Piece> pieces) : p_(std::move(pieces)) {}

  absl::StatusOr<NodeP> ParseAll() {
    std::string end;
    ASSIGN_OR_RETURN(NodeP body, ParseBody({}, &end));
    if (pos_ < p_.size()) return SyntaxError(p_[pos_].line, absl::StrCat("unexpected ", end));
    return body;
  }

 private:
  static std::string FirstWord(const std::string& stmt) {
    size_t k = 0;
    while (k < stmt.size() &&
           (absl::ascii_isalnum(static_cast<unsigned char>(stmt[k])) || stmt[k] == '_')) {
      ++k;
    }
    return stmt.substr(0, k);
  }

  static absl::StatusOr<ExprParser> Tokens(const Piece& piece, size_t skip) {
    ASSIGN_OR_RETURN(std::vector<Token> toks,
                     Tokenize(absl::string_view(piece.text).substr(skip), piece.line));
    return ExprParser(std::move(toks), piece.line);
  }

  // Nodes up to a block whose first word is one of `ends` (left at p_[pos_], its word in *end),
  // or the end of the template (`ends` empty only).
  absl::StatusOr<NodeP> ParseBody(const std::vector<std::string>& ends, std::string* end) {
    if (pos_ < p_.size() && nesting_ > kMaxNesting) {
      return SyntaxError(p_[pos_].line, "statements nested too deep");
    }
    ++nesting_;
    absl::StatusOr<NodeP> body = ParseBodyIn(ends, end);
    --nesting_;
    return body;
  }
  absl::StatusOr<NodeP> ParseBodyIn(const std::vector<std::string>& ends, std::string* end) {
    auto body = std::make_shared<Node>();
    while (pos_ < p_.size()) {
      const Piece& piece = p_[pos_];
      if (piece.kind == Piece::Kind::kText) {
        auto n = std::make_shared<Node>();
        n->kind = Node::Kind::kText;
        n->text = piece.text;
        body->children.push_back(n);
        ++pos_;
        continue;
      }
      if (piece.kind == Piece::Kind::kVar) {
        ASSIGN_OR_RETURN(ExprParser ep, Tokens(piece, 0));
        auto n = std::make_shared<Node>();
        n->kind = Node::Kind::kOutput;
        n->line = piece.line;
        ASSIGN_OR_RETURN(n->expr, ep.Parse());
        RETURN_IF_ERROR(ep.ExpectEnd());
        body->children.push_back(n);
        ++pos_;
        continue;
      }
      const std::string word = FirstWord(piece.text);
      if (std::find(ends.begin(), ends.end(), word) != ends.end()) {
        *end = word;
        return body;
      }
      ASSIGN_OR_RETURN(NodeP n, ParseStatement(word));
      if (n != nullptr) body->children.push_back(n);
    }
    if (!ends.empty()) {
      return SyntaxError(p_.empty() ? 1 : p_.back().line,
                         absl::StrCat("missing {% ", ends.back(), " %}"));
    }
    return body;
  }

  absl::StatusOr<NodeP> ParseStatement(const std::string& word) {
    const Piece& piece = p_[pos_];
    const int line = piece.line;
    auto n = std::make_shared<Node>();
    n->line = line;
    if (word == "if") {
      n->kind = Node::Kind::kIf;
      size_t skip = 2;
      while (true) {
        ASSIGN_OR_RETURN(ExprParser ep, Tokens(p_[pos_], skip));
        ASSIGN_OR_RETURN(ExprP cond, ep.Parse());
        RETURN_IF_ERROR(ep.ExpectEnd());
        ++pos_;
        std::string end;
        ASSIGN_OR_RETURN(NodeP body, ParseBody({"elif", "else", "endif"}, &end));
        n->branches.emplace_back(cond, body);
        if (end == "elif") {
          skip = 4;
          continue;
        }
        if (end == "else") {
          ++pos_;
          ASSIGN_OR_RETURN(n->else_body, ParseBody({"endif"}, &end));
        }
        ++pos_;  // endif
        return n;
      }
    }
    if (word == "for") {
      n->kind = Node::Kind::kFor;
      ASSIGN_OR_RETURN(ExprParser ep, Tokens(piece, 3));
      const bool paren = ep.Accept("(");
      do {
        ASSIGN_OR_RETURN(std::string t, ep.ExpectName());
        n->targets.push_back(t);
      } while (ep.Accept(","));
      if (paren) RETURN_IF_ERROR(ep.Expect(")"));
      if (!ep.AcceptName("in")) return ep.Error("expected 'in'");
      ASSIGN_OR_RETURN(n->expr, ep.ParseOr());
      if (ep.AcceptName("if")) {
        ASSIGN_OR_RETURN(n->filter, ep.Parse());
      }
      if (ep.AcceptName("recursive")) return SyntaxError(line, "recursive loops are not supported");
      RETURN_IF_ERROR(ep.ExpectEnd());
      ++pos_;
      std::string end;
      ++loops_;
      absl::StatusOr<NodeP> parsed = ParseBody({"else", "endfor"}, &end);
      --loops_;
      ASSIGN_OR_RETURN(NodeP body, std::move(parsed));
      n->children = {body};
      if (end == "else") {
        ++pos_;
        ASSIGN_OR_RETURN(n->else_body, ParseBody({"endfor"}, &end));
      }
      ++pos_;
      return n;
    }
    if (word == "set") {
      ASSIGN_OR_RETURN(ExprParser ep, Tokens(piece, 3));
      ASSIGN_OR_RETURN(std::string name, ep.ExpectName());
      n->targets.push_back(name);
      if (ep.Accept(".")) {
        ASSIGN_OR_RETURN(std::string attr, ep.ExpectName());
        n->targets.push_back(attr);
      }
      if (ep.Accept("=")) {
        n->kind = Node::Kind::kSet;
        ASSIGN_OR_RETURN(n->expr, ep.Parse());
        RETURN_IF_ERROR(ep.ExpectEnd());
        ++pos_;
        return n;
      }
      RETURN_IF_ERROR(ep.ExpectEnd());
      n->kind = Node::Kind::kSetBlock;
      ++pos_;
      std::string end;
      ASSIGN_OR_RETURN(NodeP body, ParseBody({"endset"}, &end));
      n->children = {body};
      ++pos_;
      return n;
    }
    if (word == "macro") {
      n->kind = Node::Kind::kMacro;
      ASSIGN_OR_RETURN(ExprParser ep, Tokens(piece, 5));
      ASSIGN_OR_RETURN(std::string name, ep.ExpectName());
      n->targets.push_back(name);
      RETURN_IF_ERROR(ep.Expect("("));
      while (!ep.Accept(")")) {
        ASSIGN_OR_RETURN(std::string param, ep.ExpectName());
        ExprP def;
        if (ep.Accept("=")) {
          ASSIGN_OR_RETURN(def, ep.Parse());
        }
        n->params.emplace_back(param, def);
        if (!ep.Accept(",")) {
          RETURN_IF_ERROR(ep.Expect(")"));
          break;
        }
      }
      RETURN_IF_ERROR(ep.ExpectEnd());
      ++pos_;
      std::string end;
      const int loops = loops_;
      loops_ = 0;  // a macro's body is outside any loop
      absl::StatusOr<NodeP> parsed = ParseBody({"endmacro"}, &end);
      loops_ = loops;
      ASSIGN_OR_RETURN(NodeP body, std::move(parsed));
      n->children = {body};
      ++pos_;
      return n;
    }
    if (word == "break" || word == "continue") {
      if (loops_ == 0) return SyntaxError(line, absl::StrCat("{% ", word, " %} outside a loop"));
      n->kind = word == "break" ? Node::Kind::kBreak : Node::Kind::kContinue;
      ++pos_;
      return n;
    }
    if (word == "generation") {
      // transformers' assistant-mask marker: the body renders as is.
      ++pos_;
      std::string end;
      ASSIGN_OR_RETURN(NodeP body, ParseBody({"endgeneration"}, &end));
      ++pos_;
      return body;
    }
    for (const char* end :
         {"elif", "else", "endif", "endfor", "endset", "endmacro", "endgeneration", "endraw"}) {
      if (word == end) return SyntaxError(line, absl::StrCat("unexpected {% ", word, " %}"));
    }
    return SyntaxError(line, absl::StrCat("unsupported statement {% ", word, " %}"));
  }

  std::vector<Piece> p_;
  size_t pos_ = 0;
  int nesting_ = 0;  // bodies being parsed, one inside another
  int loops_ = 0;    // for loops around the statement being parsed
};

// ---------------------------------------------------------------------------------------------
// Evaluation

enum class Flow { kNormal, kBreak, kContinue };

// Bounds on what a template may build, so that a runaway one fails instead of exhausting the
// coordinator: items of range() and of a repeated string or list, and macro calls in flight.
constexpr int64_t kMaxItems = int64_t{1} << 20;
constexpr int kMaxMacroDepth = 16;
// And on the work a render may do: evaluation steps, and the bytes of its output or of a string
// it builds.
constexpr int64_t kMaxSteps = 5'000'000;
constexpr size_t kMaxBytes = size_t{64} << 20;

absl::Status EvalError(int line, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("chat template line ", line, ": ", what));
}

const char* KindName(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kUndefined:
      return "undefined";
    case Value::Kind::kNone:
      return "none";
    case Value::Kind::kBool:
      return "a boolean";
    case Value::Kind::kInt:
      return "an integer";
    case Value::Kind::kFloat:
      return "a float";
    case Value::Kind::kString:
      return "a string";
    case Value::Kind::kList:
      return "a list";
    case Value::Kind::kDict:
      return "a dict";
    case Value::Kind::kFunction:
      return "a function";
  }
  return "?";
}

// UTF-8 code points of `s` (a byte that starts no sequence stands alone).
// The number of UTF-8 code points of `s` (a byte that starts none counts as one), and the byte
// offset where code point k starts (s.size() past the last): without a string per character.
size_t CountCodePoints(absl::string_view s) {
  size_t n = 0;
  for (size_t i = 0; i < s.size(); ++n) {
    i += std::max<size_t>(1, ValidUtf8SequenceLength(s.substr(i)));
  }
  return n;
}
size_t CodePointOffset(absl::string_view s, size_t k) {
  size_t i = 0;
  for (; k > 0 && i < s.size(); --k) i += std::max<size_t>(1, ValidUtf8SequenceLength(s.substr(i)));
  return std::min(i, s.size());
}

std::vector<std::string> CodePoints(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    const size_t n = std::max<size_t>(1, ValidUtf8SequenceLength(absl::string_view(s).substr(i)));
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

std::string Capitalize(const std::string& s) {
  std::string out = absl::AsciiStrToLower(s);
  if (!out.empty()) out[0] = absl::ascii_toupper(out[0]);
  return out;
}

std::string Title(const std::string& s) {
  std::string out = s;
  bool prev_letter = false;
  for (char& c : out) {
    const bool letter = absl::ascii_isalpha(static_cast<unsigned char>(c));
    if (letter) c = prev_letter ? absl::ascii_tolower(c) : absl::ascii_toupper(c);
    prev_letter = letter;
  }
  return out;
}

std::string StripChars(const std::string& s, const Value& chars, bool left, bool right) {
  auto strip = [&](char c) {
    return chars.IsString() ? chars.s().find(c) != std::string::npos
                            : absl::ascii_isspace(static_cast<unsigned char>(c));
  };
  size_t b = 0, e = s.size();
  if (left) {
    while (b < e && strip(s[b])) ++b;
  }
  if (right) {
    while (e > b && strip(s[e - 1])) --e;
  }
  return s.substr(b, e - b);
}

// json.dumps's options as transformers' tojson passes them.
struct JsonOptions {
  std::optional<int64_t> indent;
  std::string item_sep = ", ", key_sep = ": ";
  bool sort_keys = false;
  bool ensure_ascii = false;
};

// The code point of the UTF-8 sequence at s[*i] (advancing *i past it); U+FFFD for a byte that
// starts none.
char32_t NextCodePoint(const std::string& s, size_t* i) {
  char32_t cp = 0xFFFD;
  const size_t n = DecodeUtf8(absl::string_view(s).substr(*i), &cp);
  *i += n > 0 ? n : 1;
  return n > 0 ? cp : 0xFFFD;
}

// As Python's json.dumps writes a string.
std::string JsonString(const std::string& s, bool ensure_ascii) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size();) {
    const uint32_t cp = NextCodePoint(s, &i);
    switch (cp) {
      case '"':
        out += "\\\"";
        continue;
      case '\\':
        out += "\\\\";
        continue;
      case '\n':
        out += "\\n";
        continue;
      case '\r':
        out += "\\r";
        continue;
      case '\t':
        out += "\\t";
        continue;
      case '\b':
        out += "\\b";
        continue;
      case '\f':
        out += "\\f";
        continue;
      default:
        break;
    }
    if (cp < 0x20 || (ensure_ascii && cp > 0x7E)) {
      if (cp >= 0x10000) {
        const uint32_t v = cp - 0x10000;
        out += absl::StrFormat("\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
      } else {
        out += absl::StrFormat("\\u%04x", cp);
      }
    } else {
      AppendUtf8(cp, &out);
    }
  }
  out += '"';
  return out;
}

absl::Status ToJson(const Value& v, const JsonOptions& o, int depth, std::string* out) {
  if (depth > kMaxDepth) {
    return absl::InvalidArgumentError(
        absl::StrCat("chat template: tojson of a value nested over ", kMaxDepth, " deep"));
  }
  const std::string nl = o.indent.has_value()
                             ? "\n" + std::string(static_cast<size_t>(*o.indent * (depth + 1)), ' ')
                             : "";
  const std::string nl_end =
      o.indent.has_value() ? "\n" + std::string(static_cast<size_t>(*o.indent * depth), ' ') : "";
  switch (v.kind()) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
    case Value::Kind::kFunction:
      *out += "null";
      return absl::OkStatus();
    case Value::Kind::kBool:
      *out += v.b() ? "true" : "false";
      return absl::OkStatus();
    case Value::Kind::kInt:
      *out += v.Repr();
      return absl::OkStatus();
    case Value::Kind::kFloat:
      *out += std::isnan(v.f())   ? "NaN"
              : std::isinf(v.f()) ? (v.f() > 0 ? "Infinity" : "-Infinity")
                                  : v.Repr();
      return absl::OkStatus();
    case Value::Kind::kString:
      *out += JsonString(v.s(), o.ensure_ascii);
      return absl::OkStatus();
    case Value::Kind::kList: {
      if (v.list().empty()) {
        *out += "[]";
        return absl::OkStatus();
      }
      *out += "[";
      for (size_t k = 0; k < v.list().size(); ++k) {
        if (k > 0) *out += o.item_sep;
        *out += nl;
        RETURN_IF_ERROR(ToJson(v.list()[k], o, depth + 1, out));
      }
      *out += nl_end + "]";
      return absl::OkStatus();
    }
    case Value::Kind::kDict: {
      if (v.dict().empty()) {
        *out += "{}";
        return absl::OkStatus();
      }
      std::vector<const std::pair<std::string, Value>*> entries;
      for (const auto& e : v.dict()) entries.push_back(&e);
      if (o.sort_keys) {
        std::stable_sort(entries.begin(), entries.end(),
                         [](const auto* a, const auto* b) { return a->first < b->first; });
      }
      *out += "{";
      bool first = true;
      for (const auto* e : entries) {
        if (!first) *out += o.item_sep;
        first = false;
        *out += nl + JsonString(e->first, o.ensure_ascii) + o.key_sep;
        RETURN_IF_ERROR(ToJson(e->second, o, depth + 1, out));
      }
      *out += nl_end + "}";
      return absl::OkStatus();
    }
  }
  return absl::OkStatus();
}

// Python's a[b:c:d] over n elements: the indices taken.
std::vector<int64_t> SliceIndices(int64_t n, const Value& start, const Value& stop,
                                  const Value& step_v) {
  const int64_t step = step_v.kind() == Value::Kind::kInt ? step_v.i() : 1;
  std::vector<int64_t> out;
  if (step == 0) return out;
  auto norm = [&](const Value& v, int64_t def) {
    if (v.kind() != Value::Kind::kInt) return def;
    int64_t x = v.i();
    if (x < 0) x += n;
    if (step > 0) return std::clamp<int64_t>(x, 0, n);
    return std::clamp<int64_t>(x, -1, n - 1);
  };
  if (step > 0) {
    const int64_t b = norm(start, 0), e = norm(stop, n);
    for (int64_t k = b; k < e; k += step) out.push_back(k);
  } else {
    const int64_t b = norm(start, n - 1), e = norm(stop, -1);
    for (int64_t k = b; k > e; k += step) out.push_back(k);
  }
  return out;
}

class Renderer {
 public:
  explicit Renderer(const Value& context) {
    frames_.emplace_back();
    auto& g = frames_.back();
    g["range"] = Value::Fn([](const Args& a, const Kwargs&) -> absl::StatusOr<Value> {
      int64_t b = 0, e = 0, st = 1;
      for (const Value& v : a) {
        if (v.kind() != Value::Kind::kInt)
          return absl::InvalidArgumentError("range() takes integers");
      }
      if (a.size() == 1) {
        e = a[0].i();
      } else if (a.size() >= 2) {
        b = a[0].i();
        e = a[1].i();
        if (a.size() > 2) st = a[2].i();
      }
      if (st == 0) return absl::InvalidArgumentError("range() step must not be zero");
      // In unsigned arithmetic: e - b can overflow int64.
      const uint64_t span = st > 0 ? (e > b ? uint64_t(e) - uint64_t(b) : 0)
                                   : (b > e ? uint64_t(b) - uint64_t(e) : 0);
      const uint64_t ust = st > 0 ? uint64_t(st) : 0 - uint64_t(st);
      const uint64_t un = span / ust + (span % ust != 0);
      const int64_t n = un > uint64_t(kMaxItems) ? kMaxItems + 1 : int64_t(un);
      if (n > kMaxItems) {
        return absl::InvalidArgumentError(
            absl::StrCat("range() of ", n, " items (at most ", kMaxItems, ")"));
      }
      List l;
      for (int64_t k = 0; k < n; ++k) l.push_back(Value(b + k * st));
      return Value(std::move(l));
    });
    g["namespace"] = Value::Fn([](const Args& a, const Kwargs& kw) -> absl::StatusOr<Value> {
      Dict d;
      if (!a.empty() && a[0].IsDict()) d = a[0].dict();
      for (const auto& [k, v] : kw) d.emplace_back(k, v);
      return Value(std::move(d));
    });
    g["dict"] = g["namespace"];
    g["raise_exception"] = Value::Fn([](const Args& a, const Kwargs&) -> absl::StatusOr<Value> {
      return absl::InvalidArgumentError(
          absl::StrCat("chat template: ", a.empty() ? "raise_exception()" : a[0].Str()));
    });
    g["strftime_now"] = Value::Fn([](const Args& a, const Kwargs&) -> absl::StatusOr<Value> {
      const std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[256];
      const std::string fmt = a.empty() ? "%Y-%m-%d" : a[0].Str();
      const size_t n = std::strftime(buf, sizeof(buf), fmt.c_str(), &tm);
      return Value(std::string(buf, n));
    });
    if (context.IsDict()) {
      for (const auto& [k, v] : context.dict()) g[k] = v;
    }
  }

  absl::Status Exec(const Node& n, std::string* out, Flow* flow) {
    if (++steps_ > kMaxSteps) return EvalError(n.line, "the template takes too many steps");
    if (out->size() > kMaxBytes) return EvalError(n.line, "the template's output is too long");
    switch (n.kind) {
      case Node::Kind::kBody:
        for (const NodeP& c : n.children) {
          RETURN_IF_ERROR(Exec(*c, out, flow));
          if (*flow != Flow::kNormal) return absl::OkStatus();
        }
        return absl::OkStatus();
      case Node::Kind::kText:
        *out += n.text;
        return absl::OkStatus();
      case Node::Kind::kOutput: {
        ASSIGN_OR_RETURN(Value v, Eval(*n.expr));
        *out += v.Str();
        return absl::OkStatus();
      }
      case Node::Kind::kIf:
        for (const auto& [cond, body] : n.branches) {
          ASSIGN_OR_RETURN(Value c, Eval(*cond));
          if (c.Truthy()) return Exec(*body, out, flow);
        }
        if (n.else_body != nullptr) return Exec(*n.else_body, out, flow);
        return absl::OkStatus();
      case Node::Kind::kFor:
        return ExecFor(n, out, flow);
      case Node::Kind::kSet: {
        ASSIGN_OR_RETURN(Value v, Eval(*n.expr));
        return Assign(n, std::move(v));
      }
      case Node::Kind::kSetBlock: {
        std::string text;
        Flow f = Flow::kNormal;
        RETURN_IF_ERROR(Exec(*n.children[0], &text, &f));
        return Assign(n, Value(std::move(text)));
      }
      case Node::Kind::kMacro:
        frames_.back()[n.targets[0]] = MakeMacro(n);
        return absl::OkStatus();
      case Node::Kind::kBreak:
        *flow = Flow::kBreak;
        return absl::OkStatus();
      case Node::Kind::kContinue:
        *flow = Flow::kContinue;
        return absl::OkStatus();
    }
    return absl::OkStatus();
  }

 private:
  absl::Status Assign(const Node& n, Value v) {
    if (n.targets.size() == 1) {
      frames_.back()[n.targets[0]] = std::move(v);
      return absl::OkStatus();
    }
    const Value ns = Lookup(n.targets[0]);
    if (!ns.IsDict()) {
      return EvalError(n.line, absl::StrCat("cannot set an attribute of ", KindName(ns), " (",
                                            n.targets[0], ")"));
    }
    // Namespaces are the only values a template changes, so refusing to put one inside itself
    // keeps every value acyclic (shared_ptr cycles would leak, and printing would not end).
    if (Reaches(v, &ns.dict(), 0)) {
      return EvalError(n.line, absl::StrCat("a namespace cannot hold itself (", n.targets[0], ".",
                                            n.targets[1], ")"));
    }
    ns.Set(n.targets[1], std::move(v));
    return absl::OkStatus();
  }

  // Whether `v` is or holds the dict at `target`.
  static bool Reaches(const Value& v, const Dict* target, int depth) {
    if (depth > kMaxDepth) return true;  // too deep to tell: refuse
    if (v.IsDict()) {
      if (&v.dict() == target) return true;
      for (const auto& [k, x] : v.dict()) {
        if (Reaches(x, target, depth + 1)) return true;
      }
    } else if (v.IsList()) {
      for (const Value& x : v.list()) {
        if (Reaches(x, target, depth + 1)) return true;
      }
    }
    return false;
  }

  Value Lookup(const std::string& name) const {
    for (auto f = frames_.rbegin(); f != frames_.rend(); ++f) {
      auto it = f->find(name);
      if (it != f->end()) return it->second;
    }
    return Value();
  }

  Value MakeMacro(const Node& n) {
    const Node* node = &n;
    return Value::Fn([this, node](const Args& a, const Kwargs& kw) -> absl::StatusOr<Value> {
      if (macro_depth_ >= kMaxMacroDepth) {
        return EvalError(node->line, absl::StrCat("macros nested over ", kMaxMacroDepth, " deep"));
      }
      std::map<std::string, Value> locals;
      for (size_t k = 0; k < node->params.size(); ++k) {
        const auto& [name, def] = node->params[k];
        Value v;
        if (k < a.size()) {
          v = a[k];
        } else if (def != nullptr) {
          ASSIGN_OR_RETURN(v, Eval(*def));
        }
        for (const auto& [key, kv] : kw) {
          if (key == name) v = kv;
        }
        locals[name] = v;
      }
      std::vector<std::map<std::string, Value>> saved = {frames_.front(), std::move(locals)};
      std::swap(saved, frames_);
      std::string text;
      Flow f = Flow::kNormal;
      ++macro_depth_;
      absl::Status s = Exec(*node->children[0], &text, &f);
      --macro_depth_;
      std::swap(saved, frames_);
      RETURN_IF_ERROR(s);
      return Value(std::move(text));
    });
  }

  absl::Status ExecFor(const Node& n, std::string* out, Flow* flow) {
    ASSIGN_OR_RETURN(Value it, Eval(*n.expr));
    List items;
    if (it.IsList()) {
      items = it.list();
    } else if (it.IsDict()) {
      for (const auto& [k, v] : it.dict()) items.push_back(Value(k));
    } else if (it.IsString()) {
      if (CountCodePoints(it.s()) > static_cast<size_t>(kMaxItems)) {
        return EvalError(n.line, absl::StrCat("a loop over more than ", kMaxItems, " characters"));
      }
      for (std::string& c : CodePoints(it.s())) items.push_back(Value(std::move(c)));
    } else if (!it.IsUndefined()) {
      return EvalError(n.line, absl::StrCat("cannot loop over ", KindName(it)));
    }
    frames_.emplace_back();
    auto bind = [&](const Value& item) -> absl::Status {
      auto& f = frames_.back();
      if (n.targets.size() == 1) {
        f[n.targets[0]] = item;
        return absl::OkStatus();
      }
      if (!item.IsList() || item.list().size() != n.targets.size()) {
        return EvalError(n.line, absl::StrCat("cannot unpack ", item.Repr(), " into ",
                                              n.targets.size(), " names"));
      }
      for (size_t k = 0; k < n.targets.size(); ++k) f[n.targets[k]] = item.list()[k];
      return absl::OkStatus();
    };
    absl::Status status;
    if (n.filter != nullptr) {
      List kept;
      for (const Value& item : items) {
        status = bind(item);
        if (!status.ok()) break;
        absl::StatusOr<Value> keep = Eval(*n.filter);
        if (!keep.ok()) {
          status = keep.status();
          break;
        }
        if (keep->Truthy()) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const int64_t len = static_cast<int64_t>(items.size());
    for (int64_t k = 0; status.ok() && k < len; ++k) {
      frames_.back().clear();  // each iteration starts a fresh scope, as in jinja2
      status = bind(items[k]);
      if (!status.ok()) break;
      frames_.back()["loop"] = Value(Dict{
          {"index", Value(k + 1)},
          {"index0", Value(k)},
          {"revindex", Value(len - k)},
          {"revindex0", Value(len - k - 1)},
          {"first", Value(k == 0)},
          {"last", Value(k == len - 1)},
          {"length", Value(len)},
          {"previtem", k > 0 ? items[k - 1] : Value()},
          {"nextitem", k + 1 < len ? items[k + 1] : Value()},
          {"cycle", Value::Fn([k](const Args& c, const Kwargs&) -> absl::StatusOr<Value> {
             if (c.empty()) return absl::InvalidArgumentError("loop.cycle() needs an argument");
             return c[static_cast<size_t>(k) % c.size()];
           })},
      });
      Flow f = Flow::kNormal;
      status = Exec(*n.children[0], out, &f);
      if (f == Flow::kBreak) break;
    }
    frames_.pop_back();
    RETURN_IF_ERROR(status);
    if (len == 0 && n.else_body != nullptr) {
      frames_.emplace_back();  // its sets stay inside, as the loop body's do
      absl::Status s = Exec(*n.else_body, out, flow);
      frames_.pop_back();
      return s;
    }
    return absl::OkStatus();
  }

  absl::Status EvalArgs(const Expr& e, size_t first, Args* args, Kwargs* kwargs) {
    for (size_t k = first; k < e.args.size(); ++k) {
      ASSIGN_OR_RETURN(Value v, Eval(*e.args[k]));
      args->push_back(std::move(v));
    }
    for (const auto& [key, x] : e.kwargs) {
      ASSIGN_OR_RETURN(Value v, Eval(*x));
      kwargs->emplace_back(key, std::move(v));
    }
    return absl::OkStatus();
  }

  static Value Arg(const Args& a, const Kwargs& kw, size_t k, absl::string_view name,
                   Value def = Value()) {
    for (const auto& [key, v] : kw) {
      if (key == name) return v;
    }
    return k < a.size() ? a[k] : def;
  }

  absl::StatusOr<Value> Eval(const Expr& e) {
    if (++steps_ > kMaxSteps) return EvalError(e.line, "the template takes too many steps");
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        return e.literal;
      case Expr::Kind::kName:
        return Lookup(e.name);
      case Expr::Kind::kAttr: {
        ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
        return obj.Get(e.name);
      }
      case Expr::Kind::kItem: {
        ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
        ASSIGN_OR_RETURN(Value key, Eval(*e.args[1]));
        return Item(obj, key);
      }
      case Expr::Kind::kSlice: {
        ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
        Value parts[3];
        for (int k = 0; k < 3; ++k) {
          if (e.args[k + 1] != nullptr) {
            ASSIGN_OR_RETURN(parts[k], Eval(*e.args[k + 1]));
          }
        }
        if (obj.IsList()) {
          List l;
          for (int64_t k : SliceIndices(static_cast<int64_t>(obj.list().size()), parts[0], parts[1],
                                        parts[2])) {
            l.push_back(obj.list()[k]);
          }
          return Value(std::move(l));
        }
        if (obj.IsString()) {
          // Each code point's start, then the end: offsets, not a string per character.
          const std::string& str = obj.s();
          std::vector<size_t> starts;
          for (size_t i = 0; i < str.size();) {
            starts.push_back(i);
            i += std::max<size_t>(1, ValidUtf8SequenceLength(absl::string_view(str).substr(i)));
          }
          starts.push_back(str.size());
          std::string s;
          for (int64_t k : SliceIndices(static_cast<int64_t>(starts.size()) - 1, parts[0], parts[1],
                                        parts[2])) {
            s.append(str, starts[k], starts[k + 1] - starts[k]);
          }
          return Value(std::move(s));
        }
        if (obj.IsUndefined()) return Value();
        return EvalError(e.line, absl::StrCat("cannot slice ", KindName(obj)));
      }
      case Expr::Kind::kCall:
        return Call(e);
      case Expr::Kind::kFilter: {
        ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
        Args a;
        Kwargs kw;
        RETURN_IF_ERROR(EvalArgs(e, 1, &a, &kw));
        return Filter(e, obj, a, kw);
      }
      case Expr::Kind::kTest: {
        ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
        Args a;
        Kwargs kw;
        RETURN_IF_ERROR(EvalArgs(e, 1, &a, &kw));
        ASSIGN_OR_RETURN(bool r, Test(e.line, e.name, obj, a));
        return Value(r != e.negate);
      }
      case Expr::Kind::kNeg: {
        ASSIGN_OR_RETURN(Value x, Eval(*e.args[0]));
        if (x.kind() == Value::Kind::kInt) {
          if (x.i() == INT64_MIN) return EvalError(e.line, "integer overflow");
          return Value(-x.i());
        }
        if (x.kind() == Value::Kind::kFloat) return Value(-x.f());
        return EvalError(e.line, absl::StrCat("cannot negate ", KindName(x)));
      }
      case Expr::Kind::kNot: {
        ASSIGN_OR_RETURN(Value x, Eval(*e.args[0]));
        return Value(!x.Truthy());
      }
      case Expr::Kind::kAnd: {
        ASSIGN_OR_RETURN(Value l, Eval(*e.args[0]));
        if (!l.Truthy()) return l;
        return Eval(*e.args[1]);
      }
      case Expr::Kind::kOr: {
        ASSIGN_OR_RETURN(Value l, Eval(*e.args[0]));
        if (l.Truthy()) return l;
        return Eval(*e.args[1]);
      }
      case Expr::Kind::kCond: {
        ASSIGN_OR_RETURN(Value c, Eval(*e.args[0]));
        return Eval(*e.args[c.Truthy() ? 1 : 2]);
      }
      case Expr::Kind::kList: {
        List l;
        for (const ExprP& x : e.args) {
          ASSIGN_OR_RETURN(Value v, Eval(*x));
          l.push_back(std::move(v));
        }
        return e.negate ? Value::Tuple(std::move(l)) : Value(std::move(l));
      }
      case Expr::Kind::kDict: {
        Dict d;
        Value dv(std::move(d));
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          ASSIGN_OR_RETURN(Value key, Eval(*e.args[k]));
          ASSIGN_OR_RETURN(Value v, Eval(*e.args[k + 1]));
          dv.Set(key.Str(), std::move(v));
        }
        return dv;
      }
      case Expr::Kind::kBinary: {
        ASSIGN_OR_RETURN(Value l, Eval(*e.args[0]));
        ASSIGN_OR_RETURN(Value r, Eval(*e.args[1]));
        return Binary(e.line, e.name, l, r, e.negate);
      }
    }
    return Value();
  }

  absl::StatusOr<Value> Item(const Value& obj, const Value& key) {
    if (obj.IsDict()) return obj.Get(key.Str());
    if ((obj.IsList() || obj.IsString()) && key.kind() == Value::Kind::kInt) {
      if (obj.IsList()) {
        const int64_t n = static_cast<int64_t>(obj.list().size());
        const int64_t k = key.i() < 0 ? key.i() + n : key.i();
        return k >= 0 && k < n ? obj.list()[k] : Value();
      }
      const int64_t n = static_cast<int64_t>(CountCodePoints(obj.s()));
      const int64_t k = key.i() < 0 ? key.i() + n : key.i();
      if (k < 0 || k >= n) return Value();
      const size_t at = CodePointOffset(obj.s(), static_cast<size_t>(k));
      return Value(obj.s().substr(at, CodePointOffset(obj.s(), static_cast<size_t>(k) + 1) - at));
    }
    return Value();
  }

  // l op r for a binary operator ("~", "==", "in", "+", ...), at template line `line`; `negate`
  // makes "in" "not in".
  absl::StatusOr<Value> Binary(int line, const std::string& op, const Value& l, const Value& r,
                               bool negate = false) {
    if (op == "~" || (op == "+" && l.IsString() && r.IsString())) {
      std::string a = l.Str(), b = r.Str();
      if (a.size() + b.size() > kMaxBytes) return EvalError(line, "a string grows too long");
      return Value(a + b);
    }
    if (op == "==") return Value(l == r);
    if (op == "!=") return Value(!(l == r));
    if (op == "in") {
      bool found = false;
      if (r.IsString()) {
        found = absl::StrContains(r.s(), l.Str());
      } else if (r.IsList()) {
        found = std::find(r.list().begin(), r.list().end(), l) != r.list().end();
      } else if (r.IsDict()) {
        found = !r.Get(l.Str()).IsUndefined();
      } else if (!r.IsUndefined()) {
        return EvalError(line,
                         absl::StrCat("'in' needs a string, list or dict, not ", KindName(r)));
      }
      return Value(found != negate);
    }
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      int c = 0;
      if (l.IsNumber() && r.IsNumber()) {
        c = l.f() < r.f() ? -1 : l.f() > r.f() ? 1 : 0;
        if (l.kind() == Value::Kind::kInt && r.kind() == Value::Kind::kInt) {
          c = l.i() < r.i() ? -1 : l.i() > r.i() ? 1 : 0;
        }
      } else if (l.IsString() && r.IsString()) {
        c = l.s().compare(r.s());
      } else {
        return EvalError(line, absl::StrCat("cannot compare ", KindName(l), " with ", KindName(r)));
      }
      return Value(op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0);
    }
    if (op == "+") {
      if (l.IsList() && r.IsList()) {
        List out = l.list();
        out.insert(out.end(), r.list().begin(), r.list().end());
        return Value(std::move(out));
      }
    }
    if (op == "%" && l.IsString()) return Format(line, l.s(), r);
    if (op == "*" && (l.IsString() || l.IsList()) && r.kind() == Value::Kind::kInt) {
      const int64_t size =
          l.IsString() ? static_cast<int64_t>(l.s().size()) : static_cast<int64_t>(l.list().size());
      if (r.i() > 0 && size > 0 && r.i() > kMaxItems / size) {
        return EvalError(line, absl::StrCat("repetition of over ", kMaxItems, " items"));
      }
      if (l.IsString()) {
        std::string out;
        for (int64_t k = 0; k < r.i(); ++k) out += l.s();
        return Value(std::move(out));
      }
      List out;
      for (int64_t k = 0; k < r.i(); ++k) out.insert(out.end(), l.list().begin(), l.list().end());
      return Value(std::move(out));
    }
    auto num = [](const Value& v) { return v.IsNumber() || v.kind() == Value::Kind::kBool; };
    if (!num(l) || !num(r)) {
      return EvalError(
          line, absl::StrCat("cannot apply '", op, "' to ", KindName(l), " and ", KindName(r)));
    }
    auto as_int = [](const Value& v) {
      return v.kind() == Value::Kind::kBool ? int64_t{v.b()} : v.i();
    };
    auto as_f = [&](const Value& v) {
      return v.kind() == Value::Kind::kBool ? double{v.b() ? 1.0 : 0.0} : v.f();
    };
    const bool ints = l.kind() != Value::Kind::kFloat && r.kind() != Value::Kind::kFloat;
    if (op == "**") {
      if (ints && as_int(r) >= 0) {
        int64_t base = as_int(l), v = 1;
        for (int64_t k = as_int(r); k > 0; k >>= 1) {
          if ((k & 1) && __builtin_mul_overflow(v, base, &v)) {
            return EvalError(line, "integer overflow");
          }
          if (k > 1 && __builtin_mul_overflow(base, base, &base)) {
            return EvalError(line, "integer overflow");
          }
        }
        return Value(v);
      }
      return Value(std::pow(as_f(l), as_f(r)));
    }
    if (op == "/") {
      if (as_f(r) == 0) return EvalError(line, "division by zero");
      return Value(as_f(l) / as_f(r));
    }
    if (ints) {
      const int64_t a = as_int(l), b = as_int(r);
      int64_t v = 0;
      if (op == "+" || op == "-" || op == "*") {
        const bool overflow = op == "+"   ? __builtin_add_overflow(a, b, &v)
                              : op == "-" ? __builtin_sub_overflow(a, b, &v)
                                          : __builtin_mul_overflow(a, b, &v);
        if (overflow) return EvalError(line, "integer overflow");
        return Value(v);
      }
      if (b == 0) return EvalError(line, "division by zero");
      if (b == -1 && a == INT64_MIN) return EvalError(line, "integer overflow");
      int64_t q = a / b, m = a % b;
      if (m != 0 && ((m < 0) != (b < 0))) {
        --q;
        m += b;
      }
      if (op == "//") return Value(q);
      if (op == "%") return Value(m);
    } else {
      const double a = as_f(l), b = as_f(r);
      if (op == "+") return Value(a + b);
      if (op == "-") return Value(a - b);
      if (op == "*") return Value(a * b);
      if (b == 0) return EvalError(line, "division by zero");
      if (op == "//") return Value(std::floor(a / b));
      if (op == "%") return Value(a - b * std::floor(a / b));
    }
    return EvalError(line, absl::StrCat("unknown operator ", op));
  }

  absl::StatusOr<Value> Call(const Expr& e) {
    const Expr& callee = *e.args[0];
    Args a;
    Kwargs kw;
    RETURN_IF_ERROR(EvalArgs(e, 1, &a, &kw));
    if (callee.kind == Expr::Kind::kAttr) {
      ASSIGN_OR_RETURN(Value obj, Eval(*callee.args[0]));
      if (obj.IsString() || obj.IsDict() || obj.IsList()) {
        std::optional<Value> r;
        ASSIGN_OR_RETURN(r, Method(e.line, obj, callee.name, a, kw));
        if (r.has_value()) return *r;
      }
      const Value f = obj.Get(callee.name);
      if (f.kind() == Value::Kind::kFunction) return f.fn()(a, kw);
      return EvalError(e.line, absl::StrCat(KindName(obj), " has no method ", callee.name));
    }
    ASSIGN_OR_RETURN(Value f, Eval(callee));
    if (f.kind() != Value::Kind::kFunction) {
      return EvalError(e.line, absl::StrCat(callee.kind == Expr::Kind::kName ? callee.name : "it",
                                            " is ", KindName(f), ", not a function"));
    }
    absl::StatusOr<Value> r = f.fn()(a, kw);
    if (!r.ok() && !absl::StartsWith(r.status().message(), "chat template")) {
      return EvalError(e.line, r.status().message());
    }
    return r;
  }

  // A method of a string, dict or list; nullopt when it has none of that name.
  absl::StatusOr<std::optional<Value>> Method(int line, const Value& obj, const std::string& name,
                                              const Args& a, const Kwargs& kw) {
    if (obj.IsString()) {
      const std::string& s = obj.s();
      if (name == "strip") return Value(StripChars(s, Arg(a, kw, 0, "chars"), true, true));
      if (name == "lstrip") return Value(StripChars(s, Arg(a, kw, 0, "chars"), true, false));
      if (name == "rstrip") return Value(StripChars(s, Arg(a, kw, 0, "chars"), false, true));
      if (name == "upper") return Value(absl::AsciiStrToUpper(s));
      if (name == "lower") return Value(absl::AsciiStrToLower(s));
      if (name == "title") return Value(Title(s));
      if (name == "capitalize") return Value(Capitalize(s));
      if (name == "startswith" || name == "endswith") {
        const Value p = Arg(a, kw, 0, "prefix");
        List options = p.IsList() ? p.list() : List{p};
        for (const Value& o : options) {
          const std::string t = o.Str();
          if (name == "startswith" ? absl::StartsWith(s, t) : absl::EndsWith(s, t)) {
            return Value(true);
          }
        }
        return Value(false);
      }
      if (name == "split") {
        const Value sep = Arg(a, kw, 0, "sep");
        const Value maxv = Arg(a, kw, 1, "maxsplit", Value(int64_t{-1}));
        const int64_t max = maxv.kind() == Value::Kind::kInt ? maxv.i() : -1;
        List out;
        if (sep.IsString() && !sep.s().empty()) {
          size_t from = 0;
          while (true) {
            const size_t k = s.find(sep.s(), from);
            if (k == std::string::npos || (max >= 0 && static_cast<int64_t>(out.size()) >= max)) {
              out.push_back(Value(s.substr(from)));
              break;
            }
            out.push_back(Value(s.substr(from, k - from)));
            from = k + sep.s().size();
          }
        } else {
          size_t k = 0;
          while (k < s.size()) {
            while (k < s.size() && absl::ascii_isspace(static_cast<unsigned char>(s[k]))) ++k;
            if (k >= s.size()) break;
            if (max >= 0 && static_cast<int64_t>(out.size()) >= max) {
              out.push_back(Value(StripChars(s.substr(k), Value(), false, true)));
              break;
            }
            size_t j = k;
            while (j < s.size() && !absl::ascii_isspace(static_cast<unsigned char>(s[j]))) ++j;
            out.push_back(Value(s.substr(k, j - k)));
            k = j;
          }
        }
        return Value(std::move(out));
      }
      if (name == "replace") {
        const Value cnt = Arg(a, kw, 2, "count", Value(int64_t{-1}));
        std::string r = Replace(s, Arg(a, kw, 0, "old").Str(), Arg(a, kw, 1, "new").Str(),
                                cnt.kind() == Value::Kind::kInt ? cnt.i() : -1);
        if (r.size() > kMaxBytes) return EvalError(line, "a string grows too long");
        return Value(std::move(r));
      }
      if (name == "join") {
        const Value l = Arg(a, kw, 0, "iterable");
        std::vector<std::string> parts;
        if (l.IsList()) {
          for (const Value& v : l.list()) parts.push_back(v.Str());
        }
        return Value(absl::StrJoin(parts, s));
      }
      if (name == "count") {
        const std::string sub = Arg(a, kw, 0, "sub").Str();
        if (sub.empty()) return Value(static_cast<int64_t>(CountCodePoints(s)) + 1);
        int64_t n = 0;
        for (size_t k = s.find(sub); k != std::string::npos; k = s.find(sub, k + sub.size())) ++n;
        return Value(n);
      }
      if (name == "find") {
        const size_t k = s.find(Arg(a, kw, 0, "sub").Str());
        return Value(k == std::string::npos ? int64_t{-1} : static_cast<int64_t>(k));
      }
      return std::optional<Value>();
    }
    if (obj.IsDict()) {
      if (name == "items") {
        List out;
        for (const auto& [k, v] : obj.dict()) out.push_back(Value::Tuple(List{Value(k), v}));
        return Value(std::move(out));
      }
      if (name == "keys") {
        List out;
        for (const auto& [k, v] : obj.dict()) out.push_back(Value(k));
        return Value(std::move(out));
      }
      if (name == "values") {
        List out;
        for (const auto& [k, v] : obj.dict()) out.push_back(v);
        return Value(std::move(out));
      }
      if (name == "get") {
        const Value v = obj.Get(Arg(a, kw, 0, "key").Str());
        return v.IsUndefined() ? Arg(a, kw, 1, "default", Value::None()) : v;
      }
      return std::optional<Value>();
    }
    return std::optional<Value>();
  }

  static std::string Replace(const std::string& s, const std::string& from, const std::string& to,
                             int64_t count) {
    if (from.empty()) return s;
    std::string out;
    size_t k = 0;
    int64_t done = 0;
    while (true) {
      const size_t j = s.find(from, k);
      if (j == std::string::npos || (count >= 0 && done >= count)) break;
      out.append(s, k, j - k);
      out += to;
      k = j + from.size();
      ++done;
      if (out.size() > kMaxBytes) break;  // Filter and Method refuse the result below
    }
    out.append(s, k, std::string::npos);
    return out;
  }

  // Python's printf-style `fmt % args`: %s %r %d %i %x %X %o %c %f %F %e %E %g %G %% with flags,
  // width and precision; `args` a tuple (one argument each), a dict (for %(name)s) or one value.
  absl::StatusOr<Value> Format(int line, const std::string& fmt, const Value& args) {
    const bool many = args.IsTuple();  // a list is one argument, as in Python
    size_t next = 0;
    std::string out;
    for (size_t i = 0; i < fmt.size(); ++i) {
      if (fmt[i] != '%') {
        out += fmt[i];
        continue;
      }
      if (++i >= fmt.size()) return EvalError(line, "incomplete format");
      Value arg;
      bool have = false;
      if (fmt[i] == '(') {
        const size_t close = fmt.find(')', i);
        if (close == std::string::npos || !args.IsDict()) {
          return EvalError(line, "format requires a mapping");
        }
        arg = args.Get(fmt.substr(i + 1, close - i - 1));
        have = true;
        i = close + 1;
      }
      // Flags, width and precision, each number held to 3 digits.
      std::string spec = "%";
      bool left = false;
      while (i < fmt.size() && absl::string_view("-+ #0").find(fmt[i]) != absl::string_view::npos) {
        left = left || fmt[i] == '-';
        spec += fmt[i++];
      }
      int width = 0, precision = -1;
      while (i < fmt.size() && absl::ascii_isdigit(static_cast<unsigned char>(fmt[i]))) {
        width = std::min(width * 10 + (fmt[i++] - '0'), 999);
      }
      if (i < fmt.size() && fmt[i] == '.') {
        precision = 0;
        ++i;
        while (i < fmt.size() && absl::ascii_isdigit(static_cast<unsigned char>(fmt[i]))) {
          precision = std::min(precision * 10 + (fmt[i++] - '0'), 999);
        }
      }
      if (i >= fmt.size()) return EvalError(line, "incomplete format");
      const char conv = fmt[i];
      if (conv == '%') {
        out += '%';
        continue;
      }
      if (!have) {
        if (many) {
          if (next >= args.list().size()) {
            return EvalError(line, "not enough arguments for format string");
          }
          arg = args.list()[next++];
        } else {
          if (next++ > 0) return EvalError(line, "not enough arguments for format string");
          arg = args;
        }
      }
      std::string piece;
      if (conv == 's' || conv == 'r') {
        piece = conv == 's' ? arg.Str() : arg.Repr();
        if (precision >= 0) piece.resize(CodePointOffset(piece, static_cast<size_t>(precision)));
        const int n = static_cast<int>(CountCodePoints(piece));
        if (n < width) {
          piece = left ? piece + std::string(width - n, ' ') : std::string(width - n, ' ') + piece;
        }
      } else if (absl::string_view("diouxXcfFeEgG").find(conv) != absl::string_view::npos) {
        if (!arg.IsNumber() && arg.kind() != Value::Kind::kBool) {
          return EvalError(
              line, absl::StrCat("%", std::string(1, conv), " format: a number is required, not ",
                                 KindName(arg)));
        }
        if (width > 0) absl::StrAppend(&spec, width);
        if (precision >= 0) absl::StrAppend(&spec, ".", precision);
        char buf[2048];
        if (absl::string_view("fFeEgG").find(conv) != absl::string_view::npos) {
          const double d = arg.kind() == Value::Kind::kBool ? (arg.b() ? 1.0 : 0.0) : arg.f();
          std::snprintf(buf, sizeof(buf), (spec + conv).c_str(), d);
        } else {
          const int64_t n = arg.kind() == Value::Kind::kBool  ? int64_t{arg.b()}
                            : arg.kind() == Value::Kind::kInt ? arg.i()
                            : std::fabs(arg.f()) < 9.2e18     ? static_cast<int64_t>(arg.f())
                                                              : 0;
          if (conv == 'c') {
            if (n < 0 || n > 0x10FFFF) return EvalError(line, "%c arg not in range");
            AppendUtf8(static_cast<uint32_t>(n), &piece);
            buf[0] = '\0';
          } else {
            const char c = conv == 'i' || conv == 'u' ? 'd' : conv;
            std::snprintf(buf, sizeof(buf), (spec + "ll" + c).c_str(), static_cast<long long>(n));
          }
        }
        piece += buf;
      } else {
        return EvalError(line,
                         absl::StrCat("unsupported format character '", std::string(1, conv), "'"));
      }
      out += piece;
      if (out.size() > kMaxBytes) return EvalError(line, "a string grows too long");
    }
    if (many && next < args.list().size()) {
      return EvalError(line, "not all arguments converted during string formatting");
    }
    return Value(std::move(out));
  }

  // a < b for sorting: numbers with numbers, strings with strings.
  absl::StatusOr<bool> Less(int line, const Value& a, const Value& b) {
    ASSIGN_OR_RETURN(Value r, Binary(line, "<", a, b));
    return r.Truthy();
  }

  absl::StatusOr<bool> Test(int line, const std::string& name, const Value& v, const Args& a) {
    const Value arg = a.empty() ? Value() : a[0];
    if (name == "defined") return !v.IsUndefined();
    if (name == "undefined") return v.IsUndefined();
    if (name == "none") return v.IsNone();
    if (name == "string") return v.IsString();
    if (name == "number") return v.IsNumber();
    if (name == "integer") return v.kind() == Value::Kind::kInt;
    if (name == "float") return v.kind() == Value::Kind::kFloat;
    if (name == "boolean") return v.kind() == Value::Kind::kBool;
    if (name == "true") return v.kind() == Value::Kind::kBool && v.b();
    if (name == "false") return v.kind() == Value::Kind::kBool && !v.b();
    if (name == "mapping") return v.IsDict();
    if (name == "iterable") return v.IsList() || v.IsDict() || v.IsString();
    if (name == "sequence") return v.IsList() || v.IsString() || v.IsDict();
    if (name == "callable") return v.kind() == Value::Kind::kFunction;
    if (name == "lower") return v.IsString() && absl::AsciiStrToLower(v.s()) == v.s();
    if (name == "upper") return v.IsString() && absl::AsciiStrToUpper(v.s()) == v.s();
    if (name == "odd" || name == "even" || name == "divisibleby") {
      if (v.kind() != Value::Kind::kInt) {
        return EvalError(line, absl::StrCat("'", name, "' needs an integer, not ", KindName(v)));
      }
      if (name == "odd") return v.i() % 2 != 0;
      if (name == "even") return v.i() % 2 == 0;
      return arg.kind() == Value::Kind::kInt && arg.i() != 0 && v.i() % arg.i() == 0;
    }
    if (name == "eq" || name == "equalto" || name == "==" || name == "sameas") return v == arg;
    if (name == "ne" || name == "!=") return !(v == arg);
    if (name == "in") {
      ASSIGN_OR_RETURN(Value r, Binary(line, "in", v, arg));
      return r.Truthy();
    }
    for (const char* op : {"<", ">", "<=", ">="}) {
      static const std::map<std::string, std::string> kAlias = {
          {"lt", "<"},  {"gt", ">"},       {"le", "<="},
          {"ge", ">="}, {"lessthan", "<"}, {"greaterthan", ">"}};
      auto it = kAlias.find(name);
      const std::string want = it != kAlias.end() ? it->second : name;
      if (want == op) {
        ASSIGN_OR_RETURN(Value r, Binary(line, op, v, arg));
        return r.Truthy();
      }
    }
    return EvalError(line, absl::StrCat("unknown test '", name, "'"));
  }

  // The items a filter over a sequence walks (a dict's keys, a string's characters).
  static List Items(const Value& v) {
    if (v.IsList()) return v.list();
    List out;
    if (v.IsDict()) {
      for (const auto& [k, x] : v.dict()) out.push_back(Value(k));
    } else if (v.IsString()) {
      for (std::string& c : CodePoints(v.s())) out.push_back(Value(std::move(c)));
    }
    return out;
  }

  // A dotted attribute path of `v` ("a.b", or an index).
  static Value Attribute(const Value& v, const std::string& path) {
    Value cur = v;
    for (absl::string_view part : absl::StrSplit(path, '.')) {
      int64_t idx = 0;
      if (cur.IsList() && absl::SimpleAtoi(part, &idx)) {
        cur = idx >= 0 && idx < static_cast<int64_t>(cur.list().size()) ? cur.list()[idx] : Value();
      } else {
        cur = cur.Get(part);
      }
    }
    return cur;
  }

  absl::StatusOr<Value> Filter(const Expr& e, const Value& v, const Args& a, const Kwargs& kw) {
    const std::string& name = e.name;
    if (name == "trim") return Value(StripChars(v.Str(), Arg(a, kw, 0, "chars"), true, true));
    if (name == "upper") return Value(absl::AsciiStrToUpper(v.Str()));
    if (name == "lower") return Value(absl::AsciiStrToLower(v.Str()));
    if (name == "capitalize") return Value(Capitalize(v.Str()));
    if (name == "title") return Value(Title(v.Str()));
    if (name == "string") return Value(v.Str());
    if (name == "safe" || name == "e" || name == "escape") return v;
    if (name == "length" || name == "count") {
      if (v.IsString()) return Value(static_cast<int64_t>(CountCodePoints(v.s())));
      if (v.IsList()) return Value(static_cast<int64_t>(v.list().size()));
      if (v.IsDict()) return Value(static_cast<int64_t>(v.dict().size()));
      if (v.IsUndefined()) return Value(int64_t{0});
      return EvalError(e.line, absl::StrCat("length of ", KindName(v)));
    }
    if (name == "default" || name == "d") {
      const bool boolean = Arg(a, kw, 1, "boolean", Value(false)).Truthy();
      if (v.IsUndefined() || (boolean && !v.Truthy()))
        return Arg(a, kw, 0, "default_value", Value(""));
      return v;
    }
    if (name == "tojson") {
      // transformers' tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False).
      JsonOptions o;
      o.ensure_ascii = Arg(a, kw, 0, "ensure_ascii", Value(false)).Truthy();
      const Value ind = Arg(a, kw, 1, "indent");
      if (ind.kind() == Value::Kind::kInt) o.indent = std::clamp<int64_t>(ind.i(), 0, 64);
      if (o.indent.has_value()) o.item_sep = ",";
      const Value seps = Arg(a, kw, 2, "separators");
      if (seps.IsList() && seps.list().size() == 2) {
        o.item_sep = seps.list()[0].Str();
        o.key_sep = seps.list()[1].Str();
      }
      o.sort_keys = Arg(a, kw, 3, "sort_keys", Value(false)).Truthy();
      std::string out;
      absl::Status s = ToJson(v, o, 0, &out);
      if (!s.ok()) return EvalError(e.line, s.message());
      return Value(std::move(out));
    }
    if (name == "first" || name == "last") {
      const List items = Items(v);
      if (items.empty()) return Value();
      return name == "first" ? items.front() : items.back();
    }
    if (name == "join") {
      const Value attr = Arg(a, kw, 1, "attribute");
      std::vector<std::string> parts;
      for (const Value& x : Items(v)) {
        parts.push_back(attr.IsUndefined() ? x.Str() : Attribute(x, attr.Str()).Str());
      }
      return Value(absl::StrJoin(parts, Arg(a, kw, 0, "d", Value("")).Str()));
    }
    if (name == "replace") {
      const Value cnt = Arg(a, kw, 2, "count", Value(int64_t{-1}));
      std::string r = Replace(v.Str(), Arg(a, kw, 0, "old").Str(), Arg(a, kw, 1, "new").Str(),
                              cnt.kind() == Value::Kind::kInt ? cnt.i() : -1);
      if (r.size() > kMaxBytes) return EvalError(e.line, "a string grows too long");
      return Value(std::move(r));
    }
    if (name == "int") {
      if (v.kind() == Value::Kind::kInt) return v;
      if (v.kind() == Value::Kind::kFloat) {
        // Within int64 only (Python's ints are unbounded; a template has no use for more).
        if (!(std::fabs(v.f()) < 9.2e18)) return EvalError(e.line, "int of a float out of range");
        return Value(static_cast<int64_t>(v.f()));
      }
      if (v.kind() == Value::Kind::kBool) return Value(int64_t{v.b()});
      int64_t i = 0;
      if (v.IsString() && absl::SimpleAtoi(absl::StripAsciiWhitespace(v.s()), &i)) return Value(i);
      return Arg(a, kw, 0, "default", Value(int64_t{0}));
    }
    if (name == "float") {
      if (v.IsNumber()) return Value(v.f());
      double d = 0;
      if (v.IsString() && absl::SimpleAtod(absl::StripAsciiWhitespace(v.s()), &d)) return Value(d);
      return Arg(a, kw, 0, "default", Value(0.0));
    }
    if (name == "abs") {
      if (v.kind() == Value::Kind::kInt) {
        if (v.i() == INT64_MIN) return EvalError(e.line, "integer overflow");
        return Value(v.i() < 0 ? -v.i() : v.i());
      }
      if (v.kind() == Value::Kind::kFloat) return Value(std::fabs(v.f()));
      return EvalError(e.line, absl::StrCat("abs of ", KindName(v)));
    }
    if (name == "list") return Value(Items(v));
    if (name == "reverse") {
      if (v.IsString()) {
        std::vector<std::string> cps = CodePoints(v.s());
        std::reverse(cps.begin(), cps.end());
        return Value(absl::StrJoin(cps, ""));
      }
      List items = Items(v);
      std::reverse(items.begin(), items.end());
      return Value(std::move(items));
    }
    if (name == "unique") {
      List out;
      for (const Value& x : Items(v)) {
        if (std::find(out.begin(), out.end(), x) == out.end()) out.push_back(x);
      }
      return Value(std::move(out));
    }
    if (name == "sort" || name == "min" || name == "max") {
      const bool case_sensitive =
          Arg(a, kw, name == "sort" ? 1 : 0, "case_sensitive", Value(false)).Truthy();
      const Value attr = Arg(a, kw, name == "sort" ? 2 : 1, "attribute");
      List items = Items(v);
      absl::Status bad;
      auto key = [&](const Value& x) {
        Value k = attr.IsUndefined() ? x : Attribute(x, attr.Str());
        if (!case_sensitive && k.IsString()) k = Value(absl::AsciiStrToLower(k.s()));
        return k;
      };
      auto less = [&](const Value& x, const Value& y) {
        const Value kx = key(x), ky = key(y);
        absl::StatusOr<bool> r = Less(e.line, kx, ky);
        if (!r.ok()) {
          if (bad.ok()) bad = r.status();
          return false;
        }
        return *r;
      };
      if (name == "sort") {
        // Python's sorted(reverse=True) keeps equal items in their order: one stable sort.
        if (Arg(a, kw, 0, "reverse", Value(false)).Truthy()) {
          std::stable_sort(items.begin(), items.end(),
                           [&](const Value& x, const Value& y) { return less(y, x); });
        } else {
          std::stable_sort(items.begin(), items.end(), less);
        }
        RETURN_IF_ERROR(bad);
        return Value(std::move(items));
      }
      if (items.empty()) return Value();
      auto it = name == "min" ? std::min_element(items.begin(), items.end(), less)
                              : std::max_element(items.begin(), items.end(), less);
      RETURN_IF_ERROR(bad);
      return *it;
    }
    if (name == "dictsort") {
      if (!v.IsDict()) return EvalError(e.line, absl::StrCat("dictsort of ", KindName(v)));
      const bool case_sensitive = Arg(a, kw, 0, "case_sensitive", Value(false)).Truthy();
      const bool by_value = Arg(a, kw, 1, "by", Value("key")).Str() == "value";
      const bool reverse = Arg(a, kw, 2, "reverse", Value(false)).Truthy();
      List pairs;
      for (const auto& [k, x] : v.dict()) pairs.push_back(Value::Tuple(List{Value(k), x}));
      absl::Status bad;
      std::stable_sort(pairs.begin(), pairs.end(), [&](const Value& x, const Value& y) {
        Value kx = x.list()[by_value ? 1 : 0], ky = y.list()[by_value ? 1 : 0];
        if (!case_sensitive && kx.IsString()) kx = Value(absl::AsciiStrToLower(kx.s()));
        if (!case_sensitive && ky.IsString()) ky = Value(absl::AsciiStrToLower(ky.s()));
        absl::StatusOr<bool> r = reverse ? Less(e.line, ky, kx) : Less(e.line, kx, ky);
        if (!r.ok() && bad.ok()) bad = r.status();
        return r.ok() && *r;
      });
      RETURN_IF_ERROR(bad);
      return Value(std::move(pairs));
    }
    if (name == "sum") {
      const Value attr = Arg(a, kw, 0, "attribute");
      Value total = Arg(a, kw, 1, "start", Value(int64_t{0}));
      for (const Value& x : Items(v)) {
        ASSIGN_OR_RETURN(
            total, Binary(e.line, "+", total, attr.IsUndefined() ? x : Attribute(x, attr.Str())));
      }
      return total;
    }
    if (name == "round") {
      if (!v.IsNumber()) return EvalError(e.line, absl::StrCat("round of ", KindName(v)));
      const Value prec = Arg(a, kw, 0, "precision", Value(int64_t{0}));
      const std::string method = Arg(a, kw, 1, "method", Value("common")).Str();
      const double scale = std::pow(10.0, prec.kind() == Value::Kind::kInt ? prec.i() : 0);
      const double x = v.f() * scale;
      const double r = method == "floor"  ? std::floor(x)
                       : method == "ceil" ? std::ceil(x)
                                          : std::nearbyint(x);  // Python's round: half to even
      return Value(r / scale);
    }
    if (name == "indent") {
      // Lines after the first (and, with first, the first) indented; blank lines only with blank.
      const Value w = Arg(a, kw, 0, "width", Value(int64_t{4}));
      const std::string pad =
          w.IsString() ? w.s()
                       : std::string(static_cast<size_t>(std::clamp<int64_t>(
                                         w.kind() == Value::Kind::kInt ? w.i() : 4, 0, 64)),
                                     ' ');
      const bool first = Arg(a, kw, 1, "first", Value(false)).Truthy();
      const bool blank = Arg(a, kw, 2, "blank", Value(false)).Truthy();
      std::vector<std::string> lines = absl::StrSplit(v.Str(), '\n');
      for (size_t k = 0; k < lines.size(); ++k) {
        if ((k > 0 || first) && (blank || !lines[k].empty())) lines[k] = pad + lines[k];
      }
      return Value(absl::StrJoin(lines, "\n"));
    }
    if (name == "wordcount") {
      int64_t n = 0;
      bool in_word = false;
      for (const char c : v.Str()) {
        const bool w = absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_' ||
                       static_cast<unsigned char>(c) >= 0x80;
        if (w && !in_word) ++n;
        in_word = w;
      }
      return Value(n);
    }
    if (name == "items") {
      List out;
      if (v.IsDict()) {
        for (const auto& [k, x] : v.dict()) out.push_back(Value::Tuple(List{Value(k), x}));
      } else if (!v.IsUndefined()) {
        return EvalError(e.line, "Can only get item pairs from a mapping.");
      }
      return Value(std::move(out));
    }
    if (name == "format") {
      // "%s and %d" | format(a, b), or %(name)s with keyword arguments.
      if (!kw.empty()) return Format(e.line, v.Str(), Value(Dict(kw.begin(), kw.end())));
      return Format(e.line, v.Str(), Value::Tuple(List(a.begin(), a.end())));
    }
    if (name == "selectattr" || name == "rejectattr" || name == "select" || name == "reject") {
      const bool by_attr = name == "selectattr" || name == "rejectattr";
      const bool keep_if = name == "selectattr" || name == "select";
      const size_t t = by_attr ? 1 : 0;
      const std::string test = t < a.size() ? a[t].Str() : "";
      Args test_args(a.begin() + std::min(a.size(), t + 1), a.end());
      List out;
      for (const Value& x : Items(v)) {
        const Value subject = by_attr ? Attribute(x, a.empty() ? "" : a[0].Str()) : x;
        bool r = subject.Truthy();
        if (!test.empty()) {
          ASSIGN_OR_RETURN(r, Test(e.line, test, subject, test_args));
        }
        if (r == keep_if) out.push_back(x);
      }
      return Value(std::move(out));
    }
    if (name == "map") {
      const Value attr = Arg(a, kw, 99, "attribute");
      List out;
      for (const Value& x : Items(v)) {
        if (!attr.IsUndefined()) {
          Value y = Attribute(x, attr.Str());
          if (y.IsUndefined()) y = Arg(a, kw, 99, "default");
          out.push_back(y);
        } else if (!a.empty()) {
          Expr f;
          f.name = a[0].Str();
          f.line = e.line;
          ASSIGN_OR_RETURN(Value y, Filter(f, x, Args(a.begin() + 1, a.end()), {}));
          out.push_back(y);
        } else {
          out.push_back(x);
        }
      }
      return Value(std::move(out));
    }
    return EvalError(e.line, absl::StrCat("unknown filter '", name, "'"));
  }

  std::vector<std::map<std::string, Value>> frames_;
  int macro_depth_ = 0;
  int64_t steps_ = 0;
};

}  // namespace

absl::StatusOr<Template> Template::Parse(absl::string_view source) {
  // As jinja2's lexer: \r\n and \r read as \n, and one trailing newline is dropped.
  std::string src = absl::StrReplaceAll(source, {{"\r\n", "\n"}});
  std::replace(src.begin(), src.end(), '\r', '\n');
  if (absl::EndsWith(src, "\n")) src.pop_back();
  ASSIGN_OR_RETURN(std::vector<Piece> pieces, Split(src));
  StmtParser parser(std::move(pieces));
  Template t;
  ASSIGN_OR_RETURN(NodeP root, parser.ParseAll());
  t.root_ = std::move(root);
  return t;
}

absl::StatusOr<std::string> Template::Render(const Value& context) const {
  Renderer r(context);
  std::string out;
  Flow flow = Flow::kNormal;
  RETURN_IF_ERROR(r.Exec(*root_, &out, &flow));
  return out;
}

}  // namespace strata::jinja
