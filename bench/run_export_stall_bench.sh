#!/usr/bin/env bash
# What a KV copy costs the generations running on the two workers it goes between: the gaps
# between a stream's tokens on the source worker, and on the receiving one, while the receiver
# copies a long prompt's KV blocks from the source (Worker.FetchKvBlocks), with the copy read out
# and stored in slices between engine steps (--kv_copy_slice_mb, 8 by default) and, for
# comparison, in one piece (a slice larger than the copy).
#
#   bench/run_export_stall_bench.sh [OUT_DIR] [PROMPT_TOKENS] [REPS]
#                                    (defaults: /tmp/strata-export-stall-bench, 8192, 3)
#
# Two workers (one compute thread each) and a coordinator on loopback, the bundled model with a
# longer context. Each run: worker w0 computes the long prompt (w1 drained); an 8,000-token greedy
# stream starts on w0 (streamed over the HTTP API, each chunk's arrival timed); w0 is drained (its
# stream goes on), a second stream starts on w1, and the long prompt is sent again, so w1 takes it
# and copies its blocks from w0. Reported for each stream: its largest gap while the copy ran (from
# the copy's request to its first token), against its median gap before the copy. The receiver's
# largest gap includes the step that computes the prompt's last block over its whole context.
# SLICES="8 1048576" (the default): the --kv_copy_slice_mb values to run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/strata-export-stall-bench}
PROMPT=${2:-8192}
REPS=${3:-3}
mkdir -p "$OUT"
bazel build -c opt //worker/server:strata-worker //coordinator:strata-coordinator //cli:stratactl \
  >/dev/null
export STRATA_BIN=$PWD/bazel-bin STRATA_OUT=$OUT
# shellcheck source=../tools/local_servers.sh
source tools/local_servers.sh
MODEL=$OUT/strata-tiny-long
strata_long_context_model "$MODEL"
JSON=$OUT/export_stall_bench.jsonl
: > "$JSON"
kv_mb=$(( 3 * (PROMPT / 16 + 64) * 64 / 1024 + 64 ))  # the prompt three times over, and more

for slice in ${SLICES:-8 1048576}; do
  for rep in $(seq "$REPS"); do
    strata_worker w0 "$MODEL" --kv_cache_mb="$kv_mb" --max_batch_tokens=2048 \
      --kv_copy_slice_mb="$slice"
    w0=$STRATA_PORT
    strata_worker w1 "$MODEL" --kv_cache_mb="$kv_mb" --max_batch_tokens=2048 \
      --kv_copy_slice_mb="$slice"
    w1=$STRATA_PORT
    http=$(strata_free_port)
    strata_coordinator c "$MODEL" "127.0.0.1:$w0,127.0.0.1:$w1" --http_listen="127.0.0.1:$http"
    cport=$STRATA_PORT
    sleep 1
    python3 - "$cport" "$http" "$PROMPT" "$slice" "$rep" "$JSON" <<'PY'
import json, random, statistics, subprocess, sys, threading, time, urllib.request

cport, http, prompt_len, slice_mb, rep, out = sys.argv[1:7]
coord = "127.0.0.1:" + cport
url = "http://127.0.0.1:%s/v1/completions" % http
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

def stratactl(*args):
    subprocess.run(["bazel-bin/cli/stratactl", *args, "--coordinator", coord], check=True,
                   capture_output=True)

def post(body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return opener.open(req, timeout=600)

rng = random.Random(int(rep) * 7919 + len(slice_mb))
prompt = [rng.randrange(100, 2000) for _ in range(int(prompt_len))]
long_req = {"model": "strata-tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0}

stratactl("drain", "w1", "--wait")
post(long_req).read()  # w0 computes it
# A stream on each worker: w0's (the source), then w1's (the receiver).
def stream(arrivals):
    r = post({"model": "strata-tiny", "prompt": "def main(argv):\n", "max_tokens": 8000,
              "temperature": 0, "ignore_eos": True, "stream": True})
    while True:
        line = r.readline()
        if not line:
            break
        if line.startswith(b"data: {"):
            arrivals.append(time.monotonic())
source_arrivals, receiver_arrivals = [], []
threads = [threading.Thread(target=stream, args=(source_arrivals,))]
threads[0].start()
while len(source_arrivals) < 50:
    time.sleep(0.005)
stratactl("drain", "w1", "--resume")
stratactl("drain", "w0")  # its stream goes on
threads.append(threading.Thread(target=stream, args=(receiver_arrivals,)))
threads[1].start()
while len(receiver_arrivals) < 50:
    time.sleep(0.005)
time.sleep(0.3)
copy_start = time.monotonic()
r = post(dict(long_req, stream=True))
while not r.readline().startswith(b"data: {"):
    pass
copy_end = time.monotonic()
r.read()
for t in threads:
    t.join()
row = {"slice_mb": int(slice_mb), "rep": int(rep), "prompt_tokens": int(prompt_len),
       "copy_ms": 1e3 * (copy_end - copy_start)}
for name, arrivals in (("source", source_arrivals), ("receiver", receiver_arrivals)):
    before = [b - a for a, b in zip(arrivals, arrivals[1:]) if b < copy_start]
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if b >= copy_start and a <= copy_end]
    row[name + "_median_gap_before_ms"] = 1e3 * statistics.median(before)
    row[name + "_max_gap_during_ms"] = 1e3 * max(during) if during else 0.0
    row[name + "_gaps_during"] = len(during)
print(json.dumps(row))
with open(out, "a") as f:
    f.write(json.dumps(row) + "\n")
PY
    strata_stop_all
  done
done

python3 - "$JSON" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("%12s %10s %28s %28s" % ("slice", "copy ms", "source: median / max gap", "receiver: median / max gap"))
for s in sorted({r["slice_mb"] for r in rows}):
    rs = [r for r in rows if r["slice_mb"] == s]
    med = lambda k: statistics.median(r[k] for r in rs)
    print("%9d MiB %10.1f %17.1f / %5.1f ms %17.1f / %5.1f ms" % (
        s, med("copy_ms"), med("source_median_gap_before_ms"), med("source_max_gap_during_ms"),
        med("receiver_median_gap_before_ms"), med("receiver_max_gap_during_ms")))
PY
