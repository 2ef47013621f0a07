#!/usr/bin/env bash
# The main job: a local Strata cluster on the bundled model, with a request through it.
#
# Installs what the build needs (tools/setup.sh), builds the binaries, starts two workers and a
# coordinator on loopback serving models/strata-tiny/base, sends a request through the coordinator
# with `stratactl generate`, prints the answer, the cluster's status and where it listens, then keeps
# the cluster up until Ctrl-C, which shuts everything down cleanly.
#
# Usage:
#   tools/run_local.sh                 start, ask, and stay in the foreground until Ctrl-C
#   tools/run_local.sh --detach        start, ask, and leave the cluster running in the background
#   tools/run_local.sh --stop          stop a detached cluster
#   tools/run_local.sh --prompt TEXT   ask something else (the model writes Python-like text)
#   tools/run_local.sh --tensor-parallel 2   split the model across 2 processes in each worker
#   tools/run_local.sh --disaggregated       worker 1 computes prompts (--role=prefill), worker 2
#                                            decodes (--role=decode), and the long-prompt request
#                                            shows the handoff
#   tools/run_local.sh --tls                 every connection over TLS (docs/TLS.md): gRPC, HTTPS,
#                                            the workers' KV copies, with a development CA and
#                                            certificate (tools/make_dev_certs.sh) in STRATA_RUN_DIR
#   tools/run_local.sh --draft-model         speculative decoding with the bundled draft model
#                                            (models/strata-tiny/draft) instead of n-gram lookup
# Environment: STRATA_PORT (coordinator port, default 50051; workers use the next ports after
# STRATA_WORKER_PORT, default 50061; metrics on STRATA_METRICS_PORT, default 9090, and the next two;
# the OpenAI-compatible HTTP API on STRATA_HTTP_PORT, default 8000),
# STRATA_RUN_DIR (logs and pids, default
# ~/.cache/strata/local-cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

detach=0
stop=0
prompt='def fibonacci(n):'
tensor_parallel=1
disaggregated=0
tls=0
draft_model=0
while [ $# -gt 0 ]; do
  case "$1" in
    --detach) detach=1 ;;
    --stop) stop=1 ;;
    --prompt) prompt="$2"; shift ;;
    --prompt=*) prompt="${1#--prompt=}" ;;
    --tensor-parallel) tensor_parallel="$2"; shift ;;
    --tensor-parallel=*) tensor_parallel="${1#--tensor-parallel=}" ;;
    --disaggregated) disaggregated=1 ;;
    --tls) tls=1 ;;
    --draft-model) draft_model=1 ;;
    -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_local.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

run_dir=${STRATA_RUN_DIR:-$HOME/.cache/strata/local-cluster}
coord_port=${STRATA_PORT:-50051}
worker_port=${STRATA_WORKER_PORT:-50061}
metrics_port=${STRATA_METRICS_PORT:-9090}
http_port=${STRATA_HTTP_PORT:-8000}
coordinator="127.0.0.1:$coord_port"
mkdir -p "$run_dir/logs"

stop_pids() {
  local pids=()
  [ -f "$run_dir/pids" ] && mapfile -t pids < "$run_dir/pids"
  # Coordinator first (it is listed first), then the workers, each with SIGTERM.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -f "$run_dir/pids"
}

if [ $stop -eq 1 ]; then
  if [ ! -f "$run_dir/pids" ]; then echo "no local cluster is running (no $run_dir/pids)"; exit 0; fi
  stop_pids
  echo "local cluster stopped"
  exit 0
fi

if [ -f "$run_dir/pids" ]; then
  while read -r pid; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "a local cluster is already running (pid $pid); stop it with: tools/run_local.sh --stop" >&2
      exit 1
    fi
  done < "$run_dir/pids"
  rm -f "$run_dir/pids"
fi

tools/setup.sh
echo "building..."
bazel build --noshow_progress //worker/server:strata-worker //coordinator:strata-coordinator \
  //cli:stratactl 2>&1 | grep -v 'INFO:\|Loading\|Analyzing\|^Target\|^  bazel-bin' || true
bin=$(bazel info --noshow_progress bazel-bin 2>/dev/null)
for b in worker/server/strata-worker coordinator/strata-coordinator cli/stratactl; do
  [ -x "$bin/$b" ] || { echo "build failed: $bin/$b is missing" >&2; exit 1; }
done
# Run copies, so that a rebuild while the cluster runs does not touch its binaries.
mkdir -p "$run_dir/bin"
for b in worker/server/strata-worker coordinator/strata-coordinator cli/stratactl; do
  name=$(basename "$b")
  cp -f "$bin/$b" "$run_dir/bin/$name.new" && mv -f "$run_dir/bin/$name.new" "$run_dir/bin/$name"
done
stratactl="$run_dir/bin/stratactl"

model_dir="$repo/models/strata-tiny/base"
launch() {  # launch NAME COMMAND...: starts a process (its own session when detached)
  local name=$1; shift
  if [ $detach -eq 1 ]; then
    setsid "$@" > "$run_dir/logs/$name.log" 2>&1 < /dev/null &
  else
    "$@" > "$run_dir/logs/$name.log" 2>&1 < /dev/null &
  fi
  echo $! >> "$run_dir/pids"
}

: > "$run_dir/pids"
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "shutting down the local cluster..."
  stop_pids
  echo "stopped (logs in $run_dir/logs)"
}
[ $detach -eq 0 ] && trap cleanup INT TERM EXIT

# The bundled fine-tunes, compressed to deltas that both workers serve over the base, and the bundled
# LoRA adapter beside them (one rank only: tensor-parallel workers serve the base alone).
fine_tune_flags=()
if [ "$tensor_parallel" = 1 ]; then
  mkdir -p "$run_dir/fine-tunes"
  for ft in c-headers man; do
    "$stratactl" delta compress --base "$model_dir" --fine-tune "$repo/models/strata-tiny/ft-$ft" \
      --base-name strata-tiny --out "$run_dir/fine-tunes/$ft.delta.safetensors" > /dev/null
  done
  for lora in lora-c-headers lora-c-headers-embed; do
    rm -rf "$run_dir/fine-tunes/$lora"
    cp -r "$repo/models/strata-tiny/$lora" "$run_dir/fine-tunes/$lora"
  done
  fine_tune_flags=(--fine_tune_dir="$run_dir/fine-tunes" --delta_cache_mb=64)
fi

# --tls: one development certificate for the whole cluster; stratactl (here, and in the lines
# printed at the end) finds the CA and the name through the environment.
tls_flags=()
if [ $tls -eq 1 ]; then
  tools/make_dev_certs.sh "$run_dir/certs" >/dev/null
  tls_flags=(--tls_cert="$run_dir/certs/tls.crt" --tls_key="$run_dir/certs/tls.key"
             --tls_ca="$run_dir/certs/ca.crt" --tls_server_name=strata.internal)
  export STRATA_TLS_CA="$run_dir/certs/ca.crt" STRATA_TLS_SERVER_NAME=strata.internal
  export STRATA_LOCAL_TLS_CA="$run_dir/certs/ca.crt"  # the HTTPS requests below
fi

workers=()
for i in 1 2; do
  port=$((worker_port + i - 1))
  workers+=("127.0.0.1:$port")
  rm -f "$run_dir/worker-$i.port"
done
rm -f "$run_dir/logs/access.log"  # this run's alone, as the other logs
launch coordinator "$run_dir/bin/strata-coordinator" --model="strata-tiny=$model_dir" \
  --workers="$(IFS=,; echo "${workers[*]}")" --listen="$coordinator" \
  --metrics_listen="127.0.0.1:$metrics_port" --http_listen="127.0.0.1:$http_port" \
  --access_log="$run_dir/logs/access.log" --port_file="$run_dir/coordinator.port" \
  --disaggregate_min_uncached_tokens=128 "${tls_flags[@]}"
# Speculative decoding: drafts by n-gram lookup in the context, or from the bundled draft model.
spec_flags=(--num_speculative_tokens=4)
[ $draft_model -eq 1 ] && spec_flags=(--draft_model="$repo/models/strata-tiny/draft")
roles=(mixed mixed)
[ $disaggregated -eq 1 ] && roles=(prefill decode)
for i in 1 2; do
  launch "worker-$i" "$run_dir/bin/strata-worker" --model="$model_dir" --model_name=strata-tiny \
    --listen="${workers[$((i - 1))]}" --worker_id="local-worker-$i" --threads=1 --kv_cache_mb=64 \
    --host_cache_mb=128 --disk_cache_mb=512 --disk_cache_path="$run_dir/kv-worker-$i" \
    --metrics_listen="127.0.0.1:$((metrics_port + i))" "${spec_flags[@]}" \
    --port_file="$run_dir/worker-$i.port" --tensor_parallel="$tensor_parallel" \
    --role="${roles[$((i - 1))]}" "${fine_tune_flags[@]}" "${tls_flags[@]}"
done

echo "waiting for the cluster..."
ready=0
for _ in $(seq 300); do
  if out=$("$stratactl" status --coordinator "$coordinator" --json 2>/dev/null) &&
     [ "$(grep -o '"WORKER_STATE_SERVING"' <<< "$out" | wc -l)" -ge 2 ]; then
    ready=1; break
  fi
  n=0
  while read -r pid; do
    name=$([ $n -eq 0 ] && echo coordinator || echo "worker-$n")
    n=$((n + 1))
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name failed to start:" >&2; tail -5 "$run_dir/logs/$name.log" >&2; exit 1
    fi
  done < "$run_dir/pids"
  sleep 0.1
done
if [ $ready -eq 0 ]; then
  echo "the cluster did not come up in 30 s; logs in $run_dir/logs" >&2
  exit 1
fi

echo
echo "request: stratactl generate --prompt $(printf %q "$prompt") --max-tokens 64 --seed 1"
echo "----------------------------------------------------------------------"
printf '%s' "$prompt"
"$stratactl" generate --coordinator "$coordinator" --prompt "$prompt" --max-tokens 64 --seed 1
echo "----------------------------------------------------------------------"
if [ ${#fine_tune_flags[@]} -gt 0 ]; then
  ft_prompt='#include <'
  echo
  echo "request: stratactl generate --prompt $(printf %q "$ft_prompt") --fine-tune c-headers --max-tokens 48 --seed 1"
  echo "----------------------------------------------------------------------"
  printf '%s' "$ft_prompt"
  "$stratactl" generate --coordinator "$coordinator" --prompt "$ft_prompt" --fine-tune c-headers \
    --max-tokens 48 --seed 1
  echo "----------------------------------------------------------------------"
  echo
  echo "request: the same through the LoRA adapter (PEFT format) extracted from that fine-tune:"
  echo "stratactl generate --prompt $(printf %q "$ft_prompt") --fine-tune lora-c-headers-embed --max-tokens 48 --seed 1"
  echo "----------------------------------------------------------------------"
  printf '%s' "$ft_prompt"
  "$stratactl" generate --coordinator "$coordinator" --prompt "$ft_prompt" \
    --fine-tune lora-c-headers-embed --max-tokens 48 --seed 1
  echo "----------------------------------------------------------------------"
fi
echo
scheme=http
curl_tls=""
if [ $tls -eq 1 ]; then scheme=https; curl_tls="--cacert $run_dir/certs/ca.crt "; fi
echo "request: POST $scheme://127.0.0.1:$http_port/v1/completions (the OpenAI-compatible API)"
echo "----------------------------------------------------------------------"
python3 - "$http_port" "$metrics_port" "$stratactl" "$coordinator" "$disaggregated" "$draft_model" <<'PY'
import json, os, ssl, subprocess, sys, time, urllib.request
# --tls: the HTTP API is HTTPS, checked against the development CA (its certificate names
# 127.0.0.1).
ca = os.environ.get("STRATA_LOCAL_TLS_CA")
ctx = ssl.create_default_context(cafile=ca) if ca else None
api = f"{'https' if ca else 'http'}://127.0.0.1:{sys.argv[1]}"
body = json.dumps({"model": "strata-tiny", "prompt": "int main(", "max_tokens": 32, "seed": 1}).encode()
req = urllib.request.Request(f"{api}/v1/completions", data=body,
                             headers={"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=60, context=ctx))
print("int main(" + reply["choices"][0]["text"])
print(f"(finish_reason {reply['choices'][0]['finish_reason']}, usage {reply['usage']})")
# Structured output: the workers keep the text to a JSON schema.
schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
          "kind": {"enum": ["module", "function", "class"]}, "lines": {"type": "integer",
          "minimum": 1, "maximum": 999}}, "required": ["name", "kind", "lines"]}
body = json.dumps({"model": "strata-tiny", "prompt": "entry = ", "max_tokens": 600, "seed": 1,
                   "response_format": {"type": "json_schema",
                                       "json_schema": {"name": "entry", "schema": schema}}}).encode()
req = urllib.request.Request(f"{api}/v1/completions", data=body,
                             headers={"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=60, context=ctx))
print()
print("with response_format json_schema " + json.dumps(schema))
print("entry = " + json.dumps(json.loads(reply["choices"][0]["text"])))
print(f"(finish_reason {reply['choices'][0]['finish_reason']})")
# Speculative decoding (the workers run --num_speculative_tokens=4, or --draft_model): greedy text
# is drafted (from the prompt, or by the draft model), several tokens a step; the output is what
# one token a step gives.
def drafts():
    """(draft tokens, kept) over both workers, from their /metrics."""
    time.sleep(0.6)  # the workers publish their metrics every 250 ms
    drafted = kept = 0
    for port in (int(sys.argv[2]) + 1, int(sys.argv[2]) + 2):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith("strata_worker_draft_tokens_total"):
                drafted += float(line.split()[-1])
            elif line.startswith("strata_worker_accepted_draft_tokens_total"):
                kept += float(line.split()[-1])
    return drafted, kept
before = drafts()
prompt = ("def add_one(x):\n    return x + 1\n\n\ndef add_two(x):\n    return x + 2\n\n\n"
          "def add_three(x):\n    return x + 3\n\n\ndef add_four(x):\n    return x + 4\n\n\ndef add_")
body = json.dumps({"model": "strata-tiny", "prompt": prompt, "max_tokens": 48,
                   "temperature": 0}).encode()
req = urllib.request.Request(f"{api}/v1/completions", data=body,
                             headers={"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=60, context=ctx))
after = drafts()
print()
print("greedy, with drafts from " + ("the draft model" if sys.argv[6] == "1" else "the prompt") +
      " (speculative decoding):")
print(prompt + reply["choices"][0]["text"])
print(f"({after[0] - before[0]:.0f} draft tokens, {after[1] - before[1]:.0f} kept: "
      f"{reply['usage']['completion_tokens']} tokens in "
      f"{reply['usage']['completion_tokens'] - (after[1] - before[1]):.0f} steps)")
# KV copies between workers: the worker that computed a long prompt is drained, so the same prompt
# goes to the other worker, which copies the prompt's KV blocks from it instead of computing them.
stratactl, coordinator = sys.argv[3], sys.argv[4]
def routed():
    status = json.loads(subprocess.check_output(
        [stratactl, "status", "--coordinator", coordinator, "--json"]))
    return {w["info"]["worker_id"]: int(w.get("num_routed_requests", 0))
            for w in status["cluster"]["workers"]}
def complete(text):
    body = json.dumps({"model": "strata-tiny", "prompt": text, "max_tokens": 8,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"{api}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    start = time.monotonic()
    reply = json.load(urllib.request.urlopen(req, timeout=60, context=ctx))
    return reply, 1e3 * (time.monotonic() - start)
# A first line of its own: the workers' disk tiers keep earlier runs' prompts.
long_prompt = f"# run {time.time_ns()}\n" + "".join(
    f"def parse_{i}(value):\n    return value.strip()\n\n" for i in range(24))
before = routed()
if sys.argv[5] == "1":
    # Disaggregated: the prompt and its first token on the prefill worker, the rest on the decode
    # worker, which copies the prompt's KV blocks.
    def handoffs():
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[2]}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("strata_coordinator_prefill_handoffs_total "):
                    return float(line.split()[1])
        return 0.0
    h = handoffs()
    reply, ms = complete(long_prompt)
    went = [w for w, n in sorted(routed().items()) if n > before.get(w, 0)]
    print()
    print(f"disaggregated: a {reply['usage']['prompt_tokens']}-token prompt went to "
          f"{' then '.join(went)} ({handoffs() - h:.0f} handoff), answered in {ms:.0f} ms:")
    print(repr(reply["choices"][0]["text"]))
    sys.exit(0)
first, first_ms = complete(long_prompt)
holder = next(w for w, n in routed().items() if n > before.get(w, 0))
drain = [stratactl, "drain", holder, "--coordinator", coordinator]
subprocess.run(drain + ["--wait"], check=True, stdout=subprocess.DEVNULL)
try:
    second, second_ms = complete(long_prompt)
finally:
    subprocess.run(drain + ["--resume"], check=True, stdout=subprocess.DEVNULL)
cached = (second["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
print()
print(f"KV copies: a {first['usage']['prompt_tokens']}-token prompt computed on {holder} in "
      f"{first_ms:.0f} ms; with {holder} drained, the other worker copied {cached} tokens' KV "
      f"from it and answered in {second_ms:.0f} ms, the same text: "
      f"{first['choices'][0]['text'] == second['choices'][0]['text']}")
PY
echo "----------------------------------------------------------------------"
echo
"$stratactl" status --coordinator "$coordinator"
echo
echo "Strata is listening:"
echo "  coordinator (strata.v1.Serving, strata.v1.Admin, grpc.health.v1): $coordinator$([ $tls -eq 1 ] && echo " (TLS: CA $run_dir/certs/ca.crt, name strata.internal)")"
echo "  workers (strata.v1.Worker): ${workers[*]}"
echo "  Prometheus metrics: http://127.0.0.1:$metrics_port/metrics (coordinator)," \
  "http://127.0.0.1:$((metrics_port + 1))/metrics and :$((metrics_port + 2)) (workers)"
echo "  OpenAI-compatible API: $scheme://127.0.0.1:$http_port/v1 (POST /v1/completions and /v1/chat/completions, GET /v1/models and /v1/models/{model}; and POST /tokenize, /detokenize at the root)"
echo "  logs: $run_dir/logs (the coordinator's access log, a JSON line per call and HTTP request: $run_dir/logs/access.log)"
echo "Try:"
if [ $tls -eq 1 ]; then
  echo "  export STRATA_TLS_CA=$run_dir/certs/ca.crt STRATA_TLS_SERVER_NAME=strata.internal"
fi
echo "  $stratactl generate --coordinator $coordinator --prompt 'import os' --max-tokens 40"
if [ ${#fine_tune_flags[@]} -gt 0 ]; then
  echo "  $stratactl generate --coordinator $coordinator --prompt '.TH' --fine-tune man --max-tokens 40"
  echo "  # another fine-tune, served within about 20 s without a restart (delete the file to remove it):"
  echo "  cp $run_dir/fine-tunes/man.delta.safetensors $run_dir/fine-tunes/.new && mv $run_dir/fine-tunes/.new $run_dir/fine-tunes/man-2.delta.safetensors"
fi
echo "  $stratactl generate --coordinator $coordinator --prompt 'n = ' --regex '[0-9]{3}'"
echo "  $stratactl status --coordinator $coordinator"
echo "  curl -s $curl_tls$scheme://127.0.0.1:$http_port/v1/completions -H 'Content-Type: application/json' \\"
echo "    -d '{\"model\": \"strata-tiny\", \"prompt\": \"import os\", \"max_tokens\": 40, \"stream\": true}'"
if [ $detach -eq 1 ]; then
  echo "The cluster keeps running in the background; stop it with: tools/run_local.sh --stop"
  exit 0
fi
echo "Press Ctrl-C to stop the cluster."
interrupted=0
trap 'interrupted=1' INT TERM
while [ $interrupted -eq 0 ]; do
  # `wait` (unlike a foreground sleep) lets the trap run at once.
  sleep 1 &
  wait $! || true
  [ $interrupted -eq 1 ] && break
  # Stop everything if a process dies on its own.
  while read -r pid; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "a cluster process (pid $pid) exited; see $run_dir/logs" >&2
      exit 1
    fi
  done < "$run_dir/pids"
done
cleanup
