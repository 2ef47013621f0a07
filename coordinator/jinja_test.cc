// The chat-template renderer against Python's jinja2 (coordinator/testdata/jinja_cases.json, made
// by tools/jinja_cases.py the way transformers renders chat templates), and its errors.
#include "coordinator/jinja.h"

#include <string>

#include "absl/strings/match.h"
#include "common/mapped_file.h"
#include "gtest/gtest.h"

namespace strata::jinja {
namespace {

TEST(JinjaTest, MatchesJinja2OnEveryCase) {
  const std::string text =
      ReadFileToString("coordinator/testdata/jinja_cases.json").value_or(std::string());
  ASSERT_FALSE(text.empty());
  absl::StatusOr<JsonDocument> doc = JsonDocument::Parse(text, "jinja_cases.json");
  ASSERT_TRUE(doc.ok()) << doc.status();
  absl::StatusOr<std::vector<JsonValue>> cases = doc->root().AsArray();
  ASSERT_TRUE(cases.ok()) << cases.status();
  ASSERT_GE(cases->size(), 10u);
  for (const JsonValue& c : *cases) {
    const std::string name = *c.StringFieldOr("name", "");
    SCOPED_TRACE(name);
    absl::StatusOr<Template> t = Template::Parse(*c.StringField("template"));
    ASSERT_TRUE(t.ok()) << t.status();
    absl::StatusOr<Value> context = Value::FromJson(*c.Field("context"));
    ASSERT_TRUE(context.ok()) << context.status();
    absl::StatusOr<std::string> got = t->Render(*context);
    if (std::optional<JsonValue> error = c.FindField("error"); error.has_value()) {
      ASSERT_FALSE(got.ok()) << "rendered where jinja2 failed: " << *got;
      EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_TRUE(absl::StrContains(got.status().message(), *error->AsString())) << got.status();
      continue;
    }
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, *c.StringField("expected"));
  }
}

absl::StatusOr<std::string> RenderWith(absl::string_view source, Value context = Value(Dict{})) {
  absl::StatusOr<Template> t = Template::Parse(source);
  if (!t.ok()) return t.status();
  return t->Render(context);
}

TEST(JinjaTest, SyntaxErrorsNameTheLine) {
  struct Bad {
    const char* source;
    const char* message;
  };
  for (const Bad& b : {
           Bad{"a\n{% if x %}b", "line 2: missing {% endif %}"},
           Bad{"{{ 1 + }}", "line 1: expected an expression"},
           Bad{"x\ny\n{{ 'open }}", "line 3: "},
           Bad{"{% for x in y recursive %}{% endfor %}", "recursive loops"},
           Bad{"{% call foo() %}{% endcall %}", "unsupported statement {% call %}"},
           Bad{"{{ x", "tag not closed"},
           Bad{"{% endif %}", "unexpected {% endif %}"},
           Bad{"{{ a b }}", "unexpected tokens before 'b'"},
           Bad{"{% break %}", "{% break %} outside a loop"},
           Bad{"{% for x in y %}{% macro m() %}{% continue %}{% endmacro %}{% endfor %}",
               "outside a loop"},
           Bad{"{{ x | truncate(9) }}", "unsupported filter 'truncate'"},
           Bad{"{{ x is nosuchtest }}", "unsupported test 'nosuchtest'"},
           Bad{"{{ 'bad \\u12' }}", "bad escape"},
       }) {
    absl::StatusOr<Template> t = Template::Parse(b.source);
    ASSERT_FALSE(t.ok()) << b.source;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(t.status().message(), b.message))
        << b.source << ": " << t.status();
  }
}

TEST(JinjaTest, RuntimeErrorsAreInvalidArgument) {
  for (const char* source :
       {"{{ raise_exception('no tools here') }}",
        "{{ 1 / 0 }}",
        "{{ 'a' - 1 }}",
        "{{ [1] < 'a' }}",
        "{% for x in 3 %}{% endfor %}",
        "{{ x | nosuchfilter }}",
        "{{ 1 is nosuchtest }}",
        "{{ not_a_function() }}",
        "{{ range(10000000) | length }}",
        "{{ 'ab' * 10000000 }}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{{ 9223372036854775807 + 1 }}",
        "{{ 2 ** 64 }}",
        "{% for x in [1] %}{{ loop.cycle() }}{% endfor %}",
        "{{ (-9223372036854775807 - 1) // -1 }}",
        "{{ -(-9223372036854775807 - 1) }}",
        "{{ 1e300 | int }}",
        "{{ range(-9223372036854775807, 9223372036854775807) | length }}",
        "{% set ns = namespace() %}{% set ns.me = ns %}{{ ns | tojson }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}",
        "{% for a in range(10000) %}{% for b in range(10000) %}{% endfor %}{% endfor %}"}) {
    absl::StatusOr<std::string> r = RenderWith(source);
    ASSERT_FALSE(r.ok()) << source << " rendered " << *r;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << source;
  }
  EXPECT_TRUE(absl::StrContains(
      RenderWith("{{ raise_exception('no tools here') }}").status().message(), "no tools here"));
}

TEST(JinjaTest, HostileTemplatesFailInsteadOfExhaustingTheProcess) {
  // Nesting past the parser's bound is a syntax error, not a stack overflow.
  EXPECT_FALSE(Template::Parse(absl::StrCat("{{ ", std::string(100000, '('), "1",
                                            std::string(100000, ')'), " }}"))
                   .ok());
  EXPECT_FALSE(Template::Parse(absl::StrCat("{{ ", std::string(100000, '-'), "1 }}")).ok());
  std::string ifs;
  for (int i = 0; i < 20000; ++i) ifs += "{% if true %}";
  for (int i = 0; i < 20000; ++i) ifs += "{% endif %}";
  EXPECT_FALSE(Template::Parse(ifs).ok());
  // A namespace cannot hold itself, directly or inside a list or dict (a cycle would leak and
  // never print).
  for (const char* set : {"{% set ns.me = ns %}", "{% set ns.me = [1, {'x': ns}] %}"}) {
    absl::StatusOr<std::string> r =
        RenderWith(absl::StrCat("{% set ns = namespace(a=1) %}", set, "{{ ns }}"));
    ASSERT_FALSE(r.ok()) << set;
    EXPECT_TRUE(absl::StrContains(r.status().message(), "cannot hold itself")) << r.status();
  }
  // Another namespace inside one is fine.
  EXPECT_TRUE(
      RenderWith("{% set a = namespace(x=1) %}{% set b = namespace(y=a) %}{{ b.y.x }}").ok());
  // Many tags parse in linear time (line numbers are counted as the parse goes).
  std::string many;
  for (int i = 0; i < 100000; ++i) many += "{{ x }}\n";
  EXPECT_TRUE(Template::Parse(many).ok());
}

TEST(JinjaTest, NamespacesAreSharedAndLoopsScopeTheirSets) {
  // A set inside a loop does not leak out; a namespace's attribute does.
  absl::StatusOr<std::string> r = RenderWith(
      "{% set n = 0 %}{% set ns = namespace(n=0) %}{% for x in [1, 2, 3] %}{% set n = n + x %}"
      "{% set ns.n = ns.n + x %}{% endfor %}{{ n }} {{ ns.n }}");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, "0 6");
}

TEST(JinjaTest, RendersManyTimesFromOneParse) {
  absl::StatusOr<Template> t = Template::Parse("{% for m in messages %}{{ m }};{% endfor %}");
  ASSERT_TRUE(t.ok());
  for (int n = 0; n < 3; ++n) {
    List messages;
    for (int k = 0; k < n; ++k) messages.push_back(Value(k));
    absl::StatusOr<std::string> r = t->Render(Value(Dict{{"messages", Value(messages)}}));
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->size(), static_cast<size_t>(2 * n));
  }
}

}  // namespace
}  // namespace strata::jinja
