"""cuda_library: the one macro through which Strata's CUDA sources build.

Each .cu file compiles with the toolkit's nvcc into one relocatable object holding machine code for every
arch in `archs` plus PTX for the newest, so the library runs on A100 (sm_80) and H100/H200 (sm_90) and
JIT-compiles on anything newer. `--define=strata_cuda_archs=90` (comma-separated) replaces every
library's archs, and `--define=strata_cuda_ptx=0` leaves the PTX out: tools/gpu_check.sh's bundle
builds for the H100/H200 alone that way, so that it fits beside a checkout on the device machine.
The objects link into an ordinary cc_library with cudart, so C++ targets
depend on a cuda_library like on any other. Where @local_cuda found no toolkit, the library keeps only its
headers and carries no STRATA_HAVE_CUDA define, so callers compile their CPU-only path.
"""

load("@local_cuda//:defs.bzl", "CUDA_ENABLED", "NVCC")

# SASS for each; PTX for the last.
DEFAULT_ARCHS = ["80", "90"]

_NVCC_FLAGS = [
    "-std=c++20",
    "-O3",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "-Xcompiler=-fPIC,-Wall,-Wextra,-Werror",
    "--Werror=all-warnings",
]

def _cuda_objects_impl(ctx):
    cc_infos = [d[CcInfo] for d in ctx.attr.deps if CcInfo in d]
    comp = cc_common.merge_cc_infos(cc_infos = cc_infos).compilation_context
    archs = ctx.attr.archs
    if ctx.var.get("strata_cuda_archs"):
        archs = [a.strip() for a in ctx.var["strata_cuda_archs"].split(",") if a.strip()]
        if not archs:
            fail("--define=strata_cuda_archs names no compute capability")
    gencode = []
    for a in archs:
        gencode.append("-gencode=arch=compute_%s,code=sm_%s" % (a, a))
    if ctx.var.get("strata_cuda_ptx", "1") != "0":
        last = archs[-1]
        gencode.append("-gencode=arch=compute_%s,code=compute_%s" % (last, last))

    inc = ["-I.", "-I" + ctx.bin_dir.path]
    for d in comp.quote_includes.to_list():
        inc += ["-I" + d]
    for d in comp.includes.to_list():
        inc += ["-I" + d]
    for d in comp.system_includes.to_list():
        inc += ["-isystem", d]
    defs = ["-D" + d for d in comp.defines.to_list()]

    inputs = depset(ctx.files.hdrs, transitive = [comp.headers])
    objs = []
    for src in ctx.files.srcs:
        stem = src.basename[:-len(src.extension) - 1]
        obj = ctx.actions.declare_file("_nvcc/%s/%s.o" % (ctx.label.name, stem))
        ctx.actions.run(
            executable = NVCC,
            arguments = _NVCC_FLAGS + gencode + ctx.attr.copts + inc + defs +
                        ["-c", src.path, "-o", obj.path],
            inputs = depset([src], transitive = [inputs]),
            outputs = [obj],
            mnemonic = "Nvcc",
            progress_message = "nvcc %s" % src.short_path,
            use_default_shell_env = True,
        )
        objs.append(obj)
    return [DefaultInfo(files = depset(objs))]

_cuda_objects = rule(
    implementation = _cuda_objects_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = [".cu"]),
        "hdrs": attr.label_list(allow_files = [".h", ".cuh"]),
        "deps": attr.label_list(providers = [CcInfo]),
        "copts": attr.string_list(),
        "archs": attr.string_list(),
    },
)

def cuda_library(name, srcs, hdrs = [], cuda_hdrs = [], deps = [], copts = [], archs = DEFAULT_ARCHS, **kwargs):
    """A cc_library whose .cu sources compile with nvcc.

    Args:
      name: the library.
      srcs: .cu files, each compiled by nvcc to one object, and host .cc files that use the CUDA runtime
        API, compiled by the C++ compiler. Both are left out of a CPU-only build.
      hdrs: host-visible headers (.h) that dependents include.
      cuda_hdrs: device headers (.cuh) that only the .cu files include.
      deps: cc_library dependencies; their headers and defines reach nvcc.
      copts: extra nvcc flags.
      archs: compute capabilities to emit SASS for; PTX is emitted for the last.
      **kwargs: passed to the cc_library (visibility, tags, testonly, ...).
    """
    if not CUDA_ENABLED:
        native.cc_library(name = name, hdrs = hdrs, deps = deps, **kwargs)
        return
    cu_srcs = [s for s in srcs if s.endswith(".cu")]
    cc_srcs = [s for s in srcs if not s.endswith(".cu")]
    objs = [":" + name + "_nvcc"] if cu_srcs else []
    if cu_srcs:
        _cuda_objects(
            name = name + "_nvcc",
            srcs = cu_srcs,
            hdrs = hdrs + cuda_hdrs,
            deps = deps + ["@local_cuda//:cudart"],
            copts = copts,
            archs = archs,
            testonly = kwargs.get("testonly", False),
            visibility = ["//visibility:private"],
        )
    native.cc_library(
        name = name,
        srcs = cc_srcs + objs,
        hdrs = hdrs,
        deps = deps + ["@local_cuda//:cudart"],
        **kwargs
    )
