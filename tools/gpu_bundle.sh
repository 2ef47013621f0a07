#!/usr/bin/env bash
# Packs Strata's GPU-tagged tests and benchmarks to run on a separate GPU machine that lacks Debian's
# libraries: the binaries, every shared library they load that is not glibc or the NVIDIA driver, and a
# runner (run.sh) that runs them all, writes each one's log and results to a directory, and prints a
# summary. glibc itself is packed too and used only when the GPU machine's is older than this one's.
#
# Usage: tools/gpu_bundle.sh [--out DIR] [--skip-libs REGEX] [--filter REGEX] [-- BAZEL_FLAGS...]
#   --out DIR          where to write the bundle (default: gpu-bundle, which git ignores)
#   --skip-libs REGEX  leave out libraries whose file name matches (for example 'libcublas|libnccl' to
#                      use the GPU machine's own copies of large CUDA libraries, found at run time under
#                      /usr/local/cuda/lib64 or Python's nvidia-* packages)
#   --filter REGEX     only targets whose label matches
#   --tool LABEL       also pack this binary as a tool: packed with its libraries, not run by run.sh
#                      (repeatable; tools/gpu_check.sh runs the servers and CLI this way)
#   --also LABEL       also pack this test or binary (repeatable), e.g. a CPU test whose AVX-512 path
#                      only the GPU machine's processor can run
#
# On the GPU machine: DIR/run.sh RESULTS_DIR [NAME_REGEX]
# Targets: every cc_test and cc_binary tagged "gpu" (benchmarks are cc_binary targets under bench/; the
# runner passes them --out=RESULTS_DIR/NAME.json). Binaries are stripped of debug sections, and the
# bundle is also packed as DIR.tar.xz, small enough to travel with a checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

out=gpu-bundle
skip_libs='^$'
filter='.'
also=()
tools=()
bazel_flags=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --skip-libs) skip_libs="$2"; shift 2 ;;
    --filter) filter="$2"; shift 2 ;;
    --also) also+=("$2"); shift 2 ;;
    --tool) tools+=("$2"); shift 2 ;;
    --) shift; bazel_flags=("$@"); break ;;
    *) echo "gpu_bundle: unknown argument $1" >&2; exit 2 ;;
  esac
done

mapfile -t targets < <(bazel query --noshow_progress \
  'attr(tags, "\bgpu\b", kind("cc_test|cc_binary", //...))' 2>/dev/null | grep -E "$filter" || true)
targets+=("${also[@]}" "${tools[@]}")
if [ ${#targets[@]} -eq 0 ]; then
  echo "gpu_bundle: no gpu-tagged targets match '$filter'" >&2
  exit 1
fi
echo "gpu_bundle: building ${#targets[@]} target(s)" >&2
bazel build --noshow_progress "${bazel_flags[@]}" "${targets[@]}" >&2
bin_dir="$(bazel info "${bazel_flags[@]}" bazel-bin 2>/dev/null)"

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib" "$out/glibc"
: >"$out/MANIFEST"
# glibc and the driver stay with the GPU machine; everything else the binaries load is packed.
system_re='^(linux-vdso|ld-linux|libc\.so|libm\.so|libpthread\.so|libdl\.so|librt\.so|libresolv\.so|libutil\.so|libcuda\.so|libnvidia-)'
for t in "${targets[@]}"; do
  pkg="${t#//}"; pkg="${pkg%%:*}"; name="${t##*:}"
  src="$bin_dir/$pkg/$name"
  flat="$(echo "$pkg/$name" | tr '/' '.')"
  cp "$src" "$out/bin/$flat"
  chmod u+w "$out/bin/$flat"
  strip --strip-debug "$out/bin/$flat"
  kind=test
  case "$pkg" in bench|bench/*) kind=bench ;; esac
  for tool in "${tools[@]}"; do [ "$tool" = "$t" ] && kind=tool; done
  echo "$flat $kind $t" >>"$out/MANIFEST"
  while read -r lib path; do
    [ -n "$path" ] || continue
    if echo "$lib" | grep -Eq "$system_re"; then continue; fi
    if echo "$lib" | grep -Eq "$skip_libs"; then continue; fi
    [ -e "$out/lib/$lib" ] || cp -L "$path" "$out/lib/$lib"
  done < <(ldd "$src" | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }')
done
for lib in ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1; do
  p="$(ldconfig -p | awk -v l="$lib" '$1 == l && /x86-64/ && !found { print $NF; found = 1 }')"
  if [ -n "$p" ]; then cp -L "$p" "$out/glibc/$lib"; fi
done
# awk reads all of ldd's output: `head -1` could close the pipe first, and pipefail would make
# ldd's SIGPIPE end the script (it did, once in a while).
ldd --version | awk 'NR == 1 { print $NF }' >"$out/GLIBC_VERSION"
git rev-parse --short HEAD 2>/dev/null >"$out/COMMIT" || echo unknown >"$out/COMMIT"
cp tools/gpu_bundle_run.sh "$out/run.sh"
chmod +x "$out/run.sh"
for lib in "$out"/lib/*; do strip --strip-debug "$lib" 2>/dev/null || true; done
# xz -9: a 64 MiB window, so the CUDA kernels every binary carries compress to about one copy.
XZ_OPT=-9 tar -C "$(dirname "$out")" -cJf "$out.tar.xz" "$(basename "$out")"
echo "gpu_bundle: $(wc -l <"$out/MANIFEST") binaries, $(ls "$out/lib" | wc -l) libraries," \
  "$(du -sh "$out" | cut -f1) in $out, $(du -sh "$out.tar.xz" | cut -f1) packed in $out.tar.xz" >&2
