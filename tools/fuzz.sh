#!/usr/bin/env bash
# Coverage-guided fuzzing of one of tests/fuzz's targets with clang's libFuzzer, AddressSanitizer
# and UndefinedBehaviorSanitizer, for as long as one likes. `bazel test` runs each target's corpus
# and a fixed number of seeded mutations (tests/fuzz/fuzz_driver.cc); this finds what those miss.
#
# Usage:
#   tools/fuzz.sh TARGET [SECONDS] [LIBFUZZER_FLAG...]   fuzz for SECONDS (default 300)
#   tools/fuzz.sh TARGET --merge                          add the working corpus's new coverage to
#                                                         tests/fuzz/corpus/TARGET, to commit
#   tools/fuzz.sh TARGET --replay FILE...                 run inputs (a crash) once
#   tools/fuzz.sh --list                                  the targets
#
# TARGET is json_schema, regex, gbnf, choice, openai_request, jinja, tool_calls, tokenizer,
# submit_request, http_gateway or fine_tune. The build uses clang in its own Bazel output base
# (~/.cache/strata/fuzz-bazel), so the gcc build's cache stays as it is; it installs clang and
# libFuzzer (libclang-rt-14-dev) if missing. Inputs that reach new code go to
# ~/.cache/strata/fuzz/TARGET (kept between runs); a crash, a failed FUZZ_CHECK or an input that
# runs past 20 s goes to ~/.cache/strata/fuzz/TARGET-crashes, and its path is printed. Fix the
# bug, then copy the input into tests/fuzz/corpus/TARGET so that `bazel test` replays it for good.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
targets=(json_schema regex gbnf choice openai_request jinja tool_calls tokenizer submit_request
  http_gateway fine_tune)

if [[ $# -lt 1 || "$1" == "--help" || "$1" == "-h" ]]; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
if [[ "$1" == "--list" ]]; then
  printf '%s\n' "${targets[@]}"
  exit 0
fi
target="$1"
shift
if [[ ! " ${targets[*]} " =~ " ${target} " ]]; then
  echo "tools/fuzz.sh: no target \"${target}\"; the targets: ${targets[*]}" >&2
  exit 2
fi

tools/setup.sh
if ! command -v clang++ > /dev/null || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a > /dev/null 2>&1; then
  sudo_=""
  [[ $(id -u) -ne 0 ]] && sudo_=sudo
  $sudo_ apt-get update -q
  $sudo_ apt-get install -y -q clang libclang-rt-14-dev
fi

cache="${HOME}/.cache/strata"
bazel_fuzz=(bazel "--output_base=${cache}/fuzz-bazel")
flags=(
  --repo_env=CC=clang --repo_env=CXX=clang++
  --symlink_prefix=/  # leaves bazel-bin and friends pointing at the gcc build
  --disk_cache="${cache}/fuzz-bazel-disk"
  --copt=-fsanitize=fuzzer-no-link,address,undefined --copt=-fno-sanitize=vptr
  --copt=-fno-omit-frame-pointer --copt=-gline-tables-only
  --linkopt=-fsanitize=fuzzer,address,undefined --linkopt=-fno-sanitize=vptr
  --linkopt=-fsanitize-link-c++-runtime  # (bazel links with clang, not clang++)
  # clang warns where gcc does not; the gcc build keeps -Werror.
  --per_file_copt=.*@-Wno-error
)
"${bazel_fuzz[@]}" build "${flags[@]}" "//tests/fuzz:${target}_fuzz_fuzzer"
bin="$("${bazel_fuzz[@]}" info "${flags[@]}" bazel-bin 2> /dev/null)/tests/fuzz/${target}_fuzz_fuzzer"
work="${cache}/fuzz/${target}"
crashes="${cache}/fuzz/${target}-crashes"
mkdir -p "$work" "$crashes"
seeds="${root}/tests/fuzz/corpus/${target}"
dict="${root}/tests/fuzz/dicts/${target}.dict"
# Targets read their data (tokenizers, the bundled model) relative to the workspace.
cd "${bin}.runfiles/strata"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

case "${1:-}" in
  --merge)
    exec "$bin" -merge=1 "$seeds" "$work"
    ;;
  --replay)
    shift
    exec "$bin" "$@"
    ;;
esac
seconds="${1:-300}"
max_len=4096
[[ "$target" == fine_tune ]] && max_len=16384  # (safetensors files)
extra=()
# gRPC starts threads of its own while an input runs (its channel to the unreachable coordinator)
# and frees their state later: libFuzzer's check after each input would call that a leak.
[[ "$target" == http_gateway ]] && extra=(-detect_leaks=0)
[[ $# -gt 0 ]] && shift
exec "$bin" -max_total_time="$seconds" -max_len="$max_len" -timeout=20 -dict="$dict" \
  -artifact_prefix="${crashes}/" -print_final_stats=1 "${extra[@]}" "$@" "$work" "$seeds"
