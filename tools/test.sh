#!/usr/bin/env bash
# The test command: installs what the build needs (tools/setup.sh, quiet when nothing is missing),
# then runs every test that needs no GPU, then memtier's and the collectives' tests under ASan and
# TSan. Extra arguments go to
# `bazel test` (for example --config=asan) and skip the sanitizer passes.
# GPU-tagged tests build here too; run them with `bazel test --config=gpu //...` on a machine with a
# GPU, or pack them for one with tools/gpu_bundle.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
bazel test //... "$@"
# The KV store's threads and I/O and the tensor-parallel collectives, again under the sanitizers
# (both synchronize through std:: primitives, which TSAN sees; see .bazelrc for why other threaded
# tests are tagged no_tsan). Each rank maps the collectives' shared memory at its own address, so
# TSAN checks each rank's own accesses, not how ranks share data: the barrier protocol's argument
# is in shm_collectives.h, and the conformance suite's bitwise checks test it.
if [[ $# -eq 0 ]]; then
  # (And the speculative decoding engine paths, whose drafts index past a sequence's tokens, and
  # the LoRA adapter loader, which parses files it is given, and the API keys' store and its
  # reloading thread, the access log's writer, and the cluster secret's reloading, and the
  # periodic thread that runs those reloads; and the delta cache, whose entries outlive their
  # registration while pinned or loading, with the fine-tune directory's rescans over it; and
  # KV copies between workers, whose fetcher threads and parked requests are cancelled midway,
  # and whose KV transfer connections are cancelled, refused and stopped (TSAN too);
  # and disaggregated serving end to end, whose calls hand over from one worker's stream to
  # another's, with ASAN builds of the coordinator and workers; and TLS, whose certificate checks
  # hold OpenSSL objects, end to end over a TLS cluster too, and whose HTTPS bridge pumps bytes
  # on threads of its own (TSAN too); and the engine, whose waiting queue holds sequences in
  # ordered sets and indexes them by request id, freed as they finish, fail or are cancelled;
  # and the fuzz targets, whose inputs are built to break the parsers.)
  bazel test --config=asan //memtier/... //worker/comm/... //coordinator:jinja_test \
    //coordinator:api_keys_test //coordinator:access_log_test //common:secrets_test \
    //common:periodic_test \
    //coordinator:tool_calls_test //grammar/... //worker/engine:engine_speculative_test \
    //worker/engine:engine_test \
    //worker/engine:ngram_draft_test //worker/engine:draft_model_test //worker/model:lora_test \
    //worker/engine:delta_cache_test //worker/server:fine_tune_dir_test \
    //worker/server:kv_fetch_test //worker/server:kv_transfer_test //tests:disaggregation_test \
    //common:tls_test //common:tls_stream_test //tests:tls_cluster_test //tests/fuzz/...
  bazel test --config=tsan //memtier/... //worker/comm/... //worker/server:kv_transfer_test \
    //common:tls_stream_test
  bazel test --config=tsan //worker/engine:engine_test --test_filter='EngineTiersTest.*'
  # Structured output's masks are computed on several threads and warmed on another.
  bazel test --config=tsan //worker/engine:engine_structured_test
fi
