#!/usr/bin/env bash
# stratactl's cluster commands against a real coordinator and worker (processes on loopback ports
# they pick themselves), as an operator runs them: output and exit codes checked.
set -euo pipefail
ctl=cli/stratactl
model=models/strata-tiny/base
tmp=${TEST_TMPDIR:-$(mktemp -d)}
fail() { echo "FAIL: $*" >&2; for f in "$tmp"/*.log; do echo "== $f"; tail -20 "$f"; done >&2; exit 1; }
STRATA_BIN=. STRATA_OUT=$tmp
source tools/local_servers.sh

# The worker also serves a fine-tune, compressed here as an operator would.
mkdir -p $tmp/fine-tunes
$ctl delta compress --base $model --fine-tune models/strata-tiny/ft-c-headers \
  --out $tmp/fine-tunes/c-headers.delta.safetensors > /dev/null || fail "delta compress"
strata_worker w1 $model --fine_tune_dir=$tmp/fine-tunes || fail "worker did not start"
wport=$STRATA_PORT
strata_coordinator coordinator $model 127.0.0.1:$wport || fail "coordinator did not start"
export STRATA_COORDINATOR=127.0.0.1:$STRATA_PORT
for _ in $(seq 200); do
  $ctl status --json 2>/dev/null | grep -q WORKER_STATE_SERVING && break
  sleep 0.05
done

# generate streams text; --json gives the whole result; the model is found when there is one.
text="$($ctl generate --prompt 'import os' --max-tokens 12 --seed 3 --ignore-eos)"
[ -n "$text" ] || fail "generate printed nothing"
json="$($ctl generate --prompt 'import os' --max-tokens 12 --seed 3 --ignore-eos --json)"
python3 - "$json" "$text" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
assert r["model"] == "strata-tiny", r
assert len(r["token_ids"]) == 12, r
assert r["finish_reason"] == "length", r
assert r["seed"] == 3, r
assert int(r["usage"]["num_completion_tokens"]) == 12, r
assert r["text"] + "\n" == sys.argv[2] + "\n", (r["text"], sys.argv[2])
PY

# Structured output: the text follows the constraint, which ends the generation; a bad one exits 1
# naming it.
digits="$($ctl generate --prompt 'x = ' --max-tokens 20 --seed 1 --regex '[0-9]{4}')"
[[ "$digits" =~ ^[0-9]{4}$ ]] || fail "--regex gave '$digits'"
picked="$($ctl generate --prompt 'x = ' --max-tokens 20 --seed 2 --choice yes --choice no --json)"
python3 - "$picked" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
assert r["text"] in ("yes", "no"), r
assert r["finish_reason"] == "grammar_end", r
PY
set +e
msg="$($ctl generate --prompt x --json-schema '{"not": {"type": "integer"}}' 2>&1)"; rc=$?
set -e
[ $rc != 0 ] && grep -q '"not"' <<<"$msg" || fail "unenforceable schema: $rc $msg"

# --fine-tune picks the fine-tune: greedy text differs from the base's; an unknown one exits 1.
base="$($ctl generate --prompt '#include <' --max-tokens 12 --temperature 0 --ignore-eos)"
tuned="$($ctl generate --prompt '#include <' --max-tokens 12 --temperature 0 --ignore-eos --fine-tune c-headers)"
[ -n "$tuned" ] && [ "$tuned" != "$base" ] || fail "fine-tune gave the base's text: $tuned"
set +e
msg="$($ctl generate --prompt x --fine-tune nope 2>&1)"; rc=$?
set -e
[ $rc = 1 ] && grep -q 'fine_tune_id "nope" is not registered' <<<"$msg" || fail "unknown fine-tune: $rc $msg"

# status: a table by default, the cluster as JSON for scripts.
table="$($ctl status)"
grep -q '^MODEL ' <<<"$table" || fail "no model table: $table"
echo "$table" | grep -E '^strata-tiny +1 +2048 +2048 +c-headers' > /dev/null || fail "no fine-tunes: $table"
echo "$table" | grep -E '^w1 +127\.0\.0\.1:[0-9]+ +serving +strata-tiny +mixed +in\+out/tcp:[0-9]+ +1 ' > /dev/null || fail "no worker row: $table"
$ctl status --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
w = s["cluster"]["workers"]
assert len(w) == 1 and w[0]["state"] == "WORKER_STATE_SERVING", s
assert w[0]["info"]["worker_id"] == "w1", s
assert s["models"]["models"][0]["name"] == "strata-tiny", s
'

# drain by worker id, then resume by address.
grep -q "is draining" <<<"$($ctl drain w1 --wait)" || fail "drain"
$ctl generate --prompt 'x' --max-tokens 2 > "$tmp/out" 2> "$tmp/err" && fail "generate succeeded while the only worker drains"
grep -q 'UNAVAILABLE\|can take\|unavailable\|draining' "$tmp/err" || fail "unhelpful error: $(cat "$tmp/err")"
grep -q WORKER_STATE_SERVING <<<"$($ctl drain "127.0.0.1:$wport" --resume --json)" || fail "resume"
$ctl generate --prompt 'x' --max-tokens 2 > /dev/null || fail "generate after resume"

# A client that disappears mid-stream (kill -9) frees its sequence on the worker.
running() {
  $ctl status --json | python3 -c '
import json, sys
w = json.load(sys.stdin)["cluster"]["workers"][0]
print(w.get("load", {}).get("num_running_sequences", 0))'
}
$ctl generate --prompt 'while True:' --max-tokens 1900 --ignore-eos > /dev/null &
gpid=$!
for _ in $(seq 200); do [ "$(running)" -gt 0 ] && break; sleep 0.05; done
[ "$(running)" -gt 0 ] || fail "the long generation never ran"
kill -9 $gpid
wait $gpid 2>/dev/null || true
for _ in $(seq 200); do [ "$(running)" = 0 ] && break; sleep 0.05; done
[ "$(running)" = 0 ] || fail "the killed client's sequence is still running"

# Errors name what is wrong and exit non-zero.
if $ctl generate --model nope --prompt x 2> "$tmp/err"; then fail "unknown model accepted"; fi
grep -q 'model "nope"' "$tmp/err" || fail "unknown model error: $(cat "$tmp/err")"
if $ctl drain nobody 2> "$tmp/err"; then fail "unknown worker accepted"; fi
grep -q 'nobody' "$tmp/err" || fail "unknown worker error: $(cat "$tmp/err")"
if $ctl status --coordinator 127.0.0.1:1 2> "$tmp/err"; then fail "unreachable coordinator"; fi
grep -q 'unreachable' "$tmp/err" || fail "unreachable error: $(cat "$tmp/err")"

# A coordinator that asks for API keys: stratactl sends $STRATA_API_KEY; status wants an admin's.
cat > $tmp/keys.json <<'JSON'
{"tenants": [{"name": "ops", "keys": ["sk-ops-0123456789ab"], "admin": true},
             {"name": "app", "keys": ["sk-app-0123456789ab"], "models": ["strata-tiny"],
              "tokens_per_minute": 1000, "scheduling_weight": 2}]}
JSON
strata_coordinator keyed $model 127.0.0.1:$wport --api_keys_file=$tmp/keys.json ||
  fail "keyed coordinator did not start"
keyed=127.0.0.1:$STRATA_PORT
if STRATA_API_KEY= $ctl status --coordinator $keyed 2> "$tmp/err"; then fail "status without a key"; fi
grep -q 'no API key' "$tmp/err" || fail "keyless status error: $(cat "$tmp/err")"
if STRATA_API_KEY=sk-app-0123456789ab $ctl status --coordinator $keyed 2> "$tmp/err"; then
  fail "status with a tenant's key that is not an admin's"
fi
grep -q 'admin' "$tmp/err" || fail "non-admin status error: $(cat "$tmp/err")"
for _ in $(seq 200); do
  STRATA_API_KEY=sk-ops-0123456789ab $ctl status --coordinator $keyed --json 2>/dev/null |
    grep -q WORKER_STATE_SERVING && break
  sleep 0.05
done
grep -q WORKER_STATE_SERVING <<<"$(STRATA_API_KEY=sk-ops-0123456789ab $ctl status --coordinator $keyed --json)" ||
  fail "admin status"
out="$(STRATA_API_KEY=sk-app-0123456789ab $ctl generate --coordinator $keyed --prompt 'x' --max-tokens 3 --ignore-eos --json)" ||
  fail "generate with a tenant's key"
grep -q '"finish_reason": *"length"' <<<"$out" || fail "keyed generate: $out"
if STRATA_API_KEY=sk-app-0123456789ab $ctl generate --coordinator $keyed --fine-tune c-headers \
  --prompt x --max-tokens 2 2> "$tmp/err"; then
  fail "a fine-tune the tenant may not use"
fi
grep -q 'may not use' "$tmp/err" || fail "fine-tune refusal: $(cat "$tmp/err")"
# The admin's status lists the tenants: limits, and the tokens left in the app's bucket (refilled
# at 1000 a minute, so back at or near full by now: only its bounds are certain).
status="$(STRATA_API_KEY=sk-ops-0123456789ab $ctl status --coordinator $keyed)"
grep -qE '^ops \(admin\) +0/- +- +- +- +- +1 +0 +\(all\)' <<<"$status" || fail "status tenants (ops): $status"
left="$(awk '$1 == "app" {print $6}' <<<"$status")"
grep -qE '^app +0/- +- +- +1000 +[0-9]+ +2 +0 +strata-tiny' <<<"$status" && [ "$left" -le 1000 ] &&
  [ "$left" -ge 990 ] ||
  fail "status tenants (app): $status"
echo PASS
