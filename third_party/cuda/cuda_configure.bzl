"""Detects the CUDA toolkit and exposes it as the @local_cuda repository.

The toolkit is looked for under $CUDA_PATH, else /usr/local/cuda. It counts as present when nvcc, the
CUDA runtime, cuBLAS (with cuBLASLt) and NCCL are all there. Setting STRATA_CUDA=off (for example
`--repo_env=STRATA_CUDA=off`) forces a CPU-only build on a machine that has the toolkit.

@local_cuda provides:
  //:cuda_headers   the toolkit's headers (plus nccl.h)
  //:cudart         the CUDA runtime; carries the define STRATA_HAVE_CUDA=1 to everything above it
  //:cublas         cuBLAS and cuBLASLt
  //:nccl           NCCL
  //:defs.bzl       CUDA_ENABLED, CUDA_PATH, NVCC and CUDA_VERSION for the build macros
In a CPU-only build the libraries are empty and CUDA_ENABLED is False.
"""

_REQUIRED = [
    "bin/nvcc",
    "include/cuda_runtime.h",
    "include/cublas_v2.h",
    "include/nccl.h",
    "lib64/libcudart.so",
    "lib64/libcublas.so",
    "lib64/libcublasLt.so",
    "lib64/libnccl.so",
]

def _cpu_only(rctx, reason):
    rctx.file("BUILD.bazel", """\
# CPU-only build: {reason}
package(default_visibility = ["@//:cuda_users"])

cc_library(name = "cuda_headers")

cc_library(name = "cudart")

cc_library(name = "cublas")

cc_library(name = "nccl")
""".format(reason = reason))
    rctx.file("defs.bzl", """\
# CPU-only build: {reason}
CUDA_ENABLED = False
CUDA_PATH = ""
NVCC = ""
CUDA_VERSION = ""
""".format(reason = reason))

def _lib(name, libs, rpath):
    return """
cc_library(
    name = "{name}",
    linkopts = [
        "-L{rpath}",
{libs}        "-Wl,-rpath,{rpath}",
    ],
    deps = [":cuda_headers"],
)
""".format(name = name, rpath = rpath, libs = "".join(['        "-l%s",\n' % l for l in libs]))

def _cuda_configure_impl(rctx):
    if rctx.os.environ.get("STRATA_CUDA", "") == "off":
        _cpu_only(rctx, "STRATA_CUDA=off")
        return
    cuda_path = rctx.os.environ.get("CUDA_PATH", "") or "/usr/local/cuda"
    root = rctx.path(cuda_path)
    if not root.exists:
        _cpu_only(rctx, "no CUDA toolkit at " + cuda_path)
        return
    missing = [f for f in _REQUIRED if not rctx.path(cuda_path + "/" + f).exists]
    if missing:
        _cpu_only(rctx, "CUDA toolkit at %s lacks %s" % (cuda_path, ", ".join(missing)))
        return

    version = ""
    res = rctx.execute([cuda_path + "/bin/nvcc", "--version"])
    if res.return_code == 0:
        for line in res.stdout.splitlines():
            if "release" in line:
                version = line.split("release")[1].split(",")[0].strip()

    # Resolve symlinks so rpaths and the nvcc path stay valid whatever /usr/local/cuda later points at.
    real = str(root.realpath)
    rctx.symlink(real + "/include", "include")
    lib64 = real + "/lib64"

    build = """\
# CUDA {version} at {real}
package(default_visibility = ["@//:cuda_users"])

cc_library(
    name = "cuda_headers",
    hdrs = glob(
        ["include/**/*.h", "include/**/*.hpp", "include/**/*.cuh", "include/**/*.inl", "include/nv/**"],
        exclude = ["include/Openmp/**", "include/Openacc/**"],
    ),
    includes = ["include"],
)
""".format(version = version, real = real)
    build += _lib("cudart", ["cudart"], lib64).replace(
        "    deps = ",
        "    defines = [\"STRATA_HAVE_CUDA=1\"],\n    deps = ",
    )
    build += _lib("cublas", ["cublasLt", "cublas"], lib64)
    build += _lib("nccl", ["nccl"], lib64)
    rctx.file("BUILD.bazel", build)
    rctx.file("defs.bzl", """\
CUDA_ENABLED = True
CUDA_PATH = "{real}"
NVCC = "{real}/bin/nvcc"
CUDA_VERSION = "{version}"
""".format(real = real, version = version))

cuda_configure = repository_rule(
    implementation = _cuda_configure_impl,
    environ = ["CUDA_PATH", "STRATA_CUDA"],
    local = True,
)
