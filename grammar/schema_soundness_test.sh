#!/usr/bin/env bash
# Every text the JSON-schema grammars generate is valid under its schema, by an independent
# validator (Python's jsonschema, draft 2020-12 with format checks): random walks through each
# grammar of grammar/testdata/schemas.jsonl (json_schema_samples), 60 a schema.
set -euo pipefail
samples="${TEST_TMPDIR:-/tmp}/samples.jsonl"
grammar/json_schema_samples grammar/testdata/schemas.jsonl 60 7 > "$samples"
python3 - grammar/testdata/schemas.jsonl "$samples" <<'PY'
import json, sys
import jsonschema
schemas = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
counts = [0] * len(schemas)
checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
for line in open(sys.argv[2]):
    r = json.loads(line)
    i = r["schema"]
    assert "error" not in r, (i, r)
    value = json.loads(r["text"])
    jsonschema.Draft202012Validator(schemas[i], format_checker=checker).validate(value)
    counts[i] += 1
assert all(c > 0 for c in counts), counts
print("valid samples per schema:", counts)
PY
