#!/usr/bin/env bash
# The capacity simulator against a real cluster on this machine (docs/PERFORMANCE.md, "The
# simulator against a real cluster"): `stratactl profile` measures the CPU engine on the bundled
# model with the workers' settings, then the same workloads (bench/workload.h, same seeds) run
# through a real coordinator and two workers (loadgen) and through `stratactl simulate --profile`,
# (the profile also times requests through that idle cluster: --coordinator),
# and the script prints both side by side: throughput, TTFT and TPOT percentiles, prefix-cache
# hit rate. The last workload spreads requests over the base and the two bundled fine-tunes
# (served as 4-bit deltas; the profile measures one with --delta).
# Usage: bench/run_sim_check.sh [RESULTS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/strata-sim-check}
mkdir -p "$out"
tools/setup.sh
bazel build --noshow_progress //worker/server:strata-worker //coordinator:strata-coordinator \
  //bench:loadgen //cli:stratactl 2>&1 | grep -v 'INFO:\|Loading\|Analyzing' || true
bin=$(bazel info bazel-bin 2>/dev/null)
model=$PWD/models/strata-tiny/base
STRATA_BIN=$bin STRATA_OUT=$out
source tools/local_servers.sh
kv_mb=16
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" \
  | tee "$out/summary.txt"

# The bundled fine-tunes as 4-bit deltas, served by both workers.
mkdir -p "$out/deltas"
for ft in c-headers man; do
  "$bin/cli/stratactl" delta compress --base "$model" --fine-tune "$PWD/models/strata-tiny/ft-$ft" \
    --out "$out/deltas/$ft.delta.safetensors" > /dev/null
done
strata_worker w1 "$model" --kv_cache_mb=$kv_mb --fine_tune_dir="$out/deltas"
w1=$STRATA_PORT
strata_worker w2 "$model" --kv_cache_mb=$kv_mb --fine_tune_dir="$out/deltas"
w2=$STRATA_PORT
strata_coordinator c "$model" "127.0.0.1:$w1,127.0.0.1:$w2"
c=$STRATA_PORT
sleep 1

# The engine as the workers run it (one compute thread, the same cache and batch limits), and
# the serving path's own costs measured through the idle cluster.
"$bin/cli/stratactl" profile --model "$model" --threads 1 --kv-cache-mb $kv_mb \
  --max-batch-tokens 512 --reps 9 --coordinator 127.0.0.1:$c \
  --delta "$out/deltas/c-headers.delta.safetensors" --out "$out/profile.json" \
  | tee -a "$out/summary.txt"

# NAME RATES FLAGS...: loadgen at each rate (its own cache salt), then the simulator over the same
# rates; the flags are spelled as loadgen takes them and translated for stratactl.
compare() {
  local name=$1 rates=$2; shift 2
  local sim_flags=()
  for f in "$@"; do
    local k=${f%%=*} v=${f#*=}
    # loadgen names the fine-tunes; the simulator counts them.
    [ "$k" = --fine_tunes ] && v=$(echo "$v" | tr , '\n' | wc -l)
    sim_flags+=("$(echo "$k" | tr _ -)=$v")
  done
  for r in ${rates//,/ }; do
    "$bin/bench/loadgen" --target=127.0.0.1:$c "$@" --rate="$r" --cache_salt="$name-$r" \
      --label="$name@$r" --json_out="$out/$name-real-$r.json" > /dev/null
  done
  "$bin/cli/stratactl" simulate --profile "$out/profile.json" --workers 2 --rates "$rates" \
    "${sim_flags[@]}" --json > "$out/$name-sim.json"
  python3 - "$out" "$name" "$rates" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
out, name, rates = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
sim = {float(r["rate_per_s"]): r for r in json.load(open(f"{out}/{name}-sim.json"))["runs"]}
print(f"\n{name}: real cluster (2 workers, 1 thread each) / simulated")
print(f"{'rate':>6} {'done/s':>13} {'TTFT p50 ms':>15} {'TTFT p99 ms':>15} "
      f"{'TPOT p50 ms':>13} {'TPOT p99 ms':>13} {'hit rate':>13}")
for r in rates:
    real = json.load(open(f"{out}/{name}-real-{r}.json"))
    s = sim[float(r)]
    print(f"{r:>6} {real['throughput_rps']:6.2f}/{s['throughput_rps']:<6.2f} "
          f"{real['ttft_ms']['p50']:7.1f}/{s['ttft_ms']['p50']:<7.1f} "
          f"{real['ttft_ms']['p99']:7.1f}/{s['ttft_ms']['p99']:<7.1f} "
          f"{real['tpot_ms']['p50']:6.2f}/{s['tpot_ms']['p50']:<6.2f} "
          f"{real['tpot_ms']['p99']:6.2f}/{s['tpot_ms']['p99']:<6.2f} "
          f"{real['cache_hit_rate']:6.3f}/{s['cache_hit_rate']:<6.3f}")
EOF
}

compare random 4,8,16,24 --workload=random --requests=120 --prompt_tokens=128 \
  --output_tokens=32
compare multi-turn 0.5,1,2 --workload=multi-turn --requests=96 --turns=4 --prompt_tokens=400 \
  --turn_tokens=40 --output_tokens=16 --think_time_ms=300
compare shared-prefix 4,8,16 --workload=shared-prefix --requests=120 --shared_prefix_tokens=1000 \
  --shared_fraction=0.9 --prompt_tokens=16:64 --output_tokens=16
compare fine-tunes 4,8,16 --workload=random --requests=120 --prompt_tokens=128 --output_tokens=32 \
  --fine_tunes=c-headers,man --fine_tune_zipf=1 --base_fraction=0.34
strata_stop_all
