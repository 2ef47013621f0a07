#!/usr/bin/env python3
"""Writes Strata's container image as an OCI image archive, with no container engine.

The image holds the servers and CLI, every shared library they load (glibc included, so it needs no base
image), and the bundled model, in three layers ordered from least to most often changed:

  1. libraries  /lib64/ld-linux-x86-64.so.2 and /usr/lib/strata/*.so* (each under the name the binaries
                ask for; found with ldd). The NVIDIA driver (libcuda.so.1) is not packed: the NVIDIA
                container toolkit mounts the node's copy into GPU pods.
  2. models     /models/NAME/... for each --model NAME=DIR, and /fine-tunes/NAME/*.delta.safetensors
                for each --fine-tunes NAME=DIR (fine-tunes of model NAME, as `stratactl delta
                compress` writes them; a worker serves them with --fine_tune_dir), with DIR's
                LoRA adapter subdirectories (adapter_config.json, adapter_model.safetensors).
  3. strata     /usr/local/bin/<binaries>, /etc/{passwd,group,nsswitch.conf,host.conf}, /tmp and
                /var/lib/strata (the disk KV tier's default home, owned by the image's user).

The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) that also carries Docker's
manifest.json, so `podman load`, `docker load` and `skopeo copy oci-archive:...` all take it. Every
entry has a fixed owner and time (SOURCE_DATE_EPOCH, default 0), so the same inputs give the same
digests. The image runs as user 65532 (strata) and sets LD_LIBRARY_PATH to /usr/lib/strata.

Usage:
  build_image.py --out strata-image.tar --tag strata:dev \
      --binary bazel-bin/worker/server/strata-worker --binary ... --model strata-tiny=models/strata-tiny/base \
      [--fine-tunes strata-tiny=DIR]
  build_image.py --unpack strata-image.tar --rootfs DIR   # what a runtime does: layers applied in order
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

LIB_DIR = "usr/lib/strata"
BIN_DIR = "usr/local/bin"
LOADER = "lib64/ld-linux-x86-64.so.2"
UID = 65532
# Loaded from the node at run time, never packed.
HOST_LIBS = re.compile(r"^(linux-vdso\.so|libcuda\.so|libnvidia-)")

ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/sbin/nologin\nstrata:x:%d:%d:strata:/var/lib/strata:/sbin/nologin\n"
    % (UID, UID),
    "etc/group": "root:x:0:\nstrata:x:%d:\n" % UID,
    # glibc 2.34+ has the files and dns backends built in; these name the order and ask for every
    # address of a name (a headless Service's A records, or several /etc/hosts lines).
    "etc/nsswitch.conf": "hosts: files dns\n",
    "etc/host.conf": "multi on\n",
}


def fail(msg):
    print("build_image: " + msg, file=sys.stderr)
    sys.exit(1)


def shared_libraries(binary):
    """Returns {soname: resolved path} for what `binary` loads, and the dynamic loader's path."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if out.returncode != 0:
        fail("ldd %s: %s" % (binary, out.stderr.strip() or out.stdout.strip()))
    libs, loader = {}, None
    for line in out.stdout.splitlines():
        line = line.strip()
        m = re.match(r"^(\S+) => (\S+) \(0x[0-9a-f]+\)$", line)
        if m:
            name, path = m.groups()
            if HOST_LIBS.match(name):
                continue
            libs[name] = path
            continue
        if "not found" in line:
            fail("%s: %s" % (binary, line))
        m = re.match(r"^(/\S*ld-linux\S*) \(0x[0-9a-f]+\)$", line)
        if m:
            loader = m.group(1)
    if loader is None:
        fail("%s: no dynamic loader in ldd's output (a static binary needs no image libraries)" % binary)
    return libs, loader


class Layer:
    """A layer's entries: {path in image: (kind, source or text, mode, uid)}; written sorted."""

    def __init__(self, name):
        self.name = name
        self.entries = {}

    def _parents(self, path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            self.entries.setdefault(d, ("dir", None, 0o755, 0))

    def dir(self, path, mode=0o755, uid=0):
        self._parents(path)
        self.entries[path] = ("dir", None, mode, uid)

    def file(self, path, source, mode=None):
        self._parents(path)
        if mode is None:
            mode = 0o755 if os.access(source, os.X_OK) else 0o644
        self.entries[path] = ("file", source, mode, 0)

    def text(self, path, text, mode=0o644):
        self._parents(path)
        self.entries[path] = ("text", text.encode(), mode, 0)

    def tree(self, path, source_dir):
        if not os.path.isdir(source_dir):
            fail("%s is not a directory" % source_dir)
        for root, dirs, files in os.walk(source_dir, followlinks=True):
            dirs.sort()
            rel = os.path.relpath(root, source_dir)
            base = path if rel == "." else path + "/" + rel
            self.dir(base)
            for f in sorted(files):
                self.file(base + "/" + f, os.path.join(root, f), 0o644)

    def write(self, fileobj, mtime):
        """Writes the layer as an uncompressed tar to fileobj."""
        with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                kind, src, mode, uid = self.entries[path]
                info = tarfile.TarInfo(path)
                info.mtime, info.mode, info.uid, info.gid = mtime, mode, uid, uid
                info.uname = info.gname = ""
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif kind == "text":
                    info.size = len(src)
                    tar.addfile(info, io.BytesIO(src))
                else:
                    info.size = os.path.getsize(src)
                    with open(src, "rb") as f:
                        tar.addfile(info, f)


class HashingWriter:
    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b):
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def check_glibc():
    """The image relies on glibc 2.34+, whose libc has the files and dns name lookups built in (no
    libnss_*.so to pack)."""
    version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    m = re.match(r"glibc (\d+)\.(\d+)", version)
    if not m or (int(m.group(1)), int(m.group(2))) < (2, 34):
        fail("this host's C library is %r: the image needs glibc 2.34 or newer (its name lookups "
             "are built into libc), so build it on Debian 12 or similar" % version)


def build(args):
    check_glibc()
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    libs_layer, models_layer, strata_layer = Layer("libraries"), Layer("models"), Layer("strata")

    all_libs, loader = {}, None
    for b in args.binary:
        if not os.path.isfile(b):
            fail("--binary %s: no such file" % b)
        libs, loader = shared_libraries(b)
        all_libs.update(libs)
        strata_layer.file(BIN_DIR + "/" + os.path.basename(b), b, 0o755)
    libs_layer.file(LOADER, os.path.realpath(loader), 0o755)
    for name, path in sorted(all_libs.items()):
        libs_layer.file(LIB_DIR + "/" + name, os.path.realpath(path), 0o755)

    for spec in args.model:
        name, sep, src = spec.partition("=")
        if not sep or not re.match(r"^[A-Za-z0-9._-]+$", name):
            fail("--model %r: want NAME=DIR with NAME of letters, digits, '.', '_' or '-'" % spec)
        if not os.path.isfile(os.path.join(src, "config.json")):
            fail("--model %s: %s has no config.json" % (spec, src))
        models_layer.tree("models/" + name, src)
    for spec in args.fine_tunes:
        name, sep, src = spec.partition("=")
        if not sep or not re.match(r"^[A-Za-z0-9._-]+$", name):
            fail("--fine-tunes %r: want NAME=DIR with NAME of letters, digits, '.', '_' or '-'" % spec)
        entries = sorted(os.listdir(src)) if os.path.isdir(src) else []
        deltas = [f for f in entries if f.endswith(".delta.safetensors")]
        adapters = [f for f in entries
                    if os.path.isfile(os.path.join(src, f, "adapter_config.json"))]
        if not deltas and not adapters:
            fail("--fine-tunes %s: %s holds no *.delta.safetensors or LoRA adapter directory"
                 % (spec, src))
        for f in deltas:
            models_layer.file("fine-tunes/%s/%s" % (name, f), os.path.join(src, f), 0o644)
        for a in adapters:
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                models_layer.file("fine-tunes/%s/%s/%s" % (name, a, f), os.path.join(src, a, f),
                                  0o644)

    for path, text in ETC_FILES.items():
        strata_layer.text(path, text)
    strata_layer.dir("tmp", 0o1777)
    strata_layer.dir("var/lib/strata", 0o750, UID)

    layers = [libs_layer, models_layer] if models_layer.entries else [libs_layer]
    layers.append(strata_layer)

    out_dir = os.path.dirname(os.path.abspath(args.out))
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build_image.") as tmp:
        blobs = []  # (digest hex, path, size, media type, diff_id hex, layer name)
        for layer in layers:
            raw = os.path.join(tmp, layer.name + ".tar")
            with open(raw, "wb") as f:
                hw = HashingWriter(f)
                layer.write(hw, mtime)
            diff_id = hw.sha.hexdigest()
            if args.gzip:
                gz = raw + ".gz"
                with open(raw, "rb") as src, open(gz, "wb") as f:
                    hw = HashingWriter(f)
                    with gzip.GzipFile(fileobj=hw, mode="wb", compresslevel=1, mtime=0) as z:
                        shutil.copyfileobj(src, z, 1 << 20)
                os.unlink(raw)
                blobs.append((hw.sha.hexdigest(), gz, hw.size,
                              "application/vnd.oci.image.layer.v1.tar+gzip", diff_id, layer.name))
            else:
                blobs.append((diff_id, raw, os.path.getsize(raw),
                              "application/vnd.oci.image.layer.v1.tar", diff_id, layer.name))

        revision = args.revision
        created = "1970-01-01T00:00:00Z" if mtime == 0 else \
            __import__("datetime").datetime.utcfromtimestamp(mtime).strftime("%Y-%m-%dT%H:%M:%SZ")
        labels = {"org.opencontainers.image.title": "strata",
                  "org.opencontainers.image.description":
                      "Strata LLM serving cluster: strata-coordinator, strata-worker, stratactl"}
        if revision:
            labels["org.opencontainers.image.revision"] = revision
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "config": {
                "User": "%d:%d" % (UID, UID),
                "Env": [
                    "PATH=/usr/local/bin",
                    # Then where the NVIDIA container toolkit mounts the driver's libcuda.so.1, in
                    # case its ldconfig hook does not run.
                    "LD_LIBRARY_PATH=/%s:/usr/lib64:/usr/lib/x86_64-linux-gnu" % LIB_DIR,
                    # Asks the NVIDIA container toolkit for the driver's compute libraries in GPU pods.
                    "NVIDIA_DRIVER_CAPABILITIES=compute,utility",
                ],
                "Cmd": ["/" + BIN_DIR + "/strata-worker", "--help"],
                "WorkingDir": "/",
                "ExposedPorts": {"50051/tcp": {}, "50061/tcp": {}},
                "Labels": labels,
            },
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + b[4] for b in blobs]},
            "history": [{"created": created, "created_by": "tools/image/build_image.py: " + b[5]}
                        for b in blobs],
        }
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        config_digest = hashlib.sha256(config_bytes).hexdigest()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": "sha256:" + config_digest, "size": len(config_bytes)},
            "layers": [{"mediaType": b[3], "digest": "sha256:" + b[0], "size": b[2]} for b in blobs],
        }
        manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        manifest_digest = hashlib.sha256(manifest_bytes).hexdigest()
        ref = args.tag.rsplit(":", 1)[1] if ":" in args.tag.rsplit("/", 1)[-1] else "latest"
        # containerd (kind load, ctr import) keeps this name as written and the kubelet looks up
        # the normalized one: docker.io/library/strata:dev for strata:dev.
        first = args.tag.split("/", 1)[0]
        if "/" not in args.tag:
            full_name = "docker.io/library/" + args.tag
        elif "." in first or ":" in first or first == "localhost":
            full_name = args.tag
        else:
            full_name = "docker.io/" + args.tag
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + manifest_digest, "size": len(manifest_bytes),
                "annotations": {"io.containerd.image.name": full_name,
                                "org.opencontainers.image.ref.name": ref},
            }],
        }
        docker_manifest = [{"Config": "blobs/sha256/" + config_digest, "RepoTags": [args.tag],
                            "Layers": ["blobs/sha256/" + b[0] for b in blobs]}]

        partial = os.path.join(tmp, "image.tar")
        with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as tar:
            def add_bytes(name, data):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), mtime, 0o644
                tar.addfile(info, io.BytesIO(data))

            for d in ("blobs", "blobs/sha256"):
                info = tarfile.TarInfo(d)
                info.type, info.mtime, info.mode = tarfile.DIRTYPE, mtime, 0o755
                tar.addfile(info)
            add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            add_bytes("index.json", json.dumps(index, sort_keys=True).encode())
            add_bytes("manifest.json", json.dumps(docker_manifest).encode())
            add_bytes("blobs/sha256/" + config_digest, config_bytes)
            add_bytes("blobs/sha256/" + manifest_digest, manifest_bytes)
            for digest, path, size, _, _, _ in blobs:
                info = tarfile.TarInfo("blobs/sha256/" + digest)
                info.size, info.mtime, info.mode = size, mtime, 0o644
                with open(path, "rb") as f:
                    tar.addfile(info, f)
        os.replace(partial, args.out)

    total = sum(b[2] for b in blobs)
    print("build_image: wrote %s (%s, %d layers, %.0f MiB): %s" % (
        args.out, args.tag, len(blobs), total / 2**20,
        ", ".join("%s %.0f MiB" % (b[5], b[2] / 2**20) for b in blobs)), file=sys.stderr)


def unpack(args):
    """Checks every digest of the archive and applies its layers in order under --rootfs, reading
    each blob in chunks (layers are hundreds of MiB)."""
    with tarfile.open(args.unpack) as tar:
        def member(name):
            f = tar.extractfile(name)
            if f is None:
                fail("%s: no %s" % (args.unpack, name))
            return f

        def read(name):
            return member(name).read()

        def check(digest, expect_size=None):
            """Streams the blob once, checking its digest and size; returns its path in the tar."""
            algo, _, hexd = digest.partition(":")
            if algo != "sha256":
                fail("unsupported digest %s" % digest)
            name = "blobs/sha256/" + hexd
            f, sha, size = member(name), hashlib.sha256(), 0
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
                size += len(chunk)
            if sha.hexdigest() != hexd:
                fail("blob %s does not match its digest" % digest)
            if expect_size is not None and size != expect_size:
                fail("blob %s is %d bytes, the manifest says %d" % (digest, size, expect_size))
            return name

        if json.loads(read("oci-layout")).get("imageLayoutVersion") != "1.0.0":
            fail("bad oci-layout")
        index = json.loads(read("index.json"))
        if len(index.get("manifests", [])) != 1:
            fail("index.json should name exactly one manifest")
        desc = index["manifests"][0]
        manifest = json.loads(read(check(desc["digest"], desc["size"])))
        config = json.loads(read(check(manifest["config"]["digest"], manifest["config"]["size"])))
        diff_ids = config["rootfs"]["diff_ids"]
        if len(diff_ids) != len(manifest["layers"]):
            fail("config has %d diff_ids for %d layers" % (len(diff_ids), len(manifest["layers"])))
        os.makedirs(args.rootfs, exist_ok=True)
        for layer, diff_id in zip(manifest["layers"], diff_ids):
            name = check(layer["digest"], layer["size"])
            gz = layer["mediaType"].endswith("+gzip")
            if gz:
                sha = hashlib.sha256()
                with gzip.GzipFile(fileobj=member(name)) as z:
                    for chunk in iter(lambda: z.read(1 << 20), b""):
                        sha.update(chunk)
                if "sha256:" + sha.hexdigest() != diff_id:
                    fail("layer %s does not match its diff_id %s" % (layer["digest"], diff_id))
            elif "sha256:" + name.rsplit("/", 1)[1] != diff_id:
                fail("layer %s does not match its diff_id %s" % (layer["digest"], diff_id))
            with tarfile.open(fileobj=member(name), mode="r|gz" if gz else "r|") as lt:
                for m in lt:
                    if m.name.startswith("/") or ".." in m.name.split("/"):
                        fail("layer entry %s escapes the root" % m.name)
                    lt.extract(m, args.rootfs, numeric_owner=True)
        with open(os.path.join(args.rootfs, ".image-config.json"), "w") as f:
            json.dump(config, f, indent=1, sort_keys=True)
    print("build_image: unpacked %d layers of %s into %s" % (len(diff_ids), args.unpack, args.rootfs),
          file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="the OCI archive to write")
    p.add_argument("--tag", default="strata:dev", help="image name:tag recorded in the archive")
    p.add_argument("--binary", action="append", default=[], help="a binary to pack (repeatable)")
    p.add_argument("--model", action="append", default=[], help="NAME=DIR to pack under /models/NAME")
    p.add_argument("--fine-tunes", action="append", default=[],
                   help="NAME=DIR: DIR's *.delta.safetensors to pack under /fine-tunes/NAME")
    p.add_argument("--revision", default="", help="source revision for the image's labels")
    p.add_argument("--gzip", action="store_true", help="gzip the layers (smaller, slower to write)")
    p.add_argument("--unpack", metavar="ARCHIVE", help="verify ARCHIVE and unpack it into --rootfs")
    p.add_argument("--rootfs", help="with --unpack: the directory to unpack into")
    args = p.parse_args()
    if args.unpack:
        if not args.rootfs:
            fail("--unpack needs --rootfs")
        unpack(args)
        return
    if not args.out or not args.binary:
        fail("give --out and at least one --binary (or --unpack ARCHIVE --rootfs DIR)")
    build(args)


if __name__ == "__main__":
    main()
