// The subset of Jinja that models' chat templates (tokenizer_config.json "chat_template",
// chat_template.jinja) are written in, run the way Hugging Face transformers runs them: blocks
// trimmed (trim_blocks, lstrip_blocks), loop controls on, raise_exception() and strftime_now()
// as globals, tojson as json.dumps(ensure_ascii=False).
//
// Statements: if / elif / else, for (one or several targets, `if` filter, else, loop.index,
// index0, revindex, revindex0, first, last, length, previtem, nextitem; break, continue), set
// (names, namespace attributes, blocks), macro (positional and keyword arguments with defaults),
// generation (its body rendered as is), comments, raw, whitespace control with `-` and `+`.
// Expressions: literals (strings, numbers, booleans, none, lists, dicts), attribute and item
// access, slices, calls, filters, tests (`is`), not / and / or, comparisons, `in`, arithmetic,
// `~`, conditional expressions. Undefined values render as "" and are falsy; an attribute of one
// is undefined again (more lenient than Jinja's default, never stricter).
#ifndef STRATA_COORDINATOR_JINJA_H_
#define STRATA_COORDINATOR_JINJA_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/json.h"

namespace strata::jinja {

class Value;
using List = std::vector<Value>;
// Ordered as inserted (as Python dicts are).
using Dict = std::vector<std::pair<std::string, Value>>;
using Args = std::vector<Value>;
using Kwargs = std::vector<std::pair<std::string, Value>>;
using Function = std::function<absl::StatusOr<Value>(const Args&, const Kwargs&)>;

// A template value. Lists, dicts and namespaces are shared by reference, as in Python.
class Value {
 public:
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kFunction };

  Value() = default;  // undefined
  static Value None();
  Value(bool b);                                    // NOLINT(google-explicit-constructor)
  Value(int64_t i);                                 // NOLINT(google-explicit-constructor)
  Value(int i) : Value(static_cast<int64_t>(i)) {}  // NOLINT(google-explicit-constructor)
  Value(double d);                                  // NOLINT(google-explicit-constructor)
  Value(std::string s);                             // NOLINT(google-explicit-constructor)
  Value(const char* s) : Value(std::string(s)) {}   // NOLINT(google-explicit-constructor)
  Value(List l);                                    // NOLINT(google-explicit-constructor)
  Value(Dict d);                                    // NOLINT(google-explicit-constructor)
  static Value Fn(Function f);
  // A list that prints as a Python tuple: ('a', 1) (.items() pairs, tuple literals).
  static Value Tuple(List l);
  // A JSON document's value: objects become dicts, arrays lists, integers ints.
  static absl::StatusOr<Value> FromJson(const JsonValue& json);

  Kind kind() const { return kind_; }
  bool IsUndefined() const { return kind_ == Kind::kUndefined; }
  bool IsNone() const { return kind_ == Kind::kNone; }
  bool IsString() const { return kind_ == Kind::kString; }
  bool IsNumber() const { return kind_ == Kind::kInt || kind_ == Kind::kFloat; }
  bool IsList() const { return kind_ == Kind::kList; }
  bool IsTuple() const { return kind_ == Kind::kList && tuple_; }
  bool IsDict() const { return kind_ == Kind::kDict; }

  bool b() const { return b_; }
  int64_t i() const { return i_; }
  double f() const { return kind_ == Kind::kInt ? static_cast<double>(i_) : f_; }
  const std::string& s() const { return *s_; }
  List& list() const { return *list_; }
  Dict& dict() const { return *dict_; }
  const Function& fn() const { return *fn_; }

  // A dict's entry, or undefined.
  Value Get(absl::string_view key) const;
  // Sets a dict's entry (a new key goes last).
  void Set(const std::string& key, Value v) const;

  bool Truthy() const;
  // As `{{ v }}` prints it (Python's str(): None, True, 1.0, ['a'], {'k': 1}).
  std::string Str() const;
  // Python's repr(): strings quoted.
  std::string Repr() const;

 private:
  std::string ReprAt(int depth) const;
  Kind kind_ = Kind::kUndefined;
  bool tuple_ = false;
  bool b_ = false;
  int64_t i_ = 0;
  double f_ = 0;
  std::shared_ptr<std::string> s_;
  std::shared_ptr<List> list_;
  std::shared_ptr<Dict> dict_;
  std::shared_ptr<Function> fn_;
};

bool operator==(const Value& a, const Value& b);

struct Node;

// A parsed template. Parse once, render many times: Render is const, and safe from several
// threads as long as they do not share a context's lists or dicts (`set ns.x` changes a dict).
class Template {
 public:
  // INVALID_ARGUMENT for what this subset cannot parse, naming the line.
  static absl::StatusOr<Template> Parse(absl::string_view source);
  // Renders with `context`'s entries as variables (a dict). raise_exception() in the template
  // gives INVALID_ARGUMENT with its message; other failures INVALID_ARGUMENT naming the line.
  absl::StatusOr<std::string> Render(const Value& context) const;

 private:
  std::shared_ptr<const Node> root_;
};

}  // namespace strata::jinja

#endif  // STRATA_COORDINATOR_JINJA_H_
