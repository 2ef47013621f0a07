#!/usr/bin/env bash
# Keeps Bazel's disk cache (--disk_cache in .bazelrc) from filling the disk. Bazel 4 never deletes from
# it, and each configuration (opt, ASan, TSan) and each source change adds entries, so an unattended
# cache grows by gigabytes a day. When the cache is over its size limit, or the filesystem holding it
# has too little space left, this deletes the least recently used entries (by the later of access and
# modification time) until the cache is under 60% of the limit and the free space is back.
#
# Safe between builds: Bazel treats an action whose cached entry or output blob is missing as a cache
# miss and runs the action again. Don't run it while a build using the cache is in progress.
#
# Usage: tools/prune_disk_cache.sh [CACHE_DIR]
# Environment: STRATA_DISK_CACHE_MAX_GB (default 30), STRATA_DISK_MIN_FREE_GB (default 12).
set -euo pipefail

dir="${1:-$HOME/.cache/strata/bazel-disk}"
max_gb="${STRATA_DISK_CACHE_MAX_GB:-30}"
min_free_gb="${STRATA_DISK_MIN_FREE_GB:-12}"
[[ -d "$dir" ]] || exit 0
[[ "$max_gb" =~ ^[0-9]+$ && "$min_free_gb" =~ ^[0-9]+$ ]] || {
  echo "prune_disk_cache: STRATA_DISK_CACHE_MAX_GB and STRATA_DISK_MIN_FREE_GB must be whole numbers of GB" >&2
  exit 2
}

gb=$((1024 * 1024 * 1024))
used=$(du -sb "$dir" | cut -f1)
free=$(($(df -P -B1 "$dir" | awk 'NR == 2 { print $4 }')))
limit=$((max_gb * gb))
need_free=$((min_free_gb * gb))
if ((used <= limit && free >= need_free)); then
  exit 0
fi

# Delete down to 60% of the limit, and further if the disk still needs room.
target=$((limit * 6 / 10))
if ((free < need_free)); then
  shortfall=$((need_free - free))
  if ((used - shortfall < target)); then target=$((used - shortfall)); fi
  if ((target < 0)); then target=0; fi
fi
to_free=$((used - target))

# Oldest first; the last used time of an entry is its access or write time, whichever is later.
# With relatime a read refreshes the access time only once the old one is a day old, so an entry
# written within the last day looks unused since it was written however often builds hit it: a
# prune may delete entries still in use, which the next build recomputes once (after the first
# prune, 66 GB to 19 GB, a fresh clone's .ci/run recompiled the CUDA kernels and took 10 minutes).
list=$(mktemp)
trap 'rm -f "$list"' EXIT
freed=$(find "$dir" -type f -printf '%A@ %T@ %s %p\n' |
  awk '{ t = ($1 > $2) ? $1 : $2; print t, $0 }' |
  sort -n -k1,1 |
  awk -v want="$to_free" -v list="$list" '
    freed >= want { next }
    {
      path = $0
      sub(/^[^ ]+ [^ ]+ [^ ]+ [^ ]+ /, "", path)
      printf "%s%c", path, 0 > list
      freed += $4
    }
    END { printf "%.0f\n", freed }')
xargs -0 -r rm -f -- <"$list"
echo "prune_disk_cache: $dir was $((used / gb)) GB with $((free / gb)) GB free on its disk;" \
  "deleted $((freed / gb)) GB of least recently used entries" >&2
