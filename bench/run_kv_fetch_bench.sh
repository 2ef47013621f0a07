#!/usr/bin/env bash
# Time to first token of a long prompt that one worker copies from another (its KV transfer port)
# against computing it, end to end through a coordinator, with bench/prefix_restore_bench --phase
# copy: two workers on loopback, each prompt sent cold (computed on one worker), then with that
# worker drained (the other copies the prompt's blocks from it), then again with both serving (a
# device-cache hit). The bundled model is copied with a longer context so that 16k-token prompts
# run; only timing is measured. Each worker has --threads=1, as on a 2-core machine.
#
#   bench/run_kv_fetch_bench.sh [OUT_DIR] [LENGTHS] [REPS]     (defaults: /tmp/strata-kv-fetch-bench,
#                                                               1024,4096,16384, 3)
# DISK=1: the workers' device caches hold two prompts, with a 16 MiB host tier and a disk tier
# under them (written through, so that nothing pressed out of host memory misses the disk; room
# for every prompt and its fillers), and filler prompts (twice the longest length, twice over,
# with the other worker drained) push each prompt onto the holder's disk before the copy (case
# copied-disk). TLS=1: every connection over TLS (the copies then over gRPC with TLS).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/strata-kv-fetch-bench}
LENGTHS=${2:-1024,4096,16384}
REPS=${3:-3}
mkdir -p "$OUT"
bazel build -c opt //worker/server:strata-worker //coordinator:strata-coordinator \
  //bench:prefix_restore_bench //cli:stratactl >/dev/null
export STRATA_BIN=$PWD/bazel-bin STRATA_OUT=$OUT
# shellcheck source=../tools/local_servers.sh
source tools/local_servers.sh

MODEL=$OUT/strata-tiny-long
strata_long_context_model "$MODEL"
JSON=$OUT/kv_fetch_bench.jsonl
: > "$JSON"
BLOCK_KIB=64   # KV bytes of one 16-token block of the bundled model, in KiB

IFS=, read -r -a lengths <<< "$LENGTHS"
max=0
for L in "${lengths[@]}"; do (( L > max )) && max=$L; done
# Room for every prompt of the run on each worker, so nothing is evicted.
kv_mb=$(( ( (max / 16 + 16) * BLOCK_KIB * REPS * ${#lengths[@]} + 1023) / 1024 + 16 ))
worker_flags=(--kv_cache_mb="$kv_mb" --max_batch_tokens=2048)
filler=()
disk() { :; }
if [ "${DISK:-0}" = 1 ]; then
  rm -f "$OUT"/kv-w0 "$OUT"/kv-w1  # fresh disk tiers
  disk() { echo "--disk_cache_path=$OUT/kv-$1"; }
  kv_mb=$(( 2 * (max / 16 + 32) * BLOCK_KIB / 1024 + 4 ))  # two prompts: a copy takes half
  worker_flags=(--kv_cache_mb="$kv_mb" --max_batch_tokens=2048 --host_cache_mb=16 --write_through
                --disk_cache_mb=$(( (max / 16 + 16) * 72 * REPS * ${#lengths[@]} * 5 / 1024 + 64 )))
  filler=(--filler_tokens=$(( 2 * max )))
fi
# WORKER_FLAGS: more worker flags (e.g. --kv_transfer_listen=off: copies over gRPC only).
# shellcheck disable=SC2206
worker_flags+=(${WORKER_FLAGS:-})
# TLS=1: every connection over TLS (docs/TLS.md), with a certificate tools/make_dev_certs.sh makes;
# the workers then copy over gRPC with TLS (no transfer port).
tls_flags=()
client_tls=()
if [ "${TLS:-0}" = 1 ]; then
  tools/make_dev_certs.sh "$OUT/certs" >/dev/null
  tls_flags=(--tls_cert="$OUT/certs/tls.crt" --tls_key="$OUT/certs/tls.key"
             --tls_ca="$OUT/certs/ca.crt" --tls_server_name=strata.internal)
  client_tls=(--tls_ca="$OUT/certs/ca.crt" --tls_server_name=strata.internal)
  export STRATA_TLS_CA=$OUT/certs/ca.crt STRATA_TLS_SERVER_NAME=strata.internal  # stratactl's
  worker_flags+=("${tls_flags[@]}")
fi
# shellcheck disable=SC2046
strata_worker w0 "$MODEL" "${worker_flags[@]}" $(disk w0)
w0=$STRATA_PORT
# shellcheck disable=SC2046
strata_worker w1 "$MODEL" "${worker_flags[@]}" $(disk w1)
w1=$STRATA_PORT
strata_coordinator c "$MODEL" "127.0.0.1:$w0,127.0.0.1:$w1" "${tls_flags[@]}"
cport=$STRATA_PORT
strata_wait_serving "$cport" 2
echo "== two workers, ${kv_mb} MiB of device KV cache each"
bazel-bin/bench/prefix_restore_bench --target="127.0.0.1:$cport" --phase=copy \
  --lengths="$LENGTHS" --reps="$REPS" --json_out="$JSON" "${filler[@]}" "${client_tls[@]}"
strata_stop_all

# Medians per case and length, and the ratio to recompute.
python3 - "$JSON" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault((r["prompt_tokens"], r["case"]), []).append(r)
print("%7s %-10s %10s %9s %s" % ("tokens", "case", "ttft_ms", "speedup", "cached tokens (device)"))
for (n, case) in sorted(by, key=lambda k: (k[0], ["recompute", "copied", "copied-disk", "device"].index(k[1]))):
    rs = by[(n, case)]
    t = statistics.median(r["ttft_ms"] for r in rs)
    base = statistics.median(r["ttft_ms"] for r in by[(n, "recompute")])
    print("%7d %-10s %10.1f %8.1fx %d" % (n, case, t, base / t, statistics.median(r["device_tokens"] for r in rs)))
PY
