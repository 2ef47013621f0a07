"""strata_proto_library: C++ (and optionally gRPC) code from .proto files, with Debian's protoc.

protoc and grpc_cpp_plugin come from @system and run in one genrule per library. Import paths are
workspace-relative (`import "proto/strata/v1/common.proto";`), and so are the generated headers
(`#include "proto/strata/v1/common.pb.h"`).
"""

def strata_proto_library(name, srcs, deps = [], grpc = False, **kwargs):
    """A cc_library `name` generated from `srcs`.

    Args:
      name: the cc_library; `name + "_protos"` is the filegroup of its .proto files.
      srcs: .proto files in this package.
      deps: other strata_proto_library targets that `srcs` import (label with explicit name).
      grpc: also generate gRPC service stubs.
      **kwargs: passed to the cc_library (visibility, testonly, ...).
    """
    # This library's .proto files and, transitively, those they import.
    native.filegroup(
        name = name + "_protos",
        srcs = srcs + [d + "_protos" for d in deps],
        visibility = kwargs.get("visibility"),
        testonly = kwargs.get("testonly", False),
    )
    stems = [s[:-len(".proto")] for s in srcs]
    hdrs = [s + ".pb.h" for s in stems]
    cc_srcs = [s + ".pb.cc" for s in stems]
    if grpc:
        hdrs += [s + ".grpc.pb.h" for s in stems]
        cc_srcs += [s + ".grpc.pb.cc" for s in stems]

    dep_protos = [d + "_protos" for d in deps]
    tools = ["@system//:bin/protoc"]
    cmd = "$(location @system//:bin/protoc) -I. --cpp_out=$(GENDIR)"
    if grpc:
        tools.append("@system//:bin/grpc_cpp_plugin")
        cmd += (" --plugin=protoc-gen-grpc=$(location @system//:bin/grpc_cpp_plugin)" +
                " --grpc_out=generate_mock_code=false:$(GENDIR)")
    cmd += " $(SRCS)"

    native.genrule(
        name = name + "_gen",
        srcs = srcs + dep_protos,
        outs = hdrs + cc_srcs,
        tools = tools,
        # protoc compiles every file it is given; only this library's own files are passed.
        cmd = cmd.replace("$(SRCS)", " ".join(["$(location %s)" % s for s in srcs])),
        testonly = kwargs.get("testonly", False),
        visibility = ["//visibility:private"],
    )
    native.cc_library(
        name = name,
        srcs = cc_srcs,
        hdrs = hdrs,
        deps = deps + ["@system//:protobuf"] + (["@system//:grpc++"] if grpc else []),
        **kwargs
    )
