#include "grammar/structured_output.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "grammar/gbnf.h"
#include "grammar/json_schema.h"
#include "grammar/regex_grammar.h"

namespace strata {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, " ", what));
}

// Prefixes a compiler's error with the field it came from.
absl::StatusOr<std::shared_ptr<const Grammar>> Named(
    absl::StatusOr<std::shared_ptr<const Grammar>> g, absl::string_view field) {
  if (g.ok()) return g;
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", g.status().message()));
}

absl::StatusOr<std::shared_ptr<const Grammar>> Compile(const v1::StructuredOutput& spec,
                                                       absl::string_view field) {
  switch (spec.kind_case()) {
    case v1::StructuredOutput::KIND_NOT_SET:
      return std::shared_ptr<const Grammar>();
    case v1::StructuredOutput::kJsonObject:
      if (!spec.json_object()) return std::shared_ptr<const Grammar>();
      return AnyJsonGrammar(/*object_only=*/true, spec.compact_json() ? 0 : kMaxJsonWhitespace);
    case v1::StructuredOutput::kJsonSchema: {
      const std::string name = absl::StrCat(field, ".json_schema");
      if (spec.json_schema().size() > kMaxJsonSchemaBytes) {
        return Invalid(name, absl::StrCat("must be at most ", kMaxJsonSchemaBytes, " bytes"));
      }
      // JsonSchemaGrammar names the source itself.
      return JsonSchemaGrammar(spec.json_schema(), name,
                               spec.compact_json() ? 0 : kMaxJsonWhitespace);
    }
    case v1::StructuredOutput::kRegex: {
      const std::string name = absl::StrCat(field, ".regex");
      if (spec.regex().empty() || spec.regex().size() > kMaxRegexBytes) {
        return Invalid(name, absl::StrCat("must be 1 to ", kMaxRegexBytes, " bytes"));
      }
      return Named(RegexGrammar(spec.regex()), name);
    }
    case v1::StructuredOutput::kGrammar: {
      const std::string name = absl::StrCat(field, ".grammar");
      if (spec.grammar().empty() || spec.grammar().size() > kMaxJsonSchemaBytes) {
        return Invalid(name, absl::StrCat("must be 1 to ", kMaxJsonSchemaBytes, " bytes"));
      }
      return Named(GbnfGrammar(spec.grammar()), name);
    }
    case v1::StructuredOutput::kChoice: {
      const std::string name = absl::StrCat(field, ".choice.texts");
      const auto& texts = spec.choice().texts();
      if (texts.empty() || texts.size() > kMaxChoices) {
        return Invalid(name, absl::StrCat("must hold 1 to ", kMaxChoices, " texts"));
      }
      GrammarBuilder b;
      const int32_t root = b.NewRule("choice");
      for (int i = 0; i < texts.size(); ++i) {
        if (texts[i].empty() || texts[i].size() > kMaxChoiceBytes) {
          return Invalid(absl::StrCat(name, "[", i, "]"),
                         absl::StrCat("must be 1 to ", kMaxChoiceBytes, " bytes"));
        }
        b.AddAlternative(root, b.Literal(texts[i]));
      }
      return Named(std::move(b).Build(root), name);
    }
  }
  return Invalid(field, "sets an unknown kind");
}

}  // namespace

absl::StatusOr<std::shared_ptr<const Grammar>> CompileStructuredOutput(
    const v1::StructuredOutput& spec, absl::string_view field) {
  if (spec.prefix().size() > kMaxPrefixBytes) {
    return Invalid(absl::StrCat(field, ".prefix"),
                   absl::StrCat("must be at most ", kMaxPrefixBytes, " bytes"));
  }
  ASSIGN_OR_RETURN(std::shared_ptr<const Grammar> g, Compile(spec, field));
  if (g == nullptr) {
    if (!spec.prefix().empty()) return Invalid(absl::StrCat(field, ".prefix"), "needs a grammar");
    return g;
  }
  // A grammar ambiguous from its start would be refused by the engine anyway: refuse it here.
  GrammarMatcher m(g);
  if (!m.Advance(spec.prefix())) {
    return Invalid(absl::StrCat(field, ".prefix"), "does not follow the grammar");
  }
  if (m.Overloaded()) {
    return Invalid(field, "is too ambiguous to follow (more than 256 readings at once)");
  }
  return g;
}

absl::StatusOr<std::shared_ptr<const Grammar>> GrammarCache::Get(const v1::StructuredOutput& spec,
                                                                 absl::string_view field) {
  if (spec.kind_case() == v1::StructuredOutput::KIND_NOT_SET && spec.prefix().empty()) {
    return std::shared_ptr<const Grammar>();
  }
  std::string key = spec.SerializeAsString();
  {
    absl::MutexLock lock(&mu_);
    auto it = index_.find(key);
    if (it != index_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second);
      ++hits_;
      return it->second->second;
    }
    ++misses_;
  }
  // Compiled outside the lock: a large schema takes milliseconds.
  ASSIGN_OR_RETURN(std::shared_ptr<const Grammar> g, CompileStructuredOutput(spec, field));
  if (g == nullptr) return g;
  absl::MutexLock lock(&mu_);
  if (index_.contains(key)) return g;  // compiled meanwhile by another caller
  lru_.emplace_front(key, g);
  index_.emplace(std::move(key), lru_.begin());
  while (lru_.size() > capacity_) {
    index_.erase(lru_.back().first);
    lru_.pop_back();
  }
  return g;
}

int64_t GrammarCache::hits() const {
  absl::MutexLock lock(&mu_);
  return hits_;
}

int64_t GrammarCache::misses() const {
  absl::MutexLock lock(&mu_);
  return misses_;
}

}  // namespace strata
