#!/usr/bin/env bash
# Disaggregated serving against mixed workers, on the bundled model, all processes on this machine:
# two workers (one thread each) behind a coordinator, either both mixed (each computes prompts and
# decodes; KV-aware routing) or one --role=prefill and one --role=decode (long prompts are computed
# on the first with their first token, and the second copies their KV blocks and decodes). The
# same open-loop workload on each, long random prompts and long outputs, at each rate: TTFT, TPOT,
# inter-token latency (ITL, whose tail shows decode steps stalled behind prompts) and throughput.
# Then `stratactl profile` measures the engine as the workers run it and `stratactl simulate`
# replays the same workload through each layout (--prefill-workers), for comparison.
#
#   bench/run_disagg_bench.sh [OUT_DIR] [RATES] [REQUESTS]
#       (defaults: /tmp/strata-disagg-bench, 0.5,1,1.5, 60)
# Environment: PROMPT (1536:2560), OUTPUT (256), BATCH_TOKENS (512, the workers' step budget),
# QUEUE_TOKENS (0: the coordinator's --disaggregate_max_prefill_queue_tokens), LAYOUTS ("mixed
# disaggregated": which to run; a layout run before keeps its reports in OUT_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/strata-disagg-bench}
RATES=${2:-0.5,1,1.5}
REQUESTS=${3:-60}
PROMPT=${PROMPT:-1536:2560}
OUTPUT=${OUTPUT:-256}
BATCH_TOKENS=${BATCH_TOKENS:-512}
QUEUE_TOKENS=${QUEUE_TOKENS:-0}
LAYOUTS=${LAYOUTS:-mixed disaggregated}
mkdir -p "$OUT"
tools/setup.sh
bazel build -c opt --noshow_progress //worker/server:strata-worker //coordinator:strata-coordinator \
  //bench:loadgen //cli:stratactl 2>&1 | grep -v 'INFO:\|Loading\|Analyzing' || true
export STRATA_BIN=$PWD/bazel-bin STRATA_OUT=$OUT
# shellcheck source=../tools/local_servers.sh
source tools/local_servers.sh
MODEL=$OUT/strata-tiny-long
strata_long_context_model "$MODEL"
summary=$OUT/summary.txt
: > "$summary"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" | tee -a "$summary"
echo "workload: prompts $PROMPT tokens (random ids), outputs $OUTPUT tokens, $REQUESTS requests a run" | tee -a "$summary"

IFS=, read -r -a rates <<< "$RATES"
echo "disaggregated: --disaggregate_max_prefill_queue_tokens=$QUEUE_TOKENS" | tee -a "$summary"
for layout in $LAYOUTS; do
  if [ "$layout" = mixed ]; then roles=(mixed mixed); else roles=(prefill decode); fi
  workers=()
  for i in 0 1; do
    strata_worker "$layout-w$i" "$MODEL" --role="${roles[$i]}" --kv_cache_mb=512 \
      --max_batch_tokens="$BATCH_TOKENS"
    workers+=("127.0.0.1:$STRATA_PORT")
  done
  strata_coordinator "$layout-c" "$MODEL" "$(IFS=,; echo "${workers[*]}")" \
    --disaggregate_min_uncached_tokens=512 --disaggregate_max_prefill_queue_tokens="$QUEUE_TOKENS"
  port=$STRATA_PORT
  strata_wait_serving "$port" 2
  for rate in "${rates[@]}"; do
    bazel-bin/bench/loadgen --target="127.0.0.1:$port" --workload=random --requests="$REQUESTS" \
      --rate="$rate" --prompt_tokens="$PROMPT" --output_tokens="$OUTPUT" \
      --cache_salt="$layout-$rate" --seed=7 --label="$layout@$rate" \
      --json_out="$OUT/$layout-$rate.json" | tee -a "$summary"
  done
  strata_stop_all
done

# The simulator over the same workload (the same generator and seed), from the engine measured.
bazel-bin/cli/stratactl profile --model "$MODEL" --threads 1 --kv-cache-mb 512 \
  --max-batch-tokens "$BATCH_TOKENS" --out "$OUT/profile.json" > /dev/null
for layout in mixed disaggregated; do
  bazel-bin/cli/stratactl simulate --profile "$OUT/profile.json" --workers 2 \
    --prefill-workers "$([ $layout = mixed ] && echo 0 || echo 1)" --rates "$RATES" \
    --requests "$REQUESTS" --prompt-tokens "$PROMPT" --output-tokens "$OUTPUT" --seed 7 \
    --kv-copy-gbps 0.7 --kv-blocks 8192 --disaggregate-max-prefill-queue-tokens "$QUEUE_TOKENS" \
    --json > "$OUT/$layout-sim.json"
done

python3 - "$OUT" "$RATES" <<'PY' | tee -a "$summary"
import json, sys
out, rates = sys.argv[1], sys.argv[2].split(",")
sim = {}
for layout in ("mixed", "disaggregated"):
    for r in json.load(open("%s/%s-sim.json" % (out, layout)))["runs"]:
        sim[(layout, float(r["rate_per_s"]))] = r
print("%-14s %5s %8s %8s %8s %8s %8s %8s %8s %9s" % ("layout", "rate", "ttft p50", "ttft p99",
      "tpot p50", "tpot p99", "itl p50", "itl p90", "itl p99", "out tok/s"))
for rate in rates:
    for layout in ("mixed", "disaggregated"):
        r = json.load(open("%s/%s-%s.json" % (out, layout, rate)))
        print("%-14s %5s %8.0f %8.0f %8.1f %8.1f %8.1f %8.1f %8.1f %9.1f" % (
            layout, rate, r["ttft_ms"]["p50"], r["ttft_ms"]["p99"], r["tpot_ms"]["p50"],
            r["tpot_ms"]["p99"], r["itl_ms"]["p50"], r["itl_ms"]["p90"], r["itl_ms"]["p99"],
            r["output_tokens_per_s"]))
print("\nsimulated (stratactl simulate --profile, 0.7 GB/s copies)")
print("%-14s %5s %8s %8s %8s %8s %9s" % ("layout", "rate", "ttft p50", "ttft p99", "tpot p50",
      "tpot p99", "out tok/s"))
for rate in rates:
    for layout in ("mixed", "disaggregated"):
        s = sim[(layout, float(rate))]
        print("%-14s %5s %8.0f %8.0f %8.2f %8.2f %9.1f" % (layout, rate, s["ttft_ms"]["p50"],
              s["ttft_ms"]["p99"], s["tpot_ms"]["p50"], s["tpot_ms"]["p99"], s["output_tokens_per_s"]))
PY
