#!/bin/sh
echo "coverage reports are not available in Strata's offline Bazel workspace" >&2
exit 1
