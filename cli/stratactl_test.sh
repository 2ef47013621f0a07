#!/usr/bin/env bash
# stratactl as a user runs it: real process, real model files, exit codes and output checked.
set -euo pipefail
bin=cli/stratactl
model=worker/model/testdata/llama3_bf16
tok=tokenizer/testdata/qwen3_unpacked
fail() { echo "FAIL: $*" >&2; exit 1; }

# Greedy run with JSON output: 4 tokens, finish by length, logprobs present.
out="$($bin run --model $model --prompt-ids 5,6,7 --max-tokens 4 --temperature 0 --logprobs 2 --json)"
python3 - "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
assert r["prompt_token_ids"] == [5, 6, 7], r
assert len(r["token_ids"]) == 4, r
assert r["finish_reason"] == "length", r
assert len(r["logprobs"]) == 4 and len(r["logprobs"][0]["top"]) == 2, r
assert r["logprobs"][0]["top"][0]["token_id"] == r["token_ids"][0], r  # greedy picks the top token
assert r["usage"]["completion_tokens"] == 4, r
PY
again="$($bin run --model $model --prompt-ids 5,6,7 --max-tokens 4 --temperature 0 --logprobs 2 --json)"
[ "$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')" = \
  "$(echo "$again" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')" ] || fail "greedy not deterministic"

# Seeded sampling is reproducible; the plain-text form prints token ids when there is no tokenizer.
a="$($bin run --model $model --prompt-ids 9,8 --max-tokens 6 --temperature 0.8 --seed 7)"
b="$($bin run --model $model --prompt-ids 9,8 --max-tokens 6 --temperature 0.8 --seed 7)"
[ "$a" = "$b" ] || fail "seeded sampling differs: $a / $b"
[ "$(echo "$a" | wc -w)" = 6 ] || fail "expected 6 ids, got: $a"

# Tokenize with Qwen3's tokenizer.
ids="$($bin tokenize --model $tok --text 'Hello, world!')"
[ "$ids" = "9707 11 1879 0" ] || fail "tokenize gave: $ids"
json="$($bin tokenize --model $tok --text ' the' --json)"
[ "$json" = '{"token_ids":[279],"tokens":["Ġthe"]}' ] || fail "tokenize --json gave: $json"

# Usage errors exit 2 and name the problem; the model error names the file.
set +e
msg="$($bin run --model $model --prompt-ids 1 --max-tokens nope 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q -- '--max-tokens must be an integer' <<<"$msg" || fail "bad int: $rc $msg"
msg="$($bin run --model $model 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q 'exactly one of --prompt and --prompt-ids' <<<"$msg" || fail "no prompt: $rc $msg"
msg="$($bin run --model $model --prompt-ids 1,9999 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q 'token id 9999 outside the vocabulary' <<<"$msg" || fail "bad id: $rc $msg"
msg="$($bin run --model /nonexistent --prompt-ids 1 2>&1)"; rc=$?
[ $rc = 1 ] && grep -q '/nonexistent/config.json' <<<"$msg" || fail "missing model: $rc $msg"
# Capacity planning, as an operator runs it: a table, and usage errors naming the flag.
msg="$($bin plan --model $model --gpu-memory-gib 8 --gpu-bandwidth-gbps 100 --gpu-tflops 10 \
  --prompt-tokens 16 --output-tokens 8 --rate 1 2>&1)"; rc=$?
[ $rc = 0 ] && grep -q '^workers    1 for 1.00 requests/s' <<<"$msg" || fail "plan: $rc $msg"
msg="$($bin plan --model $model --gpu h900 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q -- '--gpu "h900" is not one of h100' <<<"$msg" || fail "plan --gpu: $rc $msg"
msg="$($bin plan --model $model --rate=-3 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q -- '--rate must be 0 or more' <<<"$msg" || fail "plan --rate: $rc $msg"

# Simulation: the test model's engine profiled, a latency/load curve from the profile, and the
# fewest H100 workers for a target from the roofline.
tmp=${TEST_TMPDIR:-$(mktemp -d)}
msg="$($bin profile --model $model --threads 1 --kv-cache-mb 4 --context 32 --reps 2 \
  --out "$tmp/profile.json" 2>&1)"; rc=$?
[ $rc = 0 ] && grep -q '^fit ' <<<"$msg" && grep -q '"token_s"' "$tmp/profile.json" \
  || fail "profile: $rc $msg"
out="$($bin simulate --profile "$tmp/profile.json" --workers 2 --rates 5,50000 --requests 60 \
  --prompt-tokens 32:64 --output-tokens 8 --svg "$tmp/curve.svg" --json 2>&1)" || fail "simulate: $out"
python3 - "$out" "$tmp/curve.svg" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
runs = r["runs"]
assert [x["rate_per_s"] for x in runs] == [5, 50000], r
for x in runs:
    assert x["completed"] == 60 and x["rejected"] == 0 and x["workers"] == 2, x
    assert len(x["worker_utilization"]) == 2, x
# Ten thousand times the load queues (this profile's tiny model takes well under a millisecond a
# request): the first token comes later.
assert runs[1]["ttft_ms"]["p99"] > runs[0]["ttft_ms"]["p99"], runs
svg = open(sys.argv[2]).read()
assert svg.startswith("<svg") and svg.count("<polyline") == 2, svg[:200]
PY
[ $? = 0 ] || fail "simulate --json: $out"
# The engine's costs measured on an H200 (bench/profiles, written by tools/gpu_check.sh's profile):
# at a light load a decode step is about its fitted floor, 5.4 ms.
out="$($bin simulate --profile bench/profiles/h200_llama3_8b_bf16.json --kv-blocks 6000 --rate 2 \
  --requests 100 --prompt-tokens 512 --output-tokens 64 --json 2>&1)" || fail "simulate h200: $out"
python3 - "$out" <<'PY' || fail "simulate h200: $out"
import json, sys
run = json.loads(sys.argv[1])["runs"][0]
assert run["completed"] == 100 and run["rejected"] == 0, run
assert 5.0 <= run["tpot_ms"]["p50"] <= 8.0, run
PY
found="$($bin simulate --model bench/configs/llama3_8b.json --gpu h100 --rate 30 --requests 600 \
  --prompt-tokens 1024 --output-tokens 128 --find-workers --ttft-p99-ms 400 --json)" \
  || fail "find-workers: $found"
n=$(echo "$found" | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["run"]["ttft_ms"]["p99"] <= 400, r; print(r["workers"])')
[ "$n" -gt 1 ] || fail "30 requests/s of 1k-token prompts should need several H100s, got $n"
msg="$($bin simulate --model bench/configs/llama3_8b.json --gpu h100 --rate 30 --requests 600 \
  --prompt-tokens 1024 --output-tokens 128 --workers $((n - 1)) --ttft-p99-ms 400)"
grep -q '^targets    missed' <<<"$msg" || fail "$((n - 1)) workers should miss the target: $msg"
# Split: decode workers sized beside a fixed number of prefill workers, for a TPOT target.
found="$($bin simulate --model bench/configs/llama3_8b.json --gpu h100 --rate 10 --requests 300 \
  --prompt-tokens 2048 --output-tokens 128 --prefill-workers 2 --kv-copy-gbps 1 --find-workers \
  --tpot-p99-ms 30 --json)" || fail "find-workers --prefill-workers: $found"
echo "$found" | python3 -c '
import json, sys
r = json.load(sys.stdin)
assert r["prefill_workers"] == 2 and r["workers"] >= 3, r
assert r["run"]["prefill_handoffs"] == r["run"]["completed"] == 300, r
assert r["run"]["tpot_ms"]["p99"] <= 30, r' || fail "find-workers --prefill-workers: $found"
# A profile of a shape alone (random weights from a config.json), and a device it cannot use.
out="$($bin profile --model $model/config.json --random-weights --threads 1 --kv-cache-mb 4 \
  --context 32 --reps 2 --json)" || fail "profile --random-weights: $out"
echo "$out" | python3 -c 'import json, sys; r = json.load(sys.stdin); assert r["cost"]["token_s"] > 0, r'
set +e
msg="$($bin profile --model $model --device tpu 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q -- '--device must be cpu or gpu' <<<"$msg" || fail "profile --device: $rc $msg"
set -e
# A plan for a rate points at the simulator for tails, with a command that runs.
tails=$($bin plan --model bench/configs/llama3_8b.json --gpu h100 --rate 30 --prompt-tokens 1024 \
  --shared-prefix-tokens 256 --output-tokens 128 | sed -n 's/^tails      for p99 targets: stratactl //p')
[ -n "$tails" ] || fail "plan printed no tails line"
out="$($bin ${tails//T/800} --requests 300 --json)" || fail "the plan's simulate command: $tails: $out"
echo "$out" | python3 -c 'import json, sys; r = json.load(sys.stdin); assert r["workers"] >= 1, r'
# Tenants: 40 fine-tunes on four H100 workers; the plan sizes their deltas.
out="$($bin simulate --model bench/configs/llama3_8b.json --gpu h100 --workers 4 --rate 10 \
  --requests 400 --prompt-tokens 512 --output-tokens 64 --fine-tunes 40 --resident-deltas 8 \
  --cold-fine-tune-blocks 1000 --json)" || fail "simulate fine-tunes: $out"
echo "$out" | python3 -c '
import json, sys
r = json.load(sys.stdin)["runs"][0]
assert r["completed"] == 400 and 8 <= r["delta_loads"] < 400 and r["mean_step_deltas"] > 1, r'
msg="$($bin plan --model bench/configs/llama3_8b.json --gpu h100 --fine-tunes 200 \
  --active-fine-tunes 8)" || fail "plan fine-tunes: $msg"
grep -q -- '--delta_cache_mb=' <<<"$msg" || fail "plan fine-tunes flags: $msg"
set +e
msg="$($bin plan --model bench/configs/llama3_8b.json --fine-tunes 2 --delta-bits 3 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q -- '--delta-bits must be 2, 4 or 8' <<<"$msg" || fail "plan bits: $rc $msg"
msg="$($bin simulate --profile "$tmp/profile.json" --rates 1,x 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q -- '--rates must be' <<<"$msg" || fail "simulate --rates: $rc $msg"
msg="$($bin simulate --profile "$tmp/profile.json" --model $model 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q -- 'give --profile or --model' <<<"$msg" || fail "simulate both: $rc $msg"
msg="$($bin simulate --profile "$tmp/profile.json" --workload nope 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q -- '--workload must be' <<<"$msg" || fail "simulate --workload: $rc $msg"
msg="$($bin simulate --profile /nonexistent.json 2>&1)"; rc=$?
[ $rc = 1 ] && grep -q '/nonexistent.json' <<<"$msg" || fail "simulate no profile: $rc $msg"
msg="$($bin simulate --profile "$tmp/profile.json" --find-workers 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q -- '--ttft-p99-ms' <<<"$msg" || fail "find-workers no target: $rc $msg"
msg="$($bin frobnicate 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q 'unknown command' <<<"$msg" || fail "unknown command: $rc $msg"

# API keys files: a new key passes the coordinator's rules; check prints tenants, never keys, and
# names the field of a bad file (exit 2) or the missing file (exit 1).
key="$($bin keys new --prefix sk-acme-)"
[[ "$key" =~ ^sk-acme-[0-9a-f]{48}$ ]] || fail "keys new: $key"
[ "$key" != "$($bin keys new --prefix sk-acme-)" ] || fail "keys new repeats itself"
cat > "$tmp/keys.json" <<EOF
{"tenants": [{"name": "acme", "keys": ["$key"], "models": ["strata-tiny"], "tokens_per_minute": 9000,
              "scheduling_weight": 2},
             {"name": "ops", "keys": ["sk-ops-0123456789ab"], "models": [], "admin": true}]}
EOF
out="$($bin keys check "$tmp/keys.json")"
grep -q '2 tenants' <<<"$out" && grep -q '^acme .*strata-tiny .* 9000 ' <<<"$out" ||
  fail "keys check: $out"
! grep -q -- "$key" <<<"$out" || fail "keys check printed a key: $out"
json="$($bin keys check "$tmp/keys.json" --json)"
python3 - "$json" <<'PY'
import json, sys
t = json.loads(sys.argv[1])["tenants"]
assert [x["name"] for x in t] == ["acme", "ops"], t
assert t[0]["models"] == ["strata-tiny"] and t[0]["tokens_per_minute"] == 9000, t
assert t[0]["scheduling_weight"] == 2 and t[1]["admin"] is True and t[1]["models"] == [], t
PY
[ $? = 0 ] || fail "keys check --json: $json"
echo '{"tenants": [{"name": "a", "keys": ["short"]}]}' > "$tmp/bad-keys.json"
msg="$($bin keys check "$tmp/bad-keys.json" 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q 'tenants\[0\].keys\[0\]' <<<"$msg" || fail "keys check bad: $rc $msg"
msg="$($bin keys check "$tmp/none.json" 2>&1)"; rc=$?
[ $rc = 1 ] && grep -q 'none.json' <<<"$msg" || fail "keys check missing: $rc $msg"
msg="$($bin keys new --prefix 'has space' 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q -- '--prefix' <<<"$msg" || fail "keys new prefix: $rc $msg"
set -e
echo "stratactl_test: all checks passed"
