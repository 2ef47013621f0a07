#!/usr/bin/env bash
# loadgen against a real coordinator and worker: every request succeeds and the JSON report adds up.
set -euo pipefail
tmp=${TEST_TMPDIR:-$(mktemp -d)}
fail() { echo "FAIL: $*" >&2; tail -20 "$tmp"/*.log >&2; exit 1; }
STRATA_BIN=. STRATA_OUT=$tmp
source tools/local_servers.sh

model=models/strata-tiny/base
strata_worker w1 $model || fail "worker did not start"
wport=$STRATA_PORT
http_port=$(strata_free_port)
strata_coordinator coordinator $model 127.0.0.1:$wport --http_listen=127.0.0.1:$http_port ||
  fail "coordinator did not start"
cport=$STRATA_PORT
sleep 0.5

check() {  # check JSON EXPECTED_REQUESTS MIN_HIT_RATE
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); n = int(sys.argv[2]); hit = float(sys.argv[3])
assert r["requests"] == n and r["ok"] == n and r["failed"] == 0, r
assert r["output_tokens_per_s"] > 0 and r["throughput_rps"] > 0, r
for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
    s = r[k]
    assert 0 < s["p50"] <= s["p90"] <= s["p99"], (k, s)
assert r["ttft_ms"]["p50"] <= r["e2e_ms"]["p50"], r
assert r["cache_hit_rate"] >= hit, r
PY
}
out=$(bench/loadgen --target=127.0.0.1:$cport --workload=shared-prefix --requests=12 --rate=20 \
  --shared_prefix_tokens=200 --prompt_tokens=8:16 --output_tokens=4:8 --json) || fail "loadgen: $out"
check "$out" 12 0.5 || fail "shared-prefix report: $out"
out=$(bench/loadgen --target=127.0.0.1:$cport --workload=multi-turn --requests=8 --turns=4 --rate=10 \
  --prompt_tokens=64 --turn_tokens=16 --output_tokens=4 --think_time_ms=10 --json) || fail "loadgen: $out"
check "$out" 8 0.3 || fail "multi-turn report: $out"
# Through the OpenAI-compatible HTTP API: streamed completions, counts from the usage events; the
# second request of a shared prefix hits the cache.
out=$(bench/loadgen --target=127.0.0.1:$http_port --api=openai --workload=shared-prefix --requests=8 \
  --rate=20 --shared_prefix_tokens=200 --prompt_tokens=8:16 --output_tokens=4:8 --json) ||
  fail "loadgen openai: $out"
check "$out" 8 0.5 || fail "openai report: $out"
# Straight to the worker, with the human table.
out=$(bench/loadgen --target=127.0.0.1:$wport --api=worker --requests=4 --rate=20 --prompt_tokens=32 \
  --output_tokens=4) || fail "loadgen worker: $out"
grep -q '^TTFT ms' <<<"$out" || fail "no table: $out"
grep -q '4 ok, 0 failed' <<<"$out" || fail "worker run: $out"
# Fine-tunes: a worker serving a bundled fine-tune as a delta takes every request on it, and one
# that does not know the id refuses them all (so the id does go out with each request).
cli/stratactl delta compress --base $model --fine-tune models/strata-tiny/ft-man \
  --out "$tmp/man.delta.safetensors" > /dev/null || fail "delta compress"
strata_worker w2 $model --fine_tunes=man="$tmp/man.delta.safetensors" || fail "worker 2 did not start"
w2port=$STRATA_PORT
out=$(bench/loadgen --target=127.0.0.1:$w2port --api=worker --requests=6 --rate=20 --prompt_tokens=16 \
  --output_tokens=4 --fine_tunes=man --json) || fail "loadgen fine-tune: $out"
check "$out" 6 0 || fail "fine-tune report: $out"
set +e
out=$(bench/loadgen --target=127.0.0.1:$wport --api=worker --requests=3 --rate=20 --prompt_tokens=16 \
  --output_tokens=4 --fine_tunes=man --json); rc=$?
set -e
[ $rc = 1 ] && echo "$out" | python3 -c '
import json, sys
r = json.load(sys.stdin)
assert r["failed"] == 3 and "man" in r["errors"][0]["error"], r' || fail "unknown fine-tune: $rc $out"
echo PASS
