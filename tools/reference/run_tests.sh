#!/usr/bin/env bash
set -euo pipefail
cd tools/reference
# The torch cross-check (skipped where python3-torch is absent) imports the training model.
export PYTHONPATH="$PWD/../models"
exec /usr/bin/python3 -B -m unittest discover -s . -p 'test_*.py'
