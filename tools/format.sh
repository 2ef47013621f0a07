#!/usr/bin/env bash
# Formats Strata's C++, CUDA and .proto sources with clang-format (.clang-format: Google style).
# Usage: tools/format.sh [--check]   (--check lists unformatted files and fails instead of rewriting)
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files '*.h' '*.cc' '*.cu' '*.cuh' '*.proto' | grep -v '^third_party/')
if [ "${1:-}" = "--check" ]; then
  bad=0
  for f in "${files[@]}"; do
    if ! clang-format --dry-run -Werror "$f" >/dev/null 2>&1; then
      echo "needs formatting: $f"
      bad=1
    fi
  done
  exit $bad
fi
clang-format -i "${files[@]}"
