// JSON schemas as grammars: the JSON texts a schema accepts, for structured output
// (response_format json_schema / json_object).
//
// Supported (JSON Schema 2020-12, draft 7 and draft 4 spellings): `type` (one or a list), `enum`,
// `const`, integers with `minimum` / `maximum` / `exclusiveMinimum` / `exclusiveMaximum` (any
// bounds up to 1e15: the numerals of exactly that range), numbers with such bounds of either sign,
// whole or not (up to 20 digits after the point; written without an exponent, values compared as
// the bounds' shortest decimals), `multipleOf` a whole number for integers and numbers (the
// multiples listed between two bounds, up to 4096; with no bound or one at zero, followed digit
// by digit, multipleOf up to 10000), `anyOf`, `oneOf` (as anyOf: exclusivity
// is not enforced), `allOf` of one schema, `$ref` to the
// root or into `$defs` / `definitions` (recursion allowed), boolean schemas; strings with
// `minLength`, `maxLength`, `pattern` (regex_grammar.h; found anywhere in the string unless
// anchored, as JSON Schema says) and `format` date, time, date-time, uuid, ipv4 or email (other
// formats are annotations and not enforced); objects with `properties` (generated in the order
// given), `required`, `additionalProperties` (when `properties` is given and it is absent, no other
// property is generated; `true` or a schema allows more after the listed ones, under other names);
// arrays with `items`, `prefixItems`, `minItems`, `maxItems`. `$ref`, `anyOf`, `oneOf` and `allOf`
// stand for the whole schema: constraining keywords beside them (`properties`, `maxLength`, ...)
// are refused, a `type` beside them is left to the branches.
// Annotations (title, description, default, examples, ...) are ignored. Keywords that constrain
// values in ways the grammar cannot express are refused with INVALID_ARGUMENT naming the keyword
// and where it is: a fractional multipleOf, uniqueItems (except over items that are one of at
// most 10 values: an enum of strings, integers, booleans or null, or booleans, given in place or
// by `$ref`, as pydantic writes a set of an Enum), contains,
// minProperties, maxProperties,
// patternProperties, propertyNames, dependentRequired, dependentSchemas, not, if/then/else,
// unevaluatedProperties, unevaluatedItems; and number bounds with more than 20 digits after the
// point.
//
// The JSON generated is compact apart from whitespace before it and between tokens: up to
// kMaxJsonWhitespace spaces, tabs or newlines in each gap (so a model can indent, but not emit
// whitespace without end).
#ifndef STRATA_GRAMMAR_JSON_SCHEMA_H_
#define STRATA_GRAMMAR_JSON_SCHEMA_H_

#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grammar/grammar.h"

namespace strata {

inline constexpr int kMaxJsonWhitespace = 32;

// Any JSON value; with `object_only`, any JSON object (OpenAI's json_object mode). Both take the
// whitespace allowed in each gap (0: compact JSON).
absl::StatusOr<std::shared_ptr<const Grammar>> AnyJsonGrammar(
    bool object_only, int max_whitespace = kMaxJsonWhitespace);

// The JSON texts valid under `schema` (a JSON schema, as JSON text). Errors are INVALID_ARGUMENT
// and name `source` and the schema path: `response_format.json_schema.schema: field
// "properties.age" uses "minimum", which is not supported`.
absl::StatusOr<std::shared_ptr<const Grammar>> JsonSchemaGrammar(
    absl::string_view schema, absl::string_view source, int max_whitespace = kMaxJsonWhitespace);

}  // namespace strata

#endif  // STRATA_GRAMMAR_JSON_SCHEMA_H_
