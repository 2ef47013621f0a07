#!/usr/bin/env bash
# stratactl delta as a user runs it on the bundled strata-tiny models: compress a real fine-tune,
# inspect the file, and measure the compressed fine-tune's perplexity against the base's and the
# full fine-tune's on held-out text.
set -euo pipefail
bin=cli/stratactl
m=models/strata-tiny
tmp="${TEST_TMPDIR:-/tmp}"
fail() { echo "FAIL: $*" >&2; exit 1; }

out="$($bin delta compress --base $m/base --fine-tune $m/ft-c-headers --out $tmp/c.delta.safetensors \
  --base-name strata-tiny --json)"
python3 - "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
assert r["bits"] == 4 and r["sparsity"] == "none", r
assert r["compression"] > 3.5, r  # 4 bits and a scale a row, against bf16
assert r["unchanged_tensors"] == 0 and len(r["tensors"]) == 38, r
for t in r["tensors"]:
    if t["cols"]:
        assert 0 < t["relative_error"] < 0.2, t
PY
table="$($bin delta compress --base $m/base --fine-tune $m/ft-c-headers --out $tmp/c24.delta.safetensors \
  --bits 4 --sparsity 2:4)"
grep -q "^model.layers.0.mlp.down_proj.weight  *256x512 " <<<"$table" || fail "table: $table"
echo "$table" | tail -1 | grep -q "4-bit, sparsity 2:4, 38 tensors" || fail "summary: $table"

info="$($bin delta inspect $tmp/c.delta.safetensors --base $m/base)"
grep -q "base model  *strata-tiny" <<<"$info" || fail "inspect: $info"
grep -q "loads  *yes, over $m/base" <<<"$info" || fail "inspect: $info"

# Perplexity on the first 8 KB of held-out C headers: the compressed fine-tune is far better than
# the base and within 2% of the full fine-tune.
head -c 8000 $m/heldout/c_headers.txt > $tmp/heldout.txt
ppl() { $bin eval ppl "$@" --text $tmp/heldout.txt --context 512 --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["perplexity"])'; }
base="$(ppl --model $m/base)"
full="$(ppl --model $m/ft-c-headers)"
delta="$(ppl --model $m/base --delta $tmp/c.delta.safetensors)"
python3 - "$base" "$full" "$delta" <<'PY'
import sys
base, full, delta = map(float, sys.argv[1:])
assert delta < base / 4, (base, full, delta)
assert abs(delta / full - 1) < 0.02, (base, full, delta)
PY

# Calibrated 2:4: the base reads text first and every layer matrix is packed by column importance.
head -c 6000 $m/heldout/man.txt > $tmp/calibration.txt
cal="$($bin delta compress --base $m/base --fine-tune $m/ft-c-headers --out $tmp/c24cal.delta.safetensors \
  --sparsity 2:4 --calibration $tmp/calibration.txt --json)"
python3 - "$cal" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
assert r["calibration_tokens"] > 1000 and r["calibrated_tensors"] == 28, r
PY

# run --delta serves the fine-tune over the base as a worker does: with an 8-bit delta its greedy
# text is the full fine-tune's, and not the base's.
$bin delta compress --base $m/base --fine-tune $m/ft-c-headers --out $tmp/c8.delta.safetensors \
  --bits 8 >/dev/null
gen() { $bin run "$@" --prompt '#include <stdio.h>' --max-tokens 24 --temperature 0 --ignore-eos; }
tuned="$(gen --model $m/base --delta $tmp/c8.delta.safetensors)"
[ "$tuned" = "$(gen --model $m/ft-c-headers)" ] || fail "run --delta: $tuned"
[ "$tuned" != "$(gen --model $m/base)" ] || fail "run --delta gave the base's text: $tuned"

# The bundled LoRA adapter (PEFT's format) goes wherever a delta file does: inspect, eval, run.
lora=$m/lora-c-headers
info="$($bin delta inspect $lora --base $m/base)"
grep -q "kind  *LoRA adapter (PEFT)" <<<"$info" || fail "inspect lora: $info"
grep -q "28 adapted projections, rank up to 16" <<<"$info" || fail "inspect lora: $info"
lora_ppl="$(ppl --model $m/base --delta $lora)"
python3 - "$base" "$lora_ppl" <<'PY'
import sys
base, lora = map(float, sys.argv[1:])
assert lora < base / 2.5, (base, lora)
PY
# With the embedding and the LM head adapted too, it comes within 30% of the full fine-tune.
lora_embed_ppl="$(ppl --model $m/base --delta $m/lora-c-headers-embed)"
python3 - "$full" "$lora_ppl" "$lora_embed_ppl" <<'PY'
import sys
full, lora, embed = map(float, sys.argv[1:])
assert embed < lora / 2 and embed < full * 1.3, (full, lora, embed)
PY
lora_text="$(gen --model $m/base --delta $lora)"
[ "$lora_text" != "$(gen --model $m/base)" ] || fail "run --delta LoRA gave the base's text"

# Errors: a usage error exits 2; a delta over the wrong base exits 1 and says so.
set +e
msg="$($bin delta compress --base $m/base --fine-tune $m/ft-man --out $tmp/x --bits 3 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q -- '--bits must be 2, 4 or 8' <<<"$msg" || fail "bad bits: $rc $msg"
msg="$($bin delta inspect $tmp/c.delta.safetensors --base $m/ft-man 2>&1)"; rc=$?
[ $rc = 1 ] && grep -q 'different base model' <<<"$msg" || fail "wrong base: $rc $msg"
msg="$($bin eval ppl --model $m/ft-man --delta $tmp/c.delta.safetensors --text $tmp/heldout.txt 2>&1)"; rc=$?
[ $rc = 1 ] && grep -q 'different base model' <<<"$msg" || fail "ppl wrong base: $rc $msg"
msg="$($bin delta compress --base $m/base --fine-tune $m/ft-man --out $tmp/x --calibration $tmp/calibration.txt 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q -- '--sparsity 2:4' <<<"$msg" || fail "dense calibration: $rc $msg"
msg="$($bin delta compress --base $m/base --fine-tune $m/ft-man --out $tmp/x --sparsity 2:4 --calibration $tmp/nope.txt 2>&1)"; rc=$?
[ $rc = 1 ] && grep -q -- '--calibration' <<<"$msg" || fail "missing calibration file: $rc $msg"
msg="$($bin run --model $m/ft-man --delta $tmp/c.delta.safetensors --prompt x 2>&1)"; rc=$?
[ $rc = 1 ] && grep -q 'different base model' <<<"$msg" || fail "run wrong base: $rc $msg"
msg="$($bin delta inspect $m/base/model.safetensors 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q 'metadata field format' <<<"$msg" || fail "not a delta: $rc $msg"
msg="$($bin delta inspect $lora 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q 'give --base DIR' <<<"$msg" || fail "lora without base: $rc $msg"
msg="$($bin delta inspect $lora --base worker/model/testdata/qwen3_f32 2>&1)"; rc=$?
[ $rc = 2 ] && grep -q 'outside the base' <<<"$msg" || fail "lora over another shape: $rc $msg"
echo PASS
