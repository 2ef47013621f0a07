# Shell functions that start strata-worker and strata-coordinator processes on loopback ports they
# pick themselves (--listen 127.0.0.1:0 --port_file), for sh tests and benchmark scripts. Source it,
# then set:
#   STRATA_BIN  directory holding worker/server/strata-worker and coordinator/strata-coordinator
#               (a bazel-bin or a test's runfiles root)
#   STRATA_OUT  directory for port files and logs
# Every started process is stopped (SIGTERM) when the sourcing script exits.
#
#   strata_worker NAME MODEL_DIR [FLAGS...];              port in $STRATA_PORT
#   strata_coordinator NAME MODEL_DIR WORKERS [FLAGS...]; port in $STRATA_PORT
#   strata_wait_serving COORDINATOR_PORT N                until the coordinator sees N workers
#                                                         serving (needs cli/stratactl)
#   strata_free_port                                      a free loopback port, printed
#   strata_long_context_model DIR                          the bundled model, 40k context

strata_pids=()
strata_stop_all() {
  for p in "${strata_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  strata_pids=()
}
trap strata_stop_all EXIT

# Prints the port in FILE once a server has written it; fails after 30 s.
strata_wait_port() {
  for _ in $(seq 600); do
    [ -s "$1" ] && { cat "$1"; return 0; }
    sleep 0.05
  done
  echo "no port in $1 (see ${1%.port}.log)" >&2
  return 1
}

# Runs the command with a port file and log named NAME in STRATA_OUT, records its pid (in this
# shell: call it directly, not in $(...)), and leaves the port in STRATA_PORT.
strata_launch() {
  local name=$1; shift
  rm -f "$STRATA_OUT/$name.port"
  "$@" --listen=127.0.0.1:0 --port_file="$STRATA_OUT/$name.port" > "$STRATA_OUT/$name.log" 2>&1 &
  strata_pids+=($!)
  STRATA_PORT=$(strata_wait_port "$STRATA_OUT/$name.port")
}

# strata_wait_serving COORDINATOR_PORT N: waits (30 s at most) until the coordinator has reached N
# workers that serve, so that a benchmark's first request finds them all routable.
strata_wait_serving() {
  for _ in $(seq 300); do
    [ "$("$STRATA_BIN/cli/stratactl" status --coordinator "127.0.0.1:$1" --json 2>/dev/null |
         grep -o '"WORKER_STATE_SERVING"' | wc -l)" -ge "$2" ] && return 0
    sleep 0.1
  done
  echo "the coordinator on port $1 did not see $2 serving workers" >&2
  return 1
}

# strata_free_port: a loopback port free now, for a flag that takes HOST:PORT (--http_listen).
strata_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# strata_worker NAME MODEL_DIR [FLAGS...]: a worker serving MODEL_DIR as strata-tiny, one thread.
strata_worker() {
  local name=$1 model=$2; shift 2
  strata_launch "$name" "$STRATA_BIN/worker/server/strata-worker" --model="$model" \
    --model_name=strata-tiny --worker_id="$name" --threads=1 "$@"
}

# strata_coordinator NAME MODEL_DIR WORKERS [FLAGS...]
strata_coordinator() {
  local name=$1 model=$2 workers=$3; shift 3
  strata_launch "$name" "$STRATA_BIN/coordinator/strata-coordinator" \
    --model="strata-tiny=$model" --workers="$workers" "$@"
}

# strata_long_context_model DIR: copies the bundled model into DIR with a 40,960-token context
# (max_position_embeddings), so that benchmarks can send 16k-token prompts; only timing is
# meaningful past the context it was trained on.
strata_long_context_model() {
  rm -rf "$1"
  cp -r models/strata-tiny/base "$1"
  sed -i 's/"max_position_embeddings": [0-9]*/"max_position_embeddings": 40960/' "$1/config.json"
}
