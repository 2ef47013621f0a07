#!/usr/bin/env bash
# The disk tier's I/O path (bench/disk_bench: memtier's IoRing alone, then the DiskTier with its I/O
# thread and per-read checks) against fio on the same file, block size and queue depth, all with
# io_uring, O_DIRECT and registered (fixed) buffers. Recorded in
# docs/PERFORMANCE.md. Installs fio from Debian if it is missing.
# Usage: bench/run_disk_bench.sh [FILE] [BLOCK_KIB] [QUEUE_DEPTH] [FILE_MIB] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
file=${1:-/tmp/strata-disk-bench}
bs=${2:-2048}
qd=${3:-32}
mib=${4:-4096}
secs=${5:-10}
if ! command -v fio > /dev/null; then
  sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq fio > /dev/null
fi
bazel build --noshow_progress //bench:disk_bench 2>&1 | grep -v 'INFO:\|Loading\|Analyzing' || true
bin=$(bazel info bazel-bin 2>/dev/null)
for api in ring tier; do
  echo "== strata disk_bench --api=$api"
  "$bin/bench/disk_bench" --api=$api --path="$file" --file_mib="$mib" --block_kib="$bs" \
    --queue_depth="$qd" --seconds="$secs"
done
for rw in randwrite randread; do
  echo "== fio $rw"
  fio --name=strata-$rw --filename="$file" --size="${mib}M" --rw=$rw --bs="${bs}k" --iodepth="$qd" \
    --ioengine=io_uring --direct=1 --fixedbufs --time_based --runtime="$secs" --group_reporting \
    --output-format=terse --terse-version=3 | awk -F';' -v rw=$rw '{
      kib = (rw == "randread") ? $7 : $48;
      printf "fio %-12s %8.3f GB/s\n", rw, kib * 1024 / 1e9 }'
done
rm -f "$file"
