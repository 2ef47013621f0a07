#!/usr/bin/env bash
# Quality and size of compressed fine-tunes: for each bundled fine-tune and each delta format,
# the delta's size against the fine-tune's weights and its held-out perplexity against the full
# fine-tune's and the base's (stratactl eval ppl, context 512, the same protocol as
# models/strata-tiny/README.md). Prints a Markdown table (docs/PERFORMANCE.md, "Fine-tunes").
#
#   bench/run_delta_quality.sh [FORMATS...]      FORMATS like 4:none 2:4 (bits:sparsity; default all)
#   bench/run_delta_quality.sh calibration       2:4 chosen by magnitude against 2:4 chosen with
#                                                calibration (--calibration on the first half of each
#                                                held-out file; perplexity on the second half)
#   bench/run_delta_quality.sh lora              LoRA adapters extracted from each fine-tune
#                                                (tools/models/extract_lora.py, ranks 8, 16 and 32,
#                                                projections only and with the embedding and LM head)
set -euo pipefail
cd "$(dirname "$0")/.."
bazel build -c opt //cli:stratactl >/dev/null 2>&1
bin=bazel-bin/cli/stratactl
m=models/strata-tiny
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
formats=("$@")
[ ${#formats[@]} -gt 0 ] || formats=(8:none 4:none 2:none 8:2:4 4:2:4 2:2:4)
ppl() { $bin eval ppl "$@" --context 512 --json | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["perplexity"])'; }
# full and base: the fine-tune's and the base's perplexity on the text file $1.
scores() {
  full="$(ppl --model $m/ft-$name --text $1)"
  base="$(ppl --model $m/base --text $1)"
}
# name, text, full and base for a "NAME:HELDOUT" pair (fine-tune ft-NAME, heldout/HELDOUT.txt).
fine_tune() {
  name=${1%%:*} text=$m/heldout/${1##*:}.txt
  scores $text
}
if [ "${1:-}" = lora ]; then
  echo "| fine-tune | held-out | adapter | MB | ppl | full fine-tune | base |"
  echo "| --- | --- | --- | ---: | ---: | ---: | ---: |"
  for ft in c-headers:c_headers man:man; do
    fine_tune "$ft"
    for embeddings in "" --embeddings; do
      for rank in 8 16 32; do
        tools/models/extract_lora.py --base $m/base --fine-tune $m/ft-$name --rank $rank \
          $embeddings --out $tmp/lora >/dev/null
        mb="$(python3 -c 'import os,sys; print("%.2f" % (os.path.getsize(sys.argv[1]) / 1e6))' \
          $tmp/lora/adapter_model.safetensors)"
        p="$(ppl --model $m/base --delta $tmp/lora --text $text)"
        echo "| $name | ${ft##*:} | rank $rank, $([ -n "$embeddings" ] && echo "projections, embedding and head" || echo projections) | $mb | $p | $full | $base |"
        rm -rf $tmp/lora
      done
    done
  done
  exit 0
fi
if [ "${1:-}" = calibration ]; then
  echo "| fine-tune | format | ppl, magnitude 2:4 | ppl, calibrated 2:4 | change | full fine-tune | base |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
  for ft in c-headers:c_headers man:man; do
    name=${ft%%:*} text=$m/heldout/${ft##*:}.txt
    # Halves at the line break nearest the middle: calibrate on one, measure on the other.
    python3 - "$text" "$tmp/first.txt" "$tmp/second.txt" <<'PY'
import sys
s = open(sys.argv[1], encoding="utf-8").read()
mid = s.index("\n", len(s) // 2) + 1
open(sys.argv[2], "w", encoding="utf-8").write(s[:mid])
open(sys.argv[3], "w", encoding="utf-8").write(s[mid:])
PY
    scores $tmp/second.txt
    for bits in 8 4 2; do
      $bin delta compress --base $m/base --fine-tune $m/ft-$name --out $tmp/p.delta.safetensors \
        --bits $bits --sparsity 2:4 >/dev/null
      $bin delta compress --base $m/base --fine-tune $m/ft-$name --out $tmp/c.delta.safetensors \
        --bits $bits --sparsity 2:4 --calibration $tmp/first.txt >/dev/null
      p="$(ppl --model $m/base --delta $tmp/p.delta.safetensors --text $tmp/second.txt)"
      c="$(ppl --model $m/base --delta $tmp/c.delta.safetensors --text $tmp/second.txt)"
      echo "| $name | ${bits}-bit 2:4 | $p | $c | $(python3 -c 'import sys; print("%+.1f%%" % (100 * (float(sys.argv[2]) / float(sys.argv[1]) - 1)))' $p $c) | $full | $base |"
    done
  done
  exit 0
fi
echo "| fine-tune | held-out | format | bits/weight | delta MB | vs bf16 fine-tune | ppl | full fine-tune | base |"
echo "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for ft in c-headers:c_headers man:man; do
  fine_tune "$ft"
  for f in "${formats[@]}"; do
    bits=${f%%:*} sparsity=${f#*:}
    out=$tmp/$name.delta.safetensors
    r="$($bin delta compress --base $m/base --fine-tune $m/ft-$name --out $out --bits $bits --sparsity $sparsity --json)"
    read -r mb ratio bpw < <(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("%.2f %.2fx %.2f" % (r["delta_bytes"]/1e6, r["compression"], 16/r["compression"]))' "$r")
    p="$(ppl --model $m/base --delta $out --text $text)"
    echo "| $name | ${ft##*:} | ${bits}-bit $([ $sparsity = none ] && echo dense || echo 2:4) | $bpw | $mb | $ratio | $p | $full | $base |"
  done
done
