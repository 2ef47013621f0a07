#!/usr/bin/env bash
# Cluster benchmarks recorded in docs/PERFORMANCE.md, on the bundled model, all processes on this
# machine:
#   1. KV-aware vs round-robin routing: four workers (32 MiB of KV each: 8k tokens), one
#      coordinator of each kind over the same workers, the same workloads (separate cache salts, so
#      neither run sees the other's cache): multi-turn conversations, one hot 1,000-token system
#      prompt, and 16 tenants' 1,000-token system prompts (twice what one worker's cache holds).
#   2. The coordinator's added latency: one worker, the same workload sent straight to the worker
#      (Worker.Submit), through a coordinator (Serving.Generate) and through its OpenAI-compatible
#      HTTP API (streamed /v1/completions), and through a coordinator with API keys (a tenant's
#      limits, metrics and usage counted on every call), alternating, several rounds.
#   3. KV tiers: multi-turn conversations whose KV is many times one worker's device cache (8 MiB:
#      2k tokens), on a worker with the device cache only, one with host (64 MiB) and disk
#      (256 MiB) tiers below it, and one with a 16 MiB host tier only, raw and INT8; each worker's
#      tier counters (prefetch accuracy, coverage) after its run.
#   4. Bursts sharing prefixes: 64 requests at once over 8 cold 1,000-token prefixes, on one worker
#      with a step budget of 2,048 or 8,192 tokens (--max_batch_tokens), each with
#      --inflight_prefill_min_tokens=0 (every request admitted computes its prefix, even one another
#      request is computing in the same step) and the default 32 (it waits a step for those
#      blocks); three rounds each, alternating.
#   5. Fair sharing between tenants: a coordinator with API keys over one worker (at most 8
#      sequences running); tenant "heavy" sends a backlog of 320 requests at once, tenant "light"
#      20 requests at 4 a second starting a second later; the worker with --fair_share (default)
#      and without; three rounds each, alternating. Reports each tenant's latencies. Then, on the
#      fair worker, tenants of scheduling_weight 2 and 1 each sending 160 requests at once.
#   6. Fair cache eviction: a coordinator with API keys over one worker with 64 MiB of KV (16k
#      tokens); tenant "flood" sends unique 1,000-token prompts at 10 a second, tenant "steady" 12
#      requests at 0.5 a second, each its 1,000-token system prompt plus a question; workers with
#      --fair_cache_eviction (the default) and without; three rounds each, alternating. Reports
#      steady's prefix-cache hit rate and latencies.
#   6b (cache-tiers). The same through the host tier: 8 MiB of device KV (128 blocks) over a
#      64 MiB host tier; "steady" asks 16 times at 0.65 a second from four 1,000-token prompts
#      (about 250 blocks: more than its share of the device, so its overflow lives in host).
# Usage: bench/run_cluster_bench.sh [RESULTS_DIR]
#          [routing|overhead|tiers|bursts|fairness|cache|cache-tiers|all]
# (JSON per run, plus summary.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/strata-cluster-bench}
part=${2:-all}
mkdir -p "$out"
tools/setup.sh
bazel build --noshow_progress //worker/server:strata-worker //coordinator:strata-coordinator \
  //bench:loadgen //cli:stratactl 2>&1 | grep -v 'INFO:\|Loading\|Analyzing' || true
bin=$(bazel info bazel-bin 2>/dev/null)
model=$PWD/models/strata-tiny/base
STRATA_BIN=$bin STRATA_OUT=$out
source tools/local_servers.sh
loadgen() { "$bin/bench/loadgen" "$@"; }
summary="$out/summary.txt"
: > "$summary"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" | tee -a "$summary"

# 1. Routing.
if [ "$part" = all ] || [ "$part" = routing ]; then
workers=()
for i in 1 2 3 4; do
  strata_worker "w$i" "$model" --kv_cache_mb=32
  workers+=("127.0.0.1:$STRATA_PORT")
done
wlist=$(IFS=,; echo "${workers[*]}")
strata_coordinator kv "$model" "$wlist"
kv=$STRATA_PORT
strata_coordinator rr "$model" "$wlist" --routing=round_robin
rr=$STRATA_PORT
sleep 1
multi=(--workload=multi-turn --requests=192 --turns=6 --rate=1.5 --prompt_tokens=600 --turn_tokens=48
       --output_tokens=16 --think_time_ms=300)
shared=(--workload=shared-prefix --requests=300 --rate=6 --shared_prefix_tokens=1000 --shared_fraction=0.9
        --prompt_tokens=16:64 --output_tokens=16)
tenants=(--workload=shared-prefix --requests=240 --rate=3 --shared_prefix_tokens=1000 --shared_prefixes=16
         --shared_fraction=0.9 --prompt_tokens=16:64 --output_tokens=16)
for policy in kv rr; do
  port=$([ $policy = kv ] && echo "$kv" || echo "$rr")
  loadgen --target=127.0.0.1:$port "${multi[@]}" --cache_salt="multi-$policy" --label="multi-turn/$policy" \
    --json_out="$out/multi-$policy.json" | tee -a "$summary"
  loadgen --target=127.0.0.1:$port "${shared[@]}" --cache_salt="shared-$policy" --label="shared-prefix/$policy" \
    --json_out="$out/shared-$policy.json" | tee -a "$summary"
  loadgen --target=127.0.0.1:$port "${tenants[@]}" --cache_salt="tenants-$policy" --label="16-tenant-prefixes/$policy" \
    --json_out="$out/tenants-$policy.json" | tee -a "$summary"
done
strata_stop_all
fi

# 2. Coordinator overhead. Each run has its own cache salt, so no run hits another's cache.
if [ "$part" = all ] || [ "$part" = overhead ]; then
strata_worker solo "$model" --kv_cache_mb=32
w=$STRATA_PORT
http_port=$(strata_free_port)
strata_coordinator solo-coordinator "$model" "127.0.0.1:$w" --http_listen=127.0.0.1:$http_port
c=$STRATA_PORT
# And one with API keys (a tenant's limits, metrics and usage on every call).
cat > "$out/overhead-keys.json" <<'KEYS'
{"tenants": [{"name": "bench", "keys": ["sk-bench-overhead-0"], "max_concurrent_requests": 1000,
              "requests_per_minute": 100000, "tokens_per_minute": 100000000}]}
KEYS
strata_coordinator keyed-coordinator "$model" "127.0.0.1:$w" --api_keys_file="$out/overhead-keys.json"
ck=$STRATA_PORT
# And one writing an access log (a JSON line per call).
rm -f "$out/overhead-access.log"
strata_coordinator logged-coordinator "$model" "127.0.0.1:$w" --access_log="$out/overhead-access.log"
cl=$STRATA_PORT
sleep 1
plain=(--workload=random --requests=150 --rate=8 --prompt_tokens=64 --output_tokens=8)
for round in 1 2 3; do
  loadgen --target=127.0.0.1:$w --api=worker "${plain[@]}" --seed=$round --label="direct/round$round" \
    --cache_salt="direct-$round" --json_out="$out/direct-$round.json" | tee -a "$summary"
  loadgen --target=127.0.0.1:$c "${plain[@]}" --seed=$round --label="coordinator/round$round" \
    --cache_salt="coordinator-$round" --json_out="$out/coordinator-$round.json" | tee -a "$summary"
  loadgen --target=127.0.0.1:$http_port --api=openai "${plain[@]}" --seed=$round \
    --label="openai-http/round$round" --cache_salt="openai-$round" \
    --json_out="$out/openai-$round.json" | tee -a "$summary"
  loadgen --target=127.0.0.1:$ck "${plain[@]}" --seed=$round --label="keyed-coordinator/round$round" \
    --api_key=sk-bench-overhead-0 --cache_salt="keyed-$round" \
    --json_out="$out/keyed-$round.json" | tee -a "$summary"
  loadgen --target=127.0.0.1:$cl "${plain[@]}" --seed=$round --label="logged-coordinator/round$round" \
    --cache_salt="logged-$round" --json_out="$out/logged-$round.json" | tee -a "$summary"
done
echo "access log: $(wc -l < "$out/overhead-access.log") lines" | tee -a "$summary"
strata_stop_all
fi
# 3. KV tiers.
if [ "$part" = all ] || [ "$part" = tiers ]; then
convs=(--workload=multi-turn --requests=144 --turns=6 --rate=1 --prompt_tokens=600 --turn_tokens=48
       --output_tokens=16 --think_time_ms=2000)
for setup in device-only tiered small-host small-host-int8; do
  flags=(--kv_cache_mb=8 --threads=2)
  rm -f "$out/tiers-kv"
  case $setup in
    tiered) flags+=(--host_cache_mb=64 --disk_cache_mb=256 --disk_cache_path="$out/tiers-kv") ;;
    small-host) flags+=(--host_cache_mb=16) ;;
    small-host-int8) flags+=(--host_cache_mb=16 --kv_compression=int8) ;;
  esac
  strata_worker "tiers-$setup" "$model" "${flags[@]}"
  w=$STRATA_PORT
  strata_coordinator "tiers-$setup-coordinator" "$model" "127.0.0.1:$w"
  c=$STRATA_PORT
  sleep 1
  loadgen --target=127.0.0.1:$c "${convs[@]}" --label="multi-turn/$setup" \
    --json_out="$out/tiers-$setup.json" | tee -a "$summary"
  "$bin/cli/stratactl" status --coordinator "127.0.0.1:$c" | tee -a "$summary"
  "$bin/cli/stratactl" status --coordinator "127.0.0.1:$c" --json > "$out/tiers-$setup-status.json"
  strata_stop_all
done
fi
# 4. Bursts sharing prefixes.
if [ "$part" = all ] || [ "$part" = bursts ]; then
burst=(--workload=shared-prefix --requests=64 --rate=10000 --shared_prefix_tokens=1000 --shared_prefixes=8
       --shared_fraction=1 --prompt_tokens=16:64 --output_tokens=16)
for budget in 2048 8192; do
  for min in 0 32; do
    strata_worker "burst-$budget-$min" "$model" --kv_cache_mb=64 --threads=2 \
      --max_batch_tokens=$budget --inflight_prefill_min_tokens=$min
    eval "w_${budget}_$min=$STRATA_PORT"
  done
done
sleep 1
for budget in 2048 8192; do
  for round in 1 2 3; do
    for min in 0 32; do
      w=$(eval echo "\$w_${budget}_$min")
      loadgen --target=127.0.0.1:$w --api=worker "${burst[@]}" --seed=$round --cache_salt="burst-$round" \
        --label="burst/budget$budget/min$min/round$round" --json_out="$out/burst-$budget-$min-$round.json" |
        tee -a "$summary"
    done
  done
done
strata_stop_all
fi
# 6. Fair cache eviction: NAME, the worker's KV cache flags, then the steady tenant's prompts
# (of 1,000 tokens each), its requests and their rate; the flood sends 260 unique 1,000-token
# prompts at 10 a second.
cache_eviction_bench() {
  local name=$1 cache_flags=$2 prefixes=$3 requests=$4 rate=$5
  cat > "$out/cache-keys.json" <<'KEYS'
{"tenants": [{"name": "flood", "keys": ["sk-bench-flood-0000"]},
             {"name": "steady", "keys": ["sk-bench-steady-000"]}]}
KEYS
  for fair in true false; do
    # shellcheck disable=SC2086  # the cache flags are words
    strata_worker "$name-$fair" "$model" $cache_flags --threads=2 --max_live_sequences=1024 \
      --fair_cache_eviction=$fair
    w=$STRATA_PORT
    strata_coordinator "$name-$fair-coordinator" "$model" "127.0.0.1:$w" \
      --api_keys_file="$out/cache-keys.json"
    eval "c_$fair=$STRATA_PORT"
  done
  sleep 1
  for round in 1 2 3; do
    for fair in true false; do
      c=$(eval echo "\$c_$fair")
      loadgen --target=127.0.0.1:$c --workload=random --prompt_tokens=1000 --output_tokens=16 \
        --requests=260 --rate=10 --seed=$round --api_key=sk-bench-flood-0000 \
        --cache_salt="$name-flood-$round" --label="$name-$fair/flood/round$round" \
        --json_out="$out/$name-$fair-flood-$round.json" > "$out/$name-$fair-flood-$round.txt" &
      flood=$!
      sleep 1
      loadgen --target=127.0.0.1:$c --workload=shared-prefix --shared_prefix_tokens=1000 \
        --shared_fraction=1 --shared_prefixes="$prefixes" --prompt_tokens=16:32 --output_tokens=16 \
        --requests="$requests" --rate="$rate" --seed=$((round + 100)) \
        --api_key=sk-bench-steady-000 --cache_salt="$name-steady-$round" \
        --label="$name-$fair/steady/round$round" --json_out="$out/$name-$fair-steady-$round.json" \
        | tee -a "$summary"
      wait $flood
      tee -a "$summary" < "$out/$name-$fair-flood-$round.txt"
    done
  done
  strata_stop_all
}
# One system prompt in 64 MiB of device KV.
if [ "$part" = all ] || [ "$part" = cache ]; then
  cache_eviction_bench cache "--kv_cache_mb=64" 1 12 0.5
fi
# 6b. Through the host tier: the steady tenant's four prompts (about 250 blocks) are more than its
# share of an 8 MiB device cache (128 blocks), so its overflow lives in the 64 MiB host tier,
# through which the flood's new prompts stream too.
if [ "$part" = all ] || [ "$part" = cache-tiers ]; then
  cache_eviction_bench cache-tiers "--kv_cache_mb=8 --host_cache_mb=64" 4 16 0.65
fi
# 5. Fair sharing.
if [ "$part" = all ] || [ "$part" = fairness ]; then
cat > "$out/fair-keys.json" <<'KEYS'
{"tenants": [{"name": "heavy", "keys": ["sk-bench-heavy-0000"]},
             {"name": "light", "keys": ["sk-bench-light-0000"]},
             {"name": "gold", "keys": ["sk-bench-gold-00000"], "scheduling_weight": 2},
             {"name": "bronze", "keys": ["sk-bench-bronze-000"]}]}
KEYS
for fair in true false; do
  strata_worker "fair-$fair" "$model" --kv_cache_mb=64 --threads=2 --max_running_sequences=8 \
    --max_live_sequences=1024 --fair_share=$fair
  w=$STRATA_PORT
  strata_coordinator "fair-$fair-coordinator" "$model" "127.0.0.1:$w" --api_keys_file="$out/fair-keys.json"
  eval "c_$fair=$STRATA_PORT"
done
sleep 1
shape=(--workload=random --prompt_tokens=128 --output_tokens=64)
for round in 1 2 3; do
  for fair in true false; do
    c=$(eval echo "\$c_$fair")
    loadgen --target=127.0.0.1:$c "${shape[@]}" --requests=320 --rate=100000 --seed=$round \
      --api_key=sk-bench-heavy-0000 --cache_salt="heavy-$round" --label="fair-$fair/heavy/round$round" \
      --json_out="$out/fair-$fair-heavy-$round.json" > "$out/fair-$fair-heavy-$round.txt" &
    heavy=$!
    sleep 1
    loadgen --target=127.0.0.1:$c "${shape[@]}" --requests=20 --rate=4 --seed=$((round + 100)) \
      --api_key=sk-bench-light-0000 --cache_salt="light-$round" --label="fair-$fair/light/round$round" \
      --json_out="$out/fair-$fair-light-$round.json" | tee -a "$summary"
    wait $heavy
    tee -a "$summary" < "$out/fair-$fair-heavy-$round.txt"
  done
done
# Weights: "gold" (scheduling_weight 2) and "bronze" (1) each send 160 requests at once; while
# both have work, gold should get two thirds of the worker, so it finishes at about 3/4 of the
# time bronze takes (both at 1: about the same time).
for round in 1 2 3; do
  c=$c_true
  at=$(( $(date +%s%3N) + 1500 ))  # both clients connected by then
  for t in gold bronze; do
    loadgen --target=127.0.0.1:$c "${shape[@]}" --requests=160 --rate=100000 --seed=$((round + 200)) \
      --start_at_unix_ms=$at \
      --api_key="sk-bench-$t-$([ $t = gold ] && echo 00000 || echo 000)" --cache_salt="$t-$round" \
      --label="weights/$t/round$round" --json_out="$out/weights-$t-$round.json" \
      > "$out/weights-$t-$round.txt" &
    eval "pid_$t=\$!"
  done
  wait "$pid_gold"
  wait "$pid_bronze"
  cat "$out/weights-gold-$round.txt" "$out/weights-bronze-$round.txt" | tee -a "$summary"
done
strata_stop_all
fi
echo "results in $out" | tee -a "$summary"
