#!/usr/bin/env bash
# The Kubernetes manifests and container image, end to end: see tests/k8s_test.py.
set -euo pipefail
exec /usr/bin/python3 -u tests/k8s_test.py
