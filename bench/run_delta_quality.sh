#!/usr/bin/env bash
# Quality and size of compressed fine-tunes: for each bundled fine-tune and each delta format,
# the delta's size against the fine-tune's weights and its held-out perplexity against the full
# fine-tune's and the base's (stratactl eval ppl, context 512, the same protocol as
# models/strata-tiny/README.md). Prints a Markdown table (docs/PERFORMANCE.md, "Fine-tunes").
#
#   bench/run_delta_quality.sh [FORMATS...]      FORMATS like 4:none 2:4 (bits:sparsity; default all)
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
echo "| fine-tune | held-out | format | bits/weight | delta MB | vs bf16 fine-tune | ppl | full fine-tune | base |"
echo "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for ft in c-headers:c_headers man:man; do
  name=${ft%%:*} text=$m/heldout/${ft##*:}.txt
  full="$(ppl --model $m/ft-$name --text $text)"
  base="$(ppl --model $m/base --text $text)"
  for f in "${formats[@]}"; do
    bits=${f%%:*} sparsity=${f#*:}
    out=$tmp/$name.delta.safetensors
    r="$($bin delta compress --base $m/base --fine-tune $m/ft-$name --out $out --bits $bits --sparsity $sparsity --json)"
    read -r mb ratio bpw < <(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("%.2f %.2fx %.2f" % (r["delta_bytes"]/1e6, r["compression"], 16/r["compression"]))' "$r")
    p="$(ppl --model $m/base --delta $out --text $text)"
    echo "| $name | ${ft##*:} | ${bits}-bit $([ $sparsity = none ] && echo dense || echo 2:4) | $bpw | $mb | $ratio | $p | $full | $base |"
  done
done
