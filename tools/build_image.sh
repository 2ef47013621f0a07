#!/usr/bin/env bash
# Builds Strata's container image (strata-coordinator, strata-worker, stratactl, their shared libraries,
# the bundled strata-tiny model, its draft model and its two fine-tunes as 4-bit deltas; no base image) as an OCI
# archive, with no container engine. The manifests in k8s/ run it. See tools/image/build_image.py for what is in it.
#
# Usage:
#   tools/build_image.sh                       writes strata-image.tar (tag strata:dev)
#   tools/build_image.sh --out F --tag REPO/strata:TAG [--gzip] [-- BAZEL_FLAGS...]
#   tools/build_image.sh --load                also loads it into podman or docker, whichever is here
# Then, for example: skopeo copy oci-archive:strata-image.tar docker://REGISTRY/strata:TAG
#                or: kind load image-archive strata-image.tar   (a kind cluster for k8s/base)
set -euo pipefail
cd "$(dirname "$0")/.."

out=strata-image.tar
tag=strata:dev
load=0
extra=()
bazel_flags=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --gzip) extra+=(--gzip); shift ;;
    --load) load=1; shift ;;
    --) shift; bazel_flags=("$@"); break ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build_image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

tools/setup.sh
targets=(//worker/server:strata-worker //coordinator:strata-coordinator //cli:stratactl)
bazel build --noshow_progress "${bazel_flags[@]}" "${targets[@]}" >&2
bin_dir="$(bazel info "${bazel_flags[@]}" bazel-bin 2>/dev/null)"
revision="$(git rev-parse HEAD 2>/dev/null || true)"
# The bundled fine-tunes, compressed as a worker serves them (k8s/base: --fine_tune_dir).
deltas="$(mktemp -d)"
trap 'rm -rf "$deltas"' EXIT
for ft in c-headers man; do
  "$bin_dir/cli/stratactl" delta compress --base models/strata-tiny/base \
    --fine-tune "models/strata-tiny/ft-$ft" --out "$deltas/$ft.delta.safetensors" \
    --base-name strata-tiny --json >/dev/null
done
cp -r models/strata-tiny/lora-c-headers "$deltas/lora-c-headers"  # a LoRA adapter, served as-is
/usr/bin/python3 tools/image/build_image.py --out "$out" --tag "$tag" --revision "$revision" \
  --binary "$bin_dir/worker/server/strata-worker" --binary "$bin_dir/coordinator/strata-coordinator" \
  --binary "$bin_dir/cli/stratactl" --model "strata-tiny=models/strata-tiny/base" \
  --model "strata-tiny-draft=models/strata-tiny/draft" \
  --fine-tunes "strata-tiny=$deltas" "${extra[@]}"

if [ "$load" = 1 ]; then
  if command -v podman >/dev/null; then
    podman load -i "$out"
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    docker load -i "$out"
  else
    echo "build_image.sh: --load needs podman or a running Docker engine; $out is written" >&2
    exit 1
  fi
fi
