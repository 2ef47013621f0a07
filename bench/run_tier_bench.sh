#!/usr/bin/env bash
# Time to first token of a long prompt served from each KV tier against recomputing it, end to end
# through a coordinator, with bench/prefix_restore_bench. For each prompt length a worker starts
# with a device cache just larger than the prompt, a host tier and a disk tier; the warm phase
# measures recompute, device and host (after fillers push the prompt out of the device), then the
# worker is restarted on the same disk file (host and device empty) and the disk phase measures
# the prompt again. The bundled model is copied with a longer context (max_position_embeddings), so
# 16k-token prompts run; only timing is measured, not output quality.
#
#   bench/run_tier_bench.sh [OUT_DIR] [LENGTHS] [REPS]     (defaults: /tmp/strata-tier-bench,
#                                                            1024,4096,16384, 3)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/strata-tier-bench}
LENGTHS=${2:-1024,4096,16384}
REPS=${3:-3}
COMPRESSION=${COMPRESSION:-none}
mkdir -p "$OUT"
bazel build -c opt //worker/server:strata-worker //coordinator:strata-coordinator \
  //bench:prefix_restore_bench >/dev/null
export STRATA_BIN=$PWD/bazel-bin STRATA_OUT=$OUT
# shellcheck source=../tools/local_servers.sh
source tools/local_servers.sh

MODEL=$OUT/strata-tiny-long
strata_long_context_model "$MODEL"
JSON=$OUT/tier_bench.jsonl
: > "$JSON"
BLOCK_KIB=64   # KV bytes of one 16-token block of the bundled model, in KiB

IFS=, read -r -a lengths <<< "$LENGTHS"
for L in "${lengths[@]}"; do
  blocks=$(( L / 16 + 16 ))
  kv_mb=$(( (blocks * BLOCK_KIB + 1023) / 1024 ))
  blocks=$(( kv_mb * 1024 / BLOCK_KIB ))
  filler=$(( (blocks - 4) * 16 ))
  host_mb=$(( kv_mb * 2 * REPS + 64 ))
  disk_mb=$(( host_mb * 4 ))
  rm -f "$OUT/kv-$L"
  worker_flags=(--kv_cache_mb="$kv_mb" --host_cache_mb="$host_mb" --disk_cache_mb="$disk_mb"
    --disk_cache_path="$OUT/kv-$L" --write_through --kv_compression="$COMPRESSION"
    --max_batch_tokens=2048 --threads=2)
  strata_worker "w$L" "$MODEL" "${worker_flags[@]}"
  wport=$STRATA_PORT
  strata_coordinator "c$L" "$MODEL" "127.0.0.1:$wport"
  cport=$STRATA_PORT
  echo "== $L tokens: device ${kv_mb} MiB ($blocks blocks), host ${host_mb} MiB, disk ${disk_mb} MiB"
  bazel-bin/bench/prefix_restore_bench --target="127.0.0.1:$cport" --phase=warm \
    --lengths="$L" --reps="$REPS" --filler_tokens="$filler" --json_out="$JSON"
  # Restart the worker on the same port and disk file: only the disk tier survives.
  kill -TERM "${strata_pids[0]}"; wait "${strata_pids[0]}" 2>/dev/null || true
  strata_pids=("${strata_pids[@]:1}")
  "$STRATA_BIN/worker/server/strata-worker" --model="$MODEL" --model_name=strata-tiny \
    --worker_id="w$L" --listen="127.0.0.1:$wport" --port_file="$OUT/w$L-restart.port" \
    "${worker_flags[@]}" > "$OUT/w$L-restart.log" 2>&1 &
  strata_pids+=($!)
  strata_wait_port "$OUT/w$L-restart.port" >/dev/null
  sleep 2  # the coordinator reconnects and receives the disk tier's inventory
  bazel-bin/bench/prefix_restore_bench --target="127.0.0.1:$cport" --phase=disk \
    --lengths="$L" --reps="$REPS" --json_out="$JSON"
  strata_stop_all
done

# Medians per case and length, and the ratio to recompute.
python3 - "$JSON" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault((r["prompt_tokens"], r["case"]), []).append(r)
print("%7s %-10s %10s %9s %s" % ("tokens", "case", "ttft_ms", "speedup", "served from (tokens: device/host/disk)"))
for (n, case) in sorted(by, key=lambda k: (k[0], ["recompute", "device", "host", "disk"].index(k[1]))):
    rs = by[(n, case)]
    t = statistics.median(r["ttft_ms"] for r in rs)
    base = statistics.median(r["ttft_ms"] for r in by[(n, "recompute")])
    tiers = "/".join(str(statistics.median(r[k] for r in rs)) for k in ("device_tokens", "host_tokens", "disk_tokens"))
    print("%7d %-10s %10.1f %8.1fx %s" % (n, case, t, base / t, tiers))
PY
