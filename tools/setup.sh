#!/usr/bin/env bash
# Installs what Strata needs to build and test from Debian 12's archive. Idempotent and quiet: when every
# package is present it prints nothing and touches nothing; otherwise it runs apt-get update once and
# installs only what is missing. Needs root (or sudo) only when something is missing.
#
# Usage: tools/setup.sh
set -euo pipefail

PACKAGES=(
  bazel-bootstrap        # Bazel 4.2.3
  bazel-platforms        # @platforms
  build-essential
  pkg-config
  git
  libgrpc++-dev          # gRPC C++ (also libgrpc++_reflection)
  libssl-dev             # TLS: certificate checks and test certificates (common/tls)
  openssl                # tools/make_dev_certs.sh (tests/k8s_test's TLS phase)
  protobuf-compiler
  protobuf-compiler-grpc # grpc_cpp_plugin
  libprotobuf-dev
  libabsl-dev            # Abseil 20220623
  liburing-dev
  libxxhash-dev
  libgtest-dev
  libgmock-dev
  libbenchmark-dev
  libsimdjson-dev        # JSON (config.json, tokenizer.json, safetensors headers)
  libpcre2-dev           # tokenizer pre-tokenizer regexes (Unicode properties, lookahead)
  libicu-dev             # Unicode normalization (NFC, NFKC) for tokenizers
  libopenblas-dev        # CPU GEMM
  libopenblas0-pthread
  python3
  python3-numpy          # reference forward pass used to generate test data
  python3-yaml           # tests/k8s_test reads the Kubernetes manifests
  python3-jsonschema     # grammar/schema_soundness_test validates generated JSON independently
  iproute2               # tests/k8s_test gives each pod its own network namespace
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "setup: done" >&2
fi

# The Kubernetes API schemas tests/k8s_test validates k8s/ against (npm's kubernetes-models, pinned by
# tests/k8s_schema/package-lock.json), outside the checkout. They need Node.js 20 or newer; without
# it, or without the npm registry, the test still runs every other check and says so.
schema_dir="$HOME/.cache/strata/k8s-schema"
lock="$(dirname "$0")/../tests/k8s_schema/package-lock.json"
if command -v npm >/dev/null && node -e 'process.exit(parseInt(process.versions.node) >= 20 ? 0 : 1)' 2>/dev/null &&
  ! cmp -s "$lock" "$schema_dir/package-lock.json"; then
  mkdir -p "$schema_dir"
  cp "$(dirname "$0")/../tests/k8s_schema/package.json" "$lock" "$schema_dir/"
  if ! (cd "$schema_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null 2>&1); then
    rm -f "$schema_dir/package-lock.json"
    echo "setup: could not install the Kubernetes schemas (npm ci in $schema_dir); k8s_test skips that check" >&2
  fi
fi

# Bazel never trims its disk cache; keep it (and the disk under it) within bounds.
"$(dirname "$0")/prune_disk_cache.sh"
