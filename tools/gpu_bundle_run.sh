#!/usr/bin/env bash
# Runner of a bundle made by tools/gpu_bundle.sh. Runs every test and benchmark in the bundle (or those
# whose name matches NAME_REGEX; tests STRATA_GPU_JOBS at a time, default 4, then benchmarks alone),
# writes NAME.log plus NAME.xml (tests) or NAME.json (benchmarks) and summary.txt to RESULTS_DIR,
# prints the summary, and exits non-zero if anything failed. Run it from the
# root of a Strata checkout: tests read their data (models/, testdata/) relative to it, as under Bazel.
#
# Usage: run.sh RESULTS_DIR [NAME_REGEX]
#        run.sh --libpath      (prints the LD_LIBRARY_PATH the binaries run with, for other scripts)
# STRATA_GPU_BENCH_ARGS: more flags for bench.gpu_bench (split at spaces), e.g. --batches=1,8,64.
# STRATA_GPU_DEADLINE_EPOCH (Unix seconds, set by tools/gpu_check.sh run): each binary's time limit
# (STRATA_GPU_TIMEOUT, default 300) is cut to what is left before it; one that would have under 10 s
# is not started (its row says "no time left").
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

# Libraries: the bundle's first, then the GPU machine's CUDA libraries for any the bundle left out.
libpath="$here/lib"
# CUPTI (gpu_bench's kernel traces load it at run time) sits in extras/ in a toolkit install.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/extras/CUPTI/lib64; do
  [ -d "$d" ] && libpath="$libpath:$d"
done
for d in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
  for l in "$d"/nvidia/*/lib; do [ -d "$l" ] && libpath="$libpath:$l"; done
done
if [ "${1:-}" = --libpath ]; then
  echo "$libpath"
  exit 0
fi

results="${1:?usage: run.sh RESULTS_DIR [NAME_REGEX]}"
only="${2:-.}"
mkdir -p "$results"

# Use the bundled glibc (through its own loader) only when the machine's is older than the build's.
launcher=()
host_glibc="$(ldd --version 2>/dev/null | awk 'NR == 1 { print $NF }')"
want_glibc="$(cat "$here/GLIBC_VERSION")"
if [ -z "$host_glibc" ] || [ "$(printf '%s\n%s\n' "$want_glibc" "$host_glibc" | sort -V | head -1)" != "$want_glibc" ]; then
  driver_dirs="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so/ && !found { sub(/\/[^/]*$/, "", $NF); print $NF; found = 1 }')"
  launcher=("$here/glibc/ld-linux-x86-64.so.2" --library-path "$libpath:$here/glibc:${driver_dirs:-/usr/lib/x86_64-linux-gnu}")
  echo "run.sh: host glibc ${host_glibc:-unknown} < build's $want_glibc: using the bundled glibc"
fi

{
  echo "strata gpu bundle $(cat "$here/COMMIT") on $(hostname) at $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
} >"$results/summary.txt"

# run_one NAME KIND: runs one binary, writing NAME.log, NAME.xml (tests) or NAME.json (benchmarks),
# and NAME.row, its line of the summary (NAME.rc: its exit status).
run_one() {
  local name=$1 kind=$2 args extra start_ns rc elapsed_ms secs pass=- fail=- skip=- total result=PASS
  start_ns=$(date +%s%N)
  if [ "$kind" = bench ]; then
    args=(--out="$results/$name.json")
    if [ "$name" = bench.gpu_bench ] && [ -n "${STRATA_GPU_BENCH_ARGS:-}" ]; then
      read -r -a extra <<<"$STRATA_GPU_BENCH_ARGS"
      args+=("${extra[@]}")
    fi
  else
    args=(--gtest_output="xml:$results/$name.xml")
  fi
  # Test files (the disk tier's O_DIRECT file among them) go under the bundle, on the machine's disk
  # rather than a /tmp that may be tmpfs.
  rm -rf "$here/tmp/$name" && mkdir -p "$here/tmp/$name"
  local limit_s="${STRATA_GPU_TIMEOUT:-300}"
  if [ -n "${STRATA_GPU_DEADLINE_EPOCH:-}" ]; then
    local left=$((STRATA_GPU_DEADLINE_EPOCH - $(date +%s)))
    [ "$left" -lt "$limit_s" ] && limit_s=$left
    if [ "$limit_s" -lt 10 ]; then
      printf '%-40s %-6s %6s %6s %6s %8s (no time left)\n' "$name" SKIP - - - 0 >"$results/$name.row"
      echo skipped >"$results/$name.rc"
      return
    fi
  fi
  TEST_TMPDIR="$here/tmp/$name" LD_LIBRARY_PATH="$libpath" timeout -k 10 "$limit_s" "${launcher[@]}" "$here/bin/$name" \
    "${args[@]}" </dev/null >"$results/$name.log" 2>&1
  rc=$?
  elapsed_ms=$((($(date +%s%N) - start_ns) / 1000000))
  secs="$((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000)))"
  if [ -f "$results/$name.xml" ]; then
    # The root element's counts (a failed test can hold several <failure> elements).
    total=$(grep -o '<testsuites [^>]*' "$results/$name.xml" | grep -o ' tests="[0-9]*"' | grep -o '[0-9]*')
    fail=$(grep -o '<testsuites [^>]*' "$results/$name.xml" | grep -o ' failures="[0-9]*"' | grep -o '[0-9]*')
    skip=$(grep -c '<skipped' "$results/$name.xml")
    pass=$((total - fail - skip))
  fi
  if [ $rc -ne 0 ]; then
    result=FAIL
  elif [ "$pass" = 0 ] && [ "$skip" != 0 ] && [ "$skip" != - ]; then
    result=SKIP
  fi
  printf '%-40s %-6s %6s %6s %6s %8s\n' "$name" "$result" "$pass" "$fail" "$skip" "$secs" >"$results/$name.row"
  echo "$rc" >"$results/$name.rc"
}

# Tests first, up to STRATA_GPU_JOBS of them at once (default 4; they share the GPU, and device time
# is short), then the benchmarks one at a time with the GPU to themselves.
jobs_max="${STRATA_GPU_JOBS:-4}"
case "$jobs_max" in
  '' | *[!0-9]* | 0) echo "run.sh: STRATA_GPU_JOBS must be a positive number, not '$jobs_max'" >&2; exit 2 ;;
esac
names=()
benches=()
while read -r name kind label; do
  [ "$kind" = tool ] && continue  # servers and CLIs packed for other scripts
  echo "$name" | grep -Eq "$only" || continue
  names+=("$name")
  rm -f "$results/$name.row" "$results/$name.rc"
  if [ "$kind" = bench ]; then
    benches+=("$name")
    continue
  fi
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n; done
  run_one "$name" "$kind" &
done <"$here/MANIFEST"
wait
for name in "${benches[@]}"; do run_one "$name" bench; done

failed=0
unrun=0
printf '%-40s %-6s %6s %6s %6s %8s\n' NAME RESULT PASS FAIL SKIP SECONDS >>"$results/summary.txt"
for name in "${names[@]}"; do
  cat "$results/$name.row" >>"$results/summary.txt"
  case "$(cat "$results/$name.rc")" in
    0) ;;
    skipped) unrun=$((unrun + 1)) ;;
    *) failed=$((failed + 1)) ;;
  esac
  rm -f "$results/$name.row" "$results/$name.rc"
done
echo "failed binaries: $failed" >>"$results/summary.txt"
[ $unrun -eq 0 ] || echo "binaries not run (no time left): $unrun" >>"$results/summary.txt"
cat "$results/summary.txt"
[ $failed -eq 0 ] && [ $unrun -eq 0 ]
