#!/usr/bin/env bash
set -euo pipefail
want="third_party/system.BUILD"
got="$(mktemp)"
tools/gen_system_build.sh "$got"
if ! diff -u "$want" "$got"; then
  echo "FAIL: third_party/system.BUILD is stale; run tools/gen_system_build.sh third_party/system.BUILD" >&2
  exit 1
fi
echo "system.BUILD matches pkg-config"
