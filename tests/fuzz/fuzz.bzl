"""strata_fuzz_test: one fuzz target (tests/fuzz/fuzz_target.h), run two ways."""

def strata_fuzz_test(name, srcs, deps, corpus, data = [], copts = [], runs = 2000, max_len = 4096, size = "small"):
    """A fuzz target NAME and its two drivers.

    NAME_test runs the corpus and `runs` seeded mutations of it through fuzz_driver.cc (part of
    `bazel test //...`). NAME_fuzzer (tagged manual) is the bare target for tools/fuzz.sh, which
    links it with libFuzzer.

    Args:
      name: the target's name.
      srcs: its source, defining STRATA_FUZZ_TARGET.
      deps: what it tests.
      corpus: the corpus directory under tests/fuzz/corpus.
      data: files the target reads at run time (models, tokenizers).
      copts: extra compiler options (a -D picking a variant).
      runs: mutated inputs the test runs after the corpus.
      max_len: the longest mutated input, in bytes.
      size: the test's size.
    """
    native.cc_library(
        name = name + "_target",
        testonly = True,
        srcs = srcs,
        copts = copts,
        deps = deps + [":fuzz_target"],
        alwayslink = True,
    )
    corpus_files = native.glob(["corpus/%s/*" % corpus])
    native.cc_test(
        name = name + "_test",
        size = size,
        args = [
            "--runs=%d" % runs,
            "--max_len=%d" % max_len,
            "--dict=tests/fuzz/dicts/%s.dict" % corpus,
            "tests/fuzz/corpus/" + corpus,
        ],
        data = data + corpus_files + ["dicts/%s.dict" % corpus],
        deps = [
            ":fuzz_driver",
            ":" + name + "_target",
        ],
    )
    native.cc_binary(
        name = name + "_fuzzer",
        testonly = True,
        data = data,
        tags = ["manual"],
        deps = [":" + name + "_target"],
    )
