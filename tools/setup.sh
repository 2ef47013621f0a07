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
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done" >&2
