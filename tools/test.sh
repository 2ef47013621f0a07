#!/usr/bin/env bash
# The test command: installs what the build needs (tools/setup.sh, quiet when nothing is missing), then
# runs every test that needs no GPU. Extra arguments go to `bazel test` (for example --config=asan).
# GPU-tagged tests build here too; run them with `bazel test --config=gpu //...` on a machine with a
# GPU, or pack them for one with tools/gpu_bundle.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
exec bazel test //... "$@"
