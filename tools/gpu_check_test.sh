#!/usr/bin/env bash
# tools/gpu_check.sh run keeps to STRATA_GPU_DEADLINE_S, on a machine without a GPU: a fake bundle
# whose test passes at once and whose gpu_bench writes a figure, then would run for a minute. The
# run must end near the deadline, keep the figure gpu_bench wrote before its limit, skip what had no
# time left (another benchmark, the draft-cost stage) and say so under the table.
set -euo pipefail
tmp="${TEST_TMPDIR:-$(mktemp -d)}"
co="$tmp/checkout"
rm -rf "$co" "$tmp/results"
mkdir -p "$co/tools" "$co/gpu-bundle/bin" "$co/gpu-bundle/lib"
cp tools/gpu_check.sh "$co/tools/"
cp tools/gpu_bundle_run.sh "$co/gpu-bundle/run.sh"
ldd --version | awk 'NR == 1 { print $NF }' >"$co/gpu-bundle/GLIBC_VERSION"
echo test >"$co/gpu-bundle/COMMIT"
cat >"$co/gpu-bundle/bin/kernels.cuda.fake_test" <<'SH'
#!/usr/bin/env bash
exit 0
SH
cat >"$co/gpu-bundle/bin/bench.gpu_bench" <<'SH'
#!/usr/bin/env bash
for a in "$@"; do case "$a" in --out=*) out="${a#--out=}" ;; esac; done
printf '{\n  "decode_b1_tokens_per_s": 123.5\n}\n' >"$out"
exec sleep 60
SH
cat >"$co/gpu-bundle/bin/bench.other_bench" <<'SH'
#!/usr/bin/env bash
exit 0
SH
chmod +x "$co/gpu-bundle/bin/"* "$co/gpu-bundle/run.sh" "$co/tools/gpu_check.sh"
printf '%s\n' "kernels.cuda.fake_test test //kernels/cuda:fake_test" \
  "bench.gpu_bench bench //bench:gpu_bench" "bench.other_bench bench //bench:other_bench" \
  >"$co/gpu-bundle/MANIFEST"

start=$(date +%s)
# 45 s in all: 15 s for the stages, 30 kept for the table and the pack.
set +e
STRATA_GPU_DEADLINE_S=45 STRATA_CLUSTER=0 STRATA_GPU_PROFILE=0 STRATA_TORCH_BUDGET=0 \
  STRATA_GPU_PACK="$tmp/results.tgz" "$co/tools/gpu_check.sh" run "$tmp/results" >"$tmp/out.txt" 2>&1
rc=$?
set -e
took=$(($(date +%s) - start))
cat "$tmp/out.txt"
fail() { echo "FAIL: $*" >&2; exit 1; }
[ "$took" -le 30 ] || fail "the run took ${took} s against a 15 s deadline"
grep -q '"decode_b1_tokens_per_s": 123.5' "$tmp/results/bench.gpu_bench.json" ||
  fail "gpu_bench's figure is gone"
grep -q '^bench.other_bench .*(no time left)' "$tmp/results/summary.txt" ||
  fail "bench.other_bench was not skipped: $(cat "$tmp/results/summary.txt")"
grep -q '^draft cost' "$tmp/results/skipped.txt" || fail "the draft-cost stage was not skipped"
grep -q '^skipped for time (STRATA_GPU_DEADLINE_S): draft cost.*bench.other_bench' "$tmp/out.txt" ||
  fail "the table does not name what was skipped"
grep -q 'kernels.cuda.fake_test *PASS' "$tmp/results/summary.txt" || fail "the test did not run"
grep -q '^binaries not run (no time left): 1$' "$tmp/results/summary.txt" ||
  fail "the binary left out is not counted"
[ "$rc" -ne 0 ] || fail "a run that left binaries out (and one cut short) exited 0"
tar -tzf "$tmp/results.tgz" | grep -q 'results/bench.gpu_bench.json' || fail "nothing was packed"
bad=$(STRATA_GPU_DEADLINE_S=abc "$co/tools/gpu_check.sh" run "$tmp/results2" 2>&1) &&
  fail "a bad deadline was taken"
echo "$bad" | grep -q 'STRATA_GPU_DEADLINE_S must be whole seconds' || fail "not named: $bad"
echo PASS
