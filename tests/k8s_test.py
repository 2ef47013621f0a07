#!/usr/bin/env python3
"""Checks k8s/ against the servers it deploys, then runs k8s/base the way a cluster would.

1. Static checks of k8s/base (and k8s/gpu, k8s/disaggregated and k8s/gpu-disaggregated, rendered
   with `kubectl kustomize` where kubectl is installed): selectors match pod labels and no other
   workload's, Services reach named container ports, every flag in a
   container's args is a flag of the binary it runs (asked with --helpfull) and every $(VAR) in them is
   defined, --listen and the probes use the container port, the coordinators' --workers names a
   headless Service selecting the workers on its port, coordinators and workers agree on the model,
   grace periods outlast the servers' own drain timeouts, memory limits hold the KV caches and the
   delta cache, the disk tier's file lies on a volume large enough for it, the model and fine-tune
   directories are in the image or on a volume.
2. The container image: tools/image/build_image.py packs the test's binaries, model and the model's
   two fine-tunes (compressed with the test's stratactl) into an OCI archive, then unpacks it the way
   a runtime does (every digest checked).
3. Pods: every replica of k8s/base's Deployment and StatefulSet runs from that root filesystem
   (chroot, read-only, as the image's user when the test is root), each in its own network namespace
   with its own address on a bridge, with its manifest's command, args (variables expanded), env
   (ConfigMap and downward API), volumes and hostname. The test plays the kubelet and cluster DNS:
   it runs the gRPC readiness probes and publishes each Service's ready endpoints in every pod's
   /etc/hosts. Then: every worker becomes ready, each coordinator replica sees both workers and
   answers generate requests (for the base and for a fine-tune), a worker sent SIGTERM (a pod deletion) turns NOT_SERVING, leaves the
   Service and exits 0 within its grace period while requests keep succeeding, and its replacement
   recovers the disk KV tier from its volume and serves again. Then k8s/base with API keys and the
   cluster secret, k8s/disaggregated (a prefill and a decode worker: a long prompt handed off
   between them, its KV blocks copied), and k8s/tls (every gRPC connection over TLS with the
   certificate tools/make_dev_certs.sh makes, the probes on the plaintext health ports).

Run by tests/k8s_test.sh (Bazel); needs unshare, ip and chroot (util-linux, iproute2, coreutils).
"""

import copy
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

ROOT = os.getcwd()
BINARIES = {
    "strata-worker": "worker/server/strata-worker",
    "strata-coordinator": "coordinator/strata-coordinator",
    "stratactl": "cli/stratactl",
}
PROBE = "tests/grpc_health_probe"
IMAGE_UID = 65532
SUBNET = "10.88.0"


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------------
# Manifests


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def render_base(directory):
    """Renders a kustomization that only lists resources (what k8s/base is) without kustomize."""
    k = load_docs(os.path.join(directory, "kustomization.yaml"))[0]
    extra = set(k) - {"apiVersion", "kind", "resources"}
    if extra:
        fail("%s/kustomization.yaml uses %s: k8s/base must stay a plain list of resources (the "
             "test renders it without kustomize)" % (directory, sorted(extra)))
    objs = []
    for r in k["resources"]:
        objs += load_docs(os.path.join(directory, r))
    return objs


def kubectl_render(directory):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return None
    out = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True)
    if out.returncode != 0:
        fail("kubectl kustomize %s: %s" % (directory, out.stderr.strip()))
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def quantity(q):
    """Bytes (or cores) of a Kubernetes quantity."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    if not m:
        fail("bad quantity %r" % q)
    units = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20,
             "Gi": 2**30, "Ti": 2**40}
    if m.group(2) not in units:
        fail("bad quantity unit in %r" % q)
    return float(m.group(1)) * units[m.group(2)]


def binary_flags(path):
    out = subprocess.run([path, "--helpfull"], capture_output=True, text=True)
    flags = set(re.findall(r"^\s+--([A-Za-z0-9_]+) \(", out.stdout + out.stderr, re.M))
    if len(flags) < 5:
        fail("%s --helpfull listed %d flags" % (path, len(flags)))
    return flags


def parse_args(args):
    """{flag: value} of --name=value / --name value / --name arguments."""
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            fail("argument %r is not a --flag" % a)
        name, eq, value = a[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        out[name] = value
        i += 1
    return out


def expand(s, env):
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ escapes, others stay as they are."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


class Manifests:
    def __init__(self, objs, name):
        self.name = name
        self.objs = objs
        self.by_kind = {}
        for o in objs:
            key = (o["kind"], o["metadata"]["name"])
            if key in self.by_kind:
                fail("%s: two %s named %s" % (name, *key))
            self.by_kind[key] = o

    def of(self, kind):
        return [o for (k, _), o in self.by_kind.items() if k == kind]

    def get(self, kind, name):
        return self.by_kind.get((kind, name))

    def workloads(self):
        return self.of("Deployment") + self.of("StatefulSet")

    def container_env(self, c):
        """The names a container's env defines (values where static), as the kubelet would."""
        env = {}
        for src in c.get("envFrom", []):
            ref = src.get("configMapRef")
            if ref:
                cm = self.get("ConfigMap", ref["name"])
                if cm is None:
                    fail("%s: envFrom names ConfigMap %s, which is not in the manifests" % (self.name, ref["name"]))
                env.update(cm.get("data", {}))
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
            elif "valueFrom" in e:
                env[e["name"]] = "<%s>" % json.dumps(e["valueFrom"], sort_keys=True)
        return env


def check_manifests(m, flags, image_models, image_fine_tunes):
    """Static checks (see the file comment). Returns the number of checks made."""
    n = 0
    where = m.name
    cluster_secrets = {}  # container -> its --cluster_secret_file, expanded
    tls_files = {}  # container -> its --tls_cert, --tls_key, --tls_ca, --tls_server_name
    transfer_ports = set()  # (name, number) of the workers' --kv_transfer_listen ports
    for w in m.workloads():
        wname = "%s %s/%s" % (where, w["kind"], w["metadata"]["name"])
        spec, tmpl = w["spec"], w["spec"]["template"]
        labels = tmpl["metadata"].get("labels", {})
        if not selects(spec["selector"]["matchLabels"], labels):
            fail("%s: selector %s does not select its pod labels %s" % (wname, spec["selector"], labels))
        # Two controllers whose selectors take each other's pods fight over them.
        for other in m.workloads():
            if other is not w and selects(spec["selector"]["matchLabels"],
                                          other["spec"]["template"]["metadata"].get("labels", {})):
                fail("%s: selector %s also selects the pods of %s" % (wname, spec["selector"],
                                                                    other["metadata"]["name"]))
            n += 1
        pod = tmpl["spec"]
        mounts_by_volume = {}
        for v in pod.get("volumes", []):
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                if m.get("PersistentVolumeClaim", claim) is None:
                    fail("%s: volume %s claims %s, which is not in the manifests" % (wname, v["name"], claim))
            mounts_by_volume[v["name"]] = v
        templates = {t["metadata"]["name"]: t for t in spec.get("volumeClaimTemplates", [])}
        for c in pod["containers"]:
            cname = "%s container %s" % (wname, c["name"])
            binary = os.path.basename(c["command"][0])
            if c["command"][0] != "/usr/local/bin/" + binary or binary not in flags:
                fail("%s: command %s is not one of the image's /usr/local/bin/%s" % (cname, c["command"], sorted(flags)))
            args = parse_args(c.get("args", []))
            for a in args:
                if a not in flags[binary]:
                    fail("%s: --%s is not a flag of %s" % (cname, a, binary))
                n += 1
            env = m.container_env(c)
            for raw in c.get("args", []):
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", raw):
                    if var not in env:
                        fail("%s: %s uses $(%s), which its env does not define" % (cname, raw, var))
            args = {k: expand(v, env) for k, v in args.items()}
            ports = {p["containerPort"]: p for p in c.get("ports", [])}
            listen = args.get("listen")
            if listen is None:
                fail("%s: no --listen (the default is loopback, unreachable from outside the pod)" % cname)
            host, _, port = listen.rpartition(":")
            if host not in ("[::]", "0.0.0.0"):
                fail("%s: --listen=%s does not listen on every address" % (cname, listen))
            if int(port) not in ports:
                fail("%s: --listen port %s is not a containerPort %s" % (cname, port, sorted(ports)))
            # With TLS the kubelet (whose gRPC probes speak plaintext) must probe the plaintext
            # health port; without, the serving port or that one.
            health = args.get("health_listen")
            health_port = int(health.rpartition(":")[2]) if health else None
            if health_port is not None and health_port not in ports:
                fail("%s: --health_listen port %s is not a containerPort %s" % (cname, health_port, sorted(ports)))
            tls = bool(args.get("tls_cert"))
            if tls and health_port is None:
                fail("%s: --tls_cert without --health_listen: a kubelet's gRPC probes cannot speak "
                     "TLS" % cname)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    p = c[probe].get("grpc", {}).get("port")
                    allowed = [health_port] if tls else [int(port), health_port]
                    if p not in allowed:
                        fail("%s: %s probes port %s, not %s" % (
                            cname, probe, p, "the plaintext health port %s (TLS)" % health_port if tls
                            else "the serving port %s" % port))
                    n += 1
            metrics = args.get("metrics_listen")
            if metrics is not None:
                mport = int(metrics.rpartition(":")[2])
                if mport not in ports:
                    fail("%s: --metrics_listen port %s is not a containerPort %s" % (cname, mport, sorted(ports)))
                ann = tmpl["metadata"].get("annotations", {})
                if ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") != str(mport):
                    fail("%s: prometheus.io/port %s is not --metrics_listen's port %s" % (cname, ann.get("prometheus.io/port"), mport))
                n += 1
            if binary == "strata-worker":
                # Other workers copy KV blocks over this port (in TLS with --tls_cert); behind a
                # NetworkPolicy it must be a fixed one, open to them (checked below), or copies
                # fall back to gRPC.
                kt = args.get("kv_transfer_listen", "auto")
                if kt == "auto" or kt.endswith(":0"):
                    fail("%s: --kv_transfer_listen=%s picks a port at start, which no NetworkPolicy "
                         "can open: give a fixed one (or off)" % (cname, kt))
                elif kt != "off":
                    khost, _, kport = kt.rpartition(":")
                    if khost not in ("[::]", "0.0.0.0"):
                        fail("%s: --kv_transfer_listen=%s does not listen on every address" % (cname, kt))
                    if int(kport) not in ports:
                        fail("%s: --kv_transfer_listen port %s is not a containerPort %s" % (cname, kport, sorted(ports)))
                    transfer_ports.add((ports[int(kport)].get("name"), int(kport)))
                n += 1
            http = args.get("http_listen")
            if http is not None:
                hport = int(http.rpartition(":")[2])
                if hport not in ports:
                    fail("%s: --http_listen port %s is not a containerPort %s" % (cname, hport, sorted(ports)))
                n += 1
            for probe in ("startupProbe", "livenessProbe"):
                if probe in c and c[probe].get("grpc", {}).get("service") != "liveness":
                    fail("%s: %s must ask the \"liveness\" health service: the server's overall "
                         "health turns NOT_SERVING while it drains, and the kubelet would restart it"
                         % (cname, probe))
            if "readinessProbe" not in c:
                fail("%s: no readinessProbe (a draining server must leave its Service)" % cname)
            grace = pod.get("terminationGracePeriodSeconds", 30)
            # The server's own shutdown limits, with their defaults: all must fit in the grace period.
            own = {"strata-worker": {"drain_timeout_s": 30, "drain_kv_serve_s": 5,
                                     "persist_kv_s": 10},
                   "strata-coordinator": {"shutdown_delay_s": 0, "shutdown_grace_s": 10}}
            if binary in own:
                limits = {f: float(args.get(f, d)) for f, d in own[binary].items()}
                if sum(limits.values()) + 5 > grace:
                    fail("%s: terminationGracePeriodSeconds %s leaves under 5 s beyond %s: the "
                         "kubelet would kill it mid-shutdown" % (cname, grace, limits))
                n += 1
            mounts = c.get("volumeMounts", [])
            for vm in mounts:
                if vm["name"] not in mounts_by_volume and vm["name"] not in templates:
                    fail("%s: volumeMount %s has no volume" % (cname, vm["name"]))

            def mount_of(path):
                best = None
                for vm in mounts:
                    mp = vm["mountPath"].rstrip("/")
                    if path == mp or path.startswith(mp + "/"):
                        if best is None or len(mp) > len(best["mountPath"]):
                            best = vm
                return best

            keys_file = expand(args.get("api_keys_file", ""), m.container_env(c))
            secret_file = expand(args.get("cluster_secret_file", ""), m.container_env(c))
            cluster_secrets[cname] = secret_file
            # The keys file and the cluster secret from a Secret's volume, as k8s/base/model.yaml
            # says to set them.
            tls_files[cname] = tuple(expand(args.get(f, ""), m.container_env(c)) for f in
                                     ("tls_cert", "tls_key", "tls_ca", "tls_server_name"))
            for flag, path in (("api_keys_file", keys_file), ("cluster_secret_file", secret_file),
                               ("tls_cert", tls_files[cname][0]), ("tls_key", tls_files[cname][1]),
                               ("tls_ca", tls_files[cname][2])):
                if path:
                    vm = mount_of(path)
                    if vm is None or "secret" not in mounts_by_volume.get(vm["name"], {}):
                        fail("%s: --%s=%s is not on a Secret's volume" % (cname, flag, path))
                    n += 1
            if binary == "strata-worker":
                model_dir = args["model"]
                if mount_of(model_dir) is None and model_dir.lstrip("/") not in image_models:
                    fail("%s: --model=%s is neither on a volume nor in the image (%s)" % (cname, model_dir, sorted(image_models)))
                ft_dir = args.get("fine_tune_dir")
                if ft_dir is not None:
                    if mount_of(ft_dir) is None and ft_dir.lstrip("/") not in image_fine_tunes:
                        fail("%s: --fine_tune_dir=%s is neither on a volume nor in the image (%s)"
                             % (cname, ft_dir, sorted(image_fine_tunes)))
                    n += 1
                draft_dir = args.get("draft_model")
                if draft_dir:  # (empty: no draft model)
                    if mount_of(draft_dir) is None and draft_dir.lstrip("/") not in image_models:
                        fail("%s: --draft_model=%s is neither on a volume nor in the image (%s)"
                             % (cname, draft_dir, sorted(image_models)))
                    n += 1
                if int(args.get("disk_cache_mb", 0)) > 0:
                    if int(args.get("host_cache_mb", 0)) <= 0:
                        fail("%s: --disk_cache_mb without --host_cache_mb: strata-worker refuses a "
                             "disk tier with no host tier above it" % cname)
                    path = args.get("disk_cache_path", "")
                    vm = mount_of(path)
                    if vm is None:
                        fail("%s: --disk_cache_path=%s is not on a volume (the root filesystem is read-only "
                             "and a container's layer is lost on restart)" % (cname, path))
                    if vm["name"] in templates:
                        size = quantity(templates[vm["name"]]["spec"]["resources"]["requests"]["storage"])
                        if int(args["disk_cache_mb"]) * 2**20 > size:
                            fail("%s: --disk_cache_mb=%s does not fit its volume's %s" % (cname, args["disk_cache_mb"], size))
                    n += 1
                limit = c.get("resources", {}).get("limits", {}).get("memory")
                if limit is None:
                    fail("%s: no memory limit" % cname)
                need = int(args.get("host_cache_mb", 0)) * 2**20 + 256 * 2**20
                if "fine_tune_dir" in args or "fine_tunes" in args:
                    need += int(args.get("delta_cache_mb", 1024)) * 2**20
                if args.get("device", "cpu") == "cpu":
                    need += int(args.get("kv_cache_mb", 256)) * 2**20
                else:
                    if "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}):
                        fail("%s: --device=%s without an nvidia.com/gpu limit" % (cname, args["device"]))
                if quantity(limit) < need:
                    fail("%s: memory limit %s is under the KV caches it holds (%d MiB)" % (cname, limit, need >> 20))
                n += 1
            if binary == "strata-coordinator":
                workers = args.get("workers", "")
                mt = re.fullmatch(r"dns:([a-z0-9.-]+):([0-9]+)", workers)
                if not mt:
                    fail("%s: --workers=%s is not dns:SERVICE:PORT" % (cname, workers))
                svc = m.get("Service", mt.group(1).split(".")[0])
                if svc is None or svc["spec"].get("clusterIP") != "None":
                    fail("%s: --workers names %s, which is not a headless Service here" % (cname, mt.group(1)))
                if int(mt.group(2)) not in [p["port"] for p in svc["spec"]["ports"]]:
                    fail("%s: --workers port %s is not a port of Service %s" % (cname, mt.group(2), mt.group(1)))
                # --peers: a headless Service of this Deployment's own pods, ready or not.
                if "peers" in args:
                    mp = re.fullmatch(r"dns:([a-z0-9.-]+):([0-9]+)", args["peers"])
                    psvc = m.get("Service", mp.group(1).split(".")[0]) if mp else None
                    if (psvc is None or psvc["spec"].get("clusterIP") != "None"
                            or not psvc["spec"].get("publishNotReadyAddresses")
                            or not selects(psvc["spec"]["selector"], labels)
                            or int(mp.group(2)) not in [p["port"] for p in psvc["spec"]["ports"]]):
                        fail("%s: --peers=%s is not dns:SERVICE:PORT of a headless Service of its "
                             "own pods, ready or not" % (cname, args["peers"]))
                model_name, _, model_dir = args.get("model", "").partition("=")
                if mount_of(model_dir) is None and model_dir.lstrip("/") not in image_models:
                    fail("%s: --model dir %s is neither on a volume nor in the image" % (cname, model_dir))
                served = set()
                for ww in m.workloads():
                    if selects(svc["spec"]["selector"], ww["spec"]["template"]["metadata"].get("labels", {})):
                        for wc in ww["spec"]["template"]["spec"]["containers"]:
                            wenv = m.container_env(wc)
                            served.add(expand(parse_args(wc["args"]).get("model_name", ""), wenv))
                if served != {model_name}:
                    fail("%s: serves model %r, the workers behind %s serve %s" % (cname, model_name, svc["metadata"]["name"], sorted(served)))
                n += 1
        if w["kind"] == "StatefulSet":
            svc = m.get("Service", spec["serviceName"])
            if svc is None or svc["spec"].get("clusterIP") != "None" or not selects(svc["spec"]["selector"], labels):
                fail("%s: serviceName %s is not a headless Service selecting its pods" % (wname, spec["serviceName"]))
    for s in m.of("Service"):
        sname = "%s Service/%s" % (where, s["metadata"]["name"])
        targets = [w for w in m.workloads() if selects(s["spec"]["selector"], w["spec"]["template"]["metadata"].get("labels", {}))]
        if not targets:
            fail("%s: its selector matches no workload" % sname)
        for p in s["spec"]["ports"]:
            t = p.get("targetPort", p["port"])
            for w in targets:
                cports = [cp for c in w["spec"]["template"]["spec"]["containers"] for cp in c.get("ports", [])]
                if not any(cp.get("name") == t or cp["containerPort"] == t for cp in cports):
                    fail("%s: targetPort %s is not a port of %s" % (sname, t, w["metadata"]["name"]))
            n += 1
    for p in m.of("PodDisruptionBudget"):
        if not any(selects(p["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"].get("labels", {})) for w in m.workloads()):
            fail("%s PodDisruptionBudget/%s selects no workload" % (where, p["metadata"]["name"]))
        n += 1
    # The workers' gRPC port (which takes no API keys) is open to the coordinators' pods and the
    # workers' own (which copy KV blocks from each other) only.
    workers = [w for w in m.workloads() if w["kind"] == "StatefulSet"]
    coordinators = [w for w in m.workloads() if w["kind"] == "Deployment"]
    for w in workers:
        wlabels = w["spec"]["template"]["metadata"].get("labels", {})
        policies = [p for p in m.of("NetworkPolicy")
                    if selects(p["spec"]["podSelector"].get("matchLabels"), wlabels)]
        if not policies:
            fail("%s: no NetworkPolicy selects %s's pods" % (where, w["metadata"]["name"]))
        # The KV transfer port: open to the workers only, and open to them.
        transfer_open = False
        for p in policies:
            for rule in p["spec"].get("ingress", []):
                named = {port.get("port") for port in rule.get("ports", [])}
                if not any(name in named or number in named for name, number in transfer_ports):
                    continue
                sources = rule.get("from", [])
                if not sources or not all(
                        "podSelector" in s and any(
                            selects(s["podSelector"].get("matchLabels"),
                                    ww["spec"]["template"]["metadata"].get("labels", {}))
                            for ww in workers)
                        and not any(
                            selects(s["podSelector"].get("matchLabels"),
                                    c["spec"]["template"]["metadata"].get("labels", {}))
                            for c in coordinators)
                        for s in sources):
                    fail("%s NetworkPolicy/%s: the workers' KV transfer port is open beyond the "
                         "workers" % (where, p["metadata"]["name"]))
                if any(selects(s.get("podSelector", {}).get("matchLabels"), wlabels)
                       for s in sources):
                    transfer_open = True
        if transfer_ports and not transfer_open:
            fail("%s: no NetworkPolicy opens the KV transfer port %s to %s's pods: their copies "
                 "would fall back to gRPC" % (where, sorted(transfer_ports), w["metadata"]["name"]))
        for p in policies:
            for rule in p["spec"].get("ingress", []):
                if not any(port.get("port") in ("grpc", 50061) for port in rule.get("ports", [])):
                    continue
                sources = rule.get("from", [])
                if not sources or not all(
                        "podSelector" in s and any(
                            selects(s["podSelector"].get("matchLabels"),
                                    c["spec"]["template"]["metadata"].get("labels", {}))
                            for c in coordinators + workers)
                        for s in sources):
                    fail("%s NetworkPolicy/%s: the workers' gRPC port is open beyond the cluster's pods"
                         % (where, p["metadata"]["name"]))
            n += 1
    # The workers answer only calls with their own cluster secret: every coordinator and worker
    # must read the same file, or none.
    if len(set(cluster_secrets.values())) > 1:
        fail("%s: coordinators and workers differ in --cluster_secret_file: %s" % (where, cluster_secrets))
    # All TLS or none: a plaintext server refuses TLS callers, and a TLS one plaintext callers.
    if len(set(tls_files.values())) > 1:
        fail("%s: coordinators and workers differ in their TLS flags: %s" % (where, tls_files))
    n += 1
    return n


def validate_schemas(work, sets):
    """Every object against the Kubernetes API's schemas, unknown fields refused (validate.mjs)."""
    modules = os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".cache/strata/k8s-schema/node_modules")
    node = shutil.which("node")
    if node is None or not os.path.isdir(os.path.join(modules, "kubernetes-models")):
        print("k8s_test: SKIPPED the API schema check: no Node.js 20+ or no %s (tools/setup.sh "
              "installs it from the npm registry)" % modules)
        return
    d = os.path.join(work, "k8s_schema")
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(ROOT, "tests/k8s_schema/validate.mjs"), d)
    if not os.path.exists(os.path.join(d, "node_modules")):
        os.symlink(modules, os.path.join(d, "node_modules"))
    for name, objs in sets:
        path = os.path.join(d, re.sub(r"[^A-Za-z0-9]+", "_", name) + ".json")
        with open(path, "w") as f:
            json.dump(objs, f)
        out = subprocess.run([node, os.path.join(d, "validate.mjs"), path], capture_output=True, text=True)
        if out.returncode != 0:
            fail("%s does not match the Kubernetes API schemas:\n%s%s" % (name, out.stdout, out.stderr))
        print("k8s_test: %s: %d objects valid against the Kubernetes API schemas" % (name, len(objs)))


# ---------------------------------------------------------------------------------------------------
# Pods


def sh(*cmd, check=True):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode != 0:
        fail("%s: %s" % (" ".join(cmd), (out.stderr or out.stdout).strip()))
    return out


class Pod:
    def __init__(self, name, workload, index, ip, work):
        self.name, self.workload, self.index, self.ip = name, workload, index, ip
        self.netns = "pod%d" % index
        self.dir = os.path.join(work, "pods", name)
        os.makedirs(self.dir, exist_ok=True)
        self.hosts = os.path.join(self.dir, "hosts")
        self.log = os.path.join(self.dir, "log")
        self.proc = None
        self.ready = False
        self.ready_once = False  # liveness is probed once the server has come up (startupProbe)
        c = workload["spec"]["template"]["spec"]["containers"][0]
        self.container = c
        self.port = c["ports"][0]["containerPort"]

    def labels(self):
        return self.workload["spec"]["template"]["metadata"].get("labels", {})


class Cluster:
    """Plays the kubelet, the CNI and cluster DNS for the pods of one rendered manifest set."""

    def __init__(self, m, rootfs, work, secrets=None):
        self.m, self.rootfs, self.work = m, rootfs, work
        # Secret name -> {file: text}: what the optional Secrets' volumes hold (none: empty).
        self.secrets = secrets or {}
        self.as_root = os.environ.get("STRATA_K8S_TEST_REAL_ROOT") == "1"
        self.pods = []
        self.volumes = {}  # (pod name, volume name) -> host dir, kept across a pod's restarts
        with open(os.path.join(rootfs, ".image-config.json")) as f:
            self.image_env = dict(e.split("=", 1) for e in json.load(f)["config"]["Env"])
        sh("ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "strata0", "type", "bridge")
        sh("ip", "addr", "add", SUBNET + ".1/24", "dev", "strata0")
        sh("ip", "link", "set", "strata0", "up")
        # What a runtime provides in every container: mount points for /proc, /dev and the files
        # the kubelet manages.
        for d in ("proc", "dev", "dev/shm", "run"):
            os.makedirs(os.path.join(rootfs, d), exist_ok=True)
        for f in ("etc/hosts", "etc/hostname", "etc/resolv.conf", "dev/null", "dev/zero", "dev/urandom",
                  "dev/random"):
            open(os.path.join(rootfs, f), "a").close()
        index = 0
        for w in m.workloads():
            for i in range(w["spec"].get("replicas", 1)):
                name = "%s-%d" % (w["metadata"]["name"], i)
                index += 1
                pod = Pod(name, w, index, "%s.%d" % (SUBNET, 10 + index), work)
                self.pods.append(pod)
                sh("ip", "netns", "add", pod.netns)
                sh("ip", "link", "add", "veth%d" % index, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
                sh("ip", "link", "set", "veth%d" % index, "master", "strata0", "up")
                for cmd in (["addr", "add", pod.ip + "/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                            ["link", "set", "lo", "up"], ["route", "add", "default", "via", SUBNET + ".1"]):
                    sh("ip", "-n", pod.netns, *cmd)
        self.publish()

    def pod(self, name):
        return next(p for p in self.pods if p.name == name)

    def publish(self):
        """Cluster DNS: each Service name resolves to its ready endpoints (a ClusterIP Service, which
        would have one virtual address, to its first), each StatefulSet pod to itself."""
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        for s in self.m.of("Service"):
            name = s["metadata"]["name"]
            # publishNotReadyAddresses: every running pod, ready or not.
            listed = (lambda p: p.proc is not None and p.proc.poll() is None) \
                if s["spec"].get("publishNotReadyAddresses") else (lambda p: p.ready)
            ready = [p for p in self.pods if listed(p) and selects(s["spec"]["selector"], p.labels())]
            if s["spec"].get("clusterIP") != "None":
                ready = ready[:1]
            for p in ready:
                lines.append("%s %s %s.default.svc.cluster.local" % (p.ip, name, name))
        for p in self.pods:
            if p.workload["kind"] == "StatefulSet":
                svc = p.workload["spec"]["serviceName"]
                lines.append("%s %s.%s %s.%s.default.svc.cluster.local" % (p.ip, p.name, svc, p.name, svc))
        text = "\n".join(lines) + "\n"
        for p in self.pods:
            # Written in place, not replaced (the pod sees this file through a bind mount), and
            # always at one size, padded with a comment, so that a reader never finds it empty.
            body = (text + "%s %s\n#" % (p.ip, p.name)).ljust(8192, " ") + "\n"
            if len(body) != 8193:
                fail("the hosts file outgrew its fixed size")
            mode = "r+" if os.path.exists(p.hosts) else "w"
            with open(p.hosts, mode) as f:
                f.write(body)

    def volume_dir(self, pod, name, owner):
        key = (pod.name, name)
        if key not in self.volumes:
            d = os.path.join(self.work, "volumes", pod.name, name)
            os.makedirs(d)
            if self.as_root:
                os.chown(d, owner, owner)  # fsGroup, as the kubelet applies it
            self.volumes[key] = d
        return self.volumes[key]

    def start(self, pod):
        spec = pod.workload["spec"]["template"]["spec"]
        c = pod.container
        env = dict(self.image_env)
        env.update(self.m.container_env(c))
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            if ref:
                env[e["name"]] = {"metadata.name": pod.name, "status.podIP": pod.ip}[ref]
        args = [expand(a, env) for a in c.get("args", [])]
        sc = dict(spec.get("securityContext", {}))
        sc.update(c.get("securityContext", {}))
        uid = sc.get("runAsUser", IMAGE_UID)
        fs_group = spec.get("securityContext", {}).get("fsGroup", uid)
        binds = [(pod.hosts, "etc/hosts")]
        hostname_file = os.path.join(pod.dir, "hostname")
        with open(hostname_file, "w") as f:
            f.write(pod.name + "\n")
        binds.append((hostname_file, "etc/hostname"))
        for dev in ("null", "zero", "urandom", "random"):
            binds.append(("/dev/" + dev, "dev/" + dev))
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for vm in c.get("volumeMounts", []):
            src = volumes.get(vm["name"])
            secret = None
            if src is not None and "secret" in src:
                # A Secret: its files when the test makes it, else (an optional one) an empty
                # directory.
                secret = self.secrets.get(src["secret"]["secretName"])
                if secret is None and not src["secret"].get("optional"):
                    fail("pod %s: volume %s needs Secret %s, which the test does not make"
                         % (pod.name, vm["name"], src["secret"]["secretName"]))
            elif src is not None and "emptyDir" not in src:
                fail("pod %s: volume %s is not an emptyDir or a claim template; the test cannot provide it" % (pod.name, vm["name"]))
            target = vm["mountPath"].lstrip("/")
            os.makedirs(os.path.join(self.rootfs, target), exist_ok=True)
            d = self.volume_dir(pod, vm["name"], fs_group)
            for fname, text in (secret or {}).items():
                self.write_secret_file(d, fname, text)
            binds.append((d, target))
        r = self.rootfs
        script = ["set -e", "hostname %s" % pod.name,
                  # The image, read-only as readOnlyRootFilesystem asks.
                  "mount --bind %s %s" % (r, r)]
        if sc.get("readOnlyRootFilesystem"):
            script.append("mount -o remount,bind,ro %s" % r)
        for src, dst in binds:
            script.append("mount --bind %s %s/%s" % (src, r, dst))
        script += ["mount -t proc proc %s/proc" % r, "mount -t tmpfs -o mode=1777 shm %s/dev/shm" % r]
        chroot = [shutil.which("chroot")]
        if self.as_root:
            chroot.append("--userspec=%d:%d" % (uid, sc.get("runAsGroup", uid)))
        chroot.append(r)
        envs = ["%s=%s" % kv for kv in sorted(env.items())]
        script.append("exec env -i " + " ".join(shquote(x) for x in envs) + " " +
                      " ".join(shquote(x) for x in chroot + c["command"] + args))
        logf = open(pod.log, "ab")
        pod.proc = subprocess.Popen(
            ["ip", "netns", "exec", pod.netns, "unshare", "--mount", "--uts", "--propagation", "private",
             "/bin/sh", "-c", "\n".join(script)],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        pod.ready = False
        pod.started = time.monotonic()
        pod.command = c["command"] + args

    @staticmethod
    def write_secret_file(d, fname, text):
        """As the kubelet updates a Secret's volume: the file replaced whole, mode 0644."""
        tmp = os.path.join(d, "." + fname + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.rename(tmp, os.path.join(d, fname))

    def update_secret(self, secret_name, fname, text):
        """A Secret changed: every pod's volume of it gets the new file."""
        for p in self.pods:
            spec = p.workload["spec"]["template"]["spec"]
            for v in spec.get("volumes", []):
                if v.get("secret", {}).get("secretName") == secret_name and (p.name, v["name"]) in self.volumes:
                    self.write_secret_file(self.volumes[(p.name, v["name"])], fname, text)

    def probe(self, pod, service=""):
        """A gRPC probe on the readiness probe's port: 0 SERVING, 1 answered otherwise, 2
        unreachable."""
        port = pod.container.get("readinessProbe", {}).get("grpc", {}).get("port", pod.port)
        out = subprocess.run([os.path.join(ROOT, PROBE), "%s:%d" % (pod.ip, port), service],
                             capture_output=True, text=True)
        return out.returncode

    def tick(self):
        """One round of readiness probes, as the kubelet runs them: ready after a success, not
        ready after failureThreshold failures in a row (or at once when the process is gone)."""
        changed = False
        for p in self.pods:
            if p.proc is None:
                continue
            running = p.proc.poll() is None
            if running != getattr(p, "was_running", False):
                p.was_running, changed = running, True
            threshold = p.container.get("readinessProbe", {}).get("failureThreshold", 3)
            if p.proc.poll() is not None:
                ready, p.failures = False, threshold
            else:
                self.check_liveness(p)
                p.last_probe = self.probe(p)
                p.failures = 0 if p.last_probe == 0 else getattr(p, "failures", 0) + 1
                ready = p.ready if 0 < p.failures < threshold else p.failures == 0
                if p.last_probe == 1:
                    p.seen_not_serving = True
            if ready:
                p.ready_once = True
            if ready != p.ready:
                p.ready, changed = ready, True
        if changed:
            self.publish()

    def check_liveness(self, p):
        """The liveness probe, while the pod runs and is not being deleted, far more often than the
        kubelet's periodSeconds (the test's drains last seconds, not minutes). Any answer other than
        SERVING fails the test at once: the kubelet would restart a server that kept giving it, and a
        drained or draining server must never look dead. Unreachable counts against
        failureThreshold, over as long as the kubelet would take to see that many failures
        (periodSeconds apart): probing faster must not turn a busy second on a loaded machine into a
        restart the kubelet would never make."""
        probe = p.container.get("livenessProbe")
        if probe is None or getattr(p, "expect_exit", False) or not p.ready_once:
            return
        now = time.monotonic()
        if now < getattr(p, "next_liveness", 0):
            return
        p.next_liveness = now + 0.5
        rc = self.probe(p, probe["grpc"].get("service", ""))
        if rc == 0:
            p.liveness_failures = 0
            return
        p.liveness_failures = getattr(p, "liveness_failures", 0) + 1
        if p.liveness_failures == 1:
            p.first_liveness_failure = now
        threshold = probe.get("failureThreshold", 3)
        span = probe.get("periodSeconds", 10) * (threshold - 1)
        if rc == 1 or (p.liveness_failures >= threshold and now - p.first_liveness_failure >= span):
            self.dump()
            fail("%s failed its liveness probe (%s): the kubelet would restart it"
                 % (p.name, "NOT_SERVING" if rc == 1 else "unreachable %d times" % p.liveness_failures))

    def wait(self, what, cond, timeout_s):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.tick()
            for p in self.pods:
                if p.proc is not None and p.proc.poll() is not None and not getattr(p, "expect_exit", False):
                    self.dump()
                    fail("pod %s exited with %s while waiting for %s" % (p.name, p.proc.returncode, what))
            v = cond()
            if v:
                return v
            time.sleep(0.3)
        self.dump()
        fail("timed out after %d s waiting for %s" % (timeout_s, what))

    def dump(self):
        for p in self.pods:
            try:
                with open(p.log, errors="replace") as f:
                    tail = f.read()[-3000:]
            except OSError:
                tail = ""
            print("---- pod %s (%s) ----\n%s" % (p.name, "ready" if p.ready else "not ready", tail), file=sys.stderr)

    def stop_all(self):
        for p in self.pods:
            if p.proc is not None and p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in self.pods:
            if p.proc is not None:
                try:
                    p.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.proc.pid, signal.SIGKILL)
                    p.proc.wait()


def shquote(s):
    return "'" + s.replace("'", "'\\''") + "'"


def stratactl(cluster, *args, timeout=60, key=None):
    cmd = [os.path.join(ROOT, BINARIES["stratactl"])] + list(args)
    env = dict(os.environ)
    env.pop("STRATA_API_KEY", None)
    if key:
        env["STRATA_API_KEY"] = key
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def addr(pod):
    """A pod's gRPC address."""
    return "%s:%d" % (pod.ip, pod.port)


def serving_workers(cluster, coord, key=None):
    """The worker ids `coord` routes to, sorted; None when it does not answer."""
    out = stratactl(cluster, "status", "--json", "--coordinator", addr(coord), key=key)
    if out.returncode != 0:
        return None
    return sorted(w["info"]["worker_id"] for w in json.loads(out.stdout)["cluster"].get("workers", [])
                  if w["state"] == "WORKER_STATE_SERVING")


def http_completion(coord, body, key=None):
    """POST /v1/completions on a coordinator's "http" port, straight to the pod (never through a
    proxy from the environment): (status, the reply's JSON or None)."""
    cports = {p["name"]: p["containerPort"]
              for c in coord.workload["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    req = urllib.request.Request("http://%s:%d/v1/completions" % (coord.ip, cports["http"]),
                                 data=json.dumps(body).encode(), headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, None


def https_completion(coord, body, ca, server_name):
    """POST /v1/completions over HTTPS on a coordinator's "http" port, checking its certificate
    against `ca` and `server_name` (Python's own TLS, a client independent of Strata's):
    (status, the reply's JSON)."""
    cports = {p["name"]: p["containerPort"]
              for c in coord.workload["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    ctx = ssl.create_default_context(cafile=ca)
    data = json.dumps(body).encode()
    with socket.create_connection((coord.ip, cports["http"]), timeout=60) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (server_name.encode(), len(data)) + data)
            reply = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def scrape(pod):
    """Prometheus' view: a pod's metrics on the port its annotations name, by series."""
    ann = pod.workload["spec"]["template"]["metadata"].get("annotations", {})
    url = "http://%s:%s%s" % (pod.ip, ann["prometheus.io/port"], ann.get("prometheus.io/path", "/metrics"))
    # Straight to the pod, never through a proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as r:
        if r.status != 200 or "version=0.0.4" not in r.headers.get("Content-Type", ""):
            fail("%s: %s %s" % (url, r.status, r.headers.get("Content-Type")))
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def access_log_records(pod):
    """The JSON lines of a coordinator's access log (its standard output, in the pod's log)."""
    out = []
    with open(pod.log, errors="replace") as f:
        for line in f:
            if line.startswith('{"time":'):
                out.append(json.loads(line))
    return out


def stop_and_check(cluster):
    """SIGTERM to every pod; each must exit 0."""
    cluster.stop_all()
    for p in cluster.pods:
        if p.proc.returncode != 0:
            cluster.dump()
            fail("%s exited %d on SIGTERM" % (p.name, p.proc.returncode))


def kill_leftovers(cluster):
    for p in cluster.pods:
        if p.proc is not None and p.proc.poll() is None:
            os.killpg(p.proc.pid, signal.SIGKILL)


def start_pods(cluster):
    """Starts every pod and waits until all are ready."""
    for p in cluster.pods:
        cluster.start(p)
    cluster.wait("every pod ready", lambda: all(p.ready for p in cluster.pods), 90)


def run_pods(m, rootfs, work):
    cluster = Cluster(m, rootfs, work)
    try:
        start_pods(cluster)
        coordinators = [p for p in cluster.pods if p.name.startswith("strata-coordinator")]
        workers = [p for p in cluster.pods if p.name.startswith("strata-worker")]
        if len(coordinators) < 2 or len(workers) < 2:
            fail("k8s/base should run 2 coordinators and 2 workers, got %s" % [p.name for p in cluster.pods])
        print("k8s_test: %d pods ready: %s" % (len(cluster.pods), ", ".join("%s %s" % (p.name, p.ip) for p in cluster.pods)))

        expect = sorted(p.name for p in workers)
        for coord in coordinators:
            cluster.wait("%s to see both workers" % coord.name,
                         lambda: serving_workers(cluster, coord) == expect and expect, 30)
            out = stratactl(cluster, "status", "--json", "--coordinator", addr(coord))
            for w in json.loads(out.stdout)["cluster"].get("workers", []):
                tiers = {t["tier"] for t in w["info"]["tiers"]}
                if tiers != {"TIER_DEVICE", "TIER_HOST", "TIER_DISK"}:
                    fail("worker %s runs tiers %s; the manifest asks for host and disk tiers" % (w["info"]["worker_id"], sorted(tiers)))

        def generate(coord, prompt, n=16, fine_tune=None):
            extra = ["--fine-tune", fine_tune] if fine_tune else []
            out = stratactl(cluster, "generate", "--coordinator", addr(coord), "--prompt", prompt,
                            "--max-tokens", str(n), "--seed", "7", "--ignore-eos", "--json", *extra)
            if out.returncode != 0:
                cluster.dump()
                fail("generate through %s: %s" % (coord.name, out.stderr.strip()))
            r = json.loads(out.stdout)
            if len(r["token_ids"]) != n or not r["text"]:
                fail("generate through %s returned %s" % (coord.name, r))
            return r

        # Prompts of several full KV blocks (16 tokens each), so that the workers have a cache to
        # hand on.
        prompts = ["# %s\nimport os\nimport sys\n\n\ndef main(argv):\n    for arg in argv[1:]:\n"
                   "        print(arg, file=sys.stderr)\n    return %d\n" % (word, i)
                   for i, word in enumerate(["parse", "config", "server", "client", "tokens", "blocks"])]
        for i, prompt in enumerate(prompts):
            generate(coordinators[i % 2], prompt)
        first = generate(coordinators[0], "def parse(")
        for coord in coordinators:
            for i in range(3):
                r = generate(coord, "def parse(")
                if r["token_ids"] != first["token_ids"]:
                    fail("same prompt and seed gave different tokens through %s: %s vs %s" % (coord.name, r["token_ids"], first["token_ids"]))
        print("k8s_test: both coordinators answer; %r" % first["text"])
        # The image's fine-tunes, served over the model by whichever worker takes them: the same
        # seed gives the same tokens through either coordinator, and not the base's.
        tuned = [generate(coord, "#include <", fine_tune="c-headers") for coord in coordinators]
        plain = generate(coordinators[0], "#include <")
        if tuned[0]["token_ids"] != tuned[1]["token_ids"]:
            fail("fine-tune c-headers gave different tokens through the two coordinators: %s vs %s"
                 % (tuned[0]["token_ids"], tuned[1]["token_ids"]))
        if tuned[0]["token_ids"] == plain["token_ids"]:
            fail("fine-tune c-headers generated the base's tokens: %s" % plain["token_ids"])
        print("k8s_test: fine-tune c-headers answers %r" % tuned[0]["text"])
        # And the image's LoRA adapter, likewise.
        lora = [generate(coord, "#include <", fine_tune="lora-c-headers") for coord in coordinators]
        if lora[0]["token_ids"] != lora[1]["token_ids"] or lora[0]["token_ids"] == plain["token_ids"]:
            fail("LoRA adapter lora-c-headers gave %s and %s (the base: %s)"
                 % (lora[0]["token_ids"], lora[1]["token_ids"], plain["token_ids"]))
        print("k8s_test: LoRA adapter lora-c-headers answers %r" % lora[0]["text"])

        # The OpenAI-compatible API on each coordinator's "http" port, naming the fine-tune as the
        # model: the same text as through gRPC (same seed), for clients such as curl or openai.
        for coord in coordinators:
            status, reply = http_completion(coord, {"model": "c-headers", "prompt": "#include <",
                                                    "max_tokens": 16, "seed": 7, "ignore_eos": True})
            if (status != 200 or reply["usage"]["completion_tokens"] != 16
                    or reply["choices"][0]["text"] != tuned[0]["text"]):
                fail("%s's /v1/completions answered %s %s; gRPC gave %r" % (coord.name, status, reply, tuned[0]["text"]))
        print("k8s_test: the OpenAI-compatible API answers the same through both coordinators")

        # (... + the LoRA adapter's request through each coordinator)
        sent = len(prompts) + 1 + 3 * len(coordinators) + 2 * len(coordinators) + 1 + len(coordinators)
        ok = sum(scrape(c).get('strata_coordinator_requests_total{code="OK"}', 0) for c in coordinators)
        if ok != sent:
            fail("the coordinators count %s successful requests, the test sent %d" % (ok, sent))
        tokens = sum(scrape(w).get("strata_worker_generated_tokens_total", 0) for w in workers)
        if tokens < sent * 16:
            fail("the workers count %s generated tokens for %d requests of 16" % (tokens, sent))
        for w in workers:
            m = scrape(w)
            for tier in ("device", "host", "disk"):
                if m.get('strata_worker_kv_blocks{tier="%s",state="total"}' % tier, 0) <= 0:
                    fail("%s reports no %s KV blocks: %s" % (w.name, tier, sorted(m)))
        print("k8s_test: metrics: %d requests counted by the coordinators, %d tokens by the workers"
              % (ok, tokens))
        # The access log (--access_log=-): a JSON line per call on each coordinator's standard
        # output, a line per HTTP request too.
        def logged_ok():
            return sum(1 for c in coordinators for r in access_log_records(c)
                       if r.get("event") == "generate" and r.get("status") == "OK")
        cluster.wait("the access logs to hold every call", lambda: logged_ok() >= sent, 10)
        if logged_ok() != sent:
            fail("the coordinators' access logs hold %d successful calls, the test made %d" % (logged_ok(), sent))
        posts = [r for c in coordinators for r in access_log_records(c)
                 if r.get("event") == "http" and r.get("path") == "/v1/completions"]
        if len(posts) != len(coordinators) or any(r["status"] != 200 for r in posts):
            fail("the access logs hold these HTTP completions: %s" % posts)
        print("k8s_test: access logs: %d calls, %d HTTP requests" % (logged_ok(), len(posts)))

        # A pod deletion: SIGTERM, then the kubelet waits terminationGracePeriodSeconds. The victim
        # is the worker holding the most KV blocks.
        out = stratactl(cluster, "status", "--json", "--coordinator", addr(coordinators[0]))
        held = {}
        for w in json.loads(out.stdout)["cluster"].get("workers", []):
            held[w["info"]["worker_id"]] = sum(int(t.get("num_total_blocks", 0)) for t in w.get("indexed", [])
                                               if t["tier"] == "TIER_DEVICE")
        victim = cluster.pod(max(held, key=held.get))
        if held[victim.name] == 0:
            fail("no worker holds a KV block after %d requests: %s" % (len(prompts) + 7, held))
        other = next(w for w in workers if w is not victim)
        admin = addr(coordinators[0])

        # `stratactl drain` of the other worker: it turns not ready but stays live (and known to the
        # coordinators, through the headless Service that lists not-ready pods),
        # so the kubelet keeps it. Meanwhile every new request goes to the victim.
        out = stratactl(cluster, "drain", other.name, "--coordinator", admin)
        if out.returncode != 0:
            fail("stratactl drain %s: %s" % (other.name, out.stderr))
        cluster.wait("%s to turn not ready after stratactl drain" % other.name, lambda: not other.ready, 30)
        drained_at = time.monotonic()
        if cluster.probe(other, "liveness") != 0 or other.proc.poll() is not None:
            fail("%s, drained, must stay live (its liveness probe would restart it)" % other.name)
        # Past the coordinators' DNS re-resolution (every 5 s) while the other worker is not ready:
        # it must stay known to them, or the resume below could not reach it. Waited for before the
        # streams start, so that they are still running at the SIGTERM (1800 tokens take the CPU
        # worker only a few seconds).
        cluster.wait("a DNS re-resolution while %s is drained" % other.name,
                     lambda: time.monotonic() - drained_at > 6, 15)
        def admitted(values):
            # Running or queued there now, plus finished there since the streams started (under
            # load their processes may start far enough apart for an early one to be done).
            finished = sum(v for k, v in values.items()
                           if k.startswith("strata_worker_sequences_finished_total"))
            return values.get("strata_worker_live_sequences", 0), finished
        _, finished_before = admitted(scrape(victim))
        streams = []
        for i in range(4):
            cmd = [os.path.join(ROOT, BINARIES["stratactl"]), "generate", "--coordinator",
                   addr(coordinators[i % 2]), "--prompt",
                   "# stream %d\n" % i, "--max-tokens", "1800", "--seed", str(i), "--ignore-eos", "--json"]
            streams.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        # All four admitted there before the SIGTERM (with the other worker draining, a stream that
        # arrived later would find no worker at all), and some still running, so that the drain has
        # sequences to finish.
        def all_admitted():
            live, finished = admitted(scrape(victim))
            return live >= 1 and live + finished - finished_before >= len(streams)
        cluster.wait("the streams to run on %s" % victim.name, all_admitted, 30)
        grace = victim.workload["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        victim.expect_exit = True
        victim.seen_not_serving = False
        victim.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out = stratactl(cluster, "drain", other.name, "--resume", "--coordinator", admin)
        if out.returncode != 0:
            fail("stratactl drain --resume %s: %s" % (other.name, out.stderr))
        cluster.wait("%s to turn not ready" % victim.name, lambda: not victim.ready, grace)
        cluster.wait("%s back in the Service" % other.name, lambda: other.ready, 30)
        for coord in coordinators:
            cluster.wait("%s to see %s serving again" % (coord.name, other.name),
                         lambda: other.name in (serving_workers(cluster, coord) or []), 30)
        for i in range(4):
            generate(coordinators[i % 2], "int main(void) {")
        try:
            rc = victim.proc.wait(timeout=max(1, grace - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            fail("%s did not exit within its %d s grace period after SIGTERM" % (victim.name, grace))
        if rc != 0:
            cluster.dump()
            fail("%s exited %d after SIGTERM (want 0: a clean drain)" % (victim.name, rc))
        with open(victim.log, errors="replace") as f:
            in_flight = re.findall(r"draining \((\d+) sequences in flight\)", f.read())
        if not in_flight or int(in_flight[-1]) == 0:
            fail("%s had no sequence in flight at SIGTERM (%s): the drain went untested" % (victim.name, in_flight))
        if not victim.seen_not_serving:
            fail("%s never answered NOT_SERVING while it drained" % victim.name)
        for i, st in enumerate(streams):
            stdout, stderr = st.communicate(timeout=60)
            if st.returncode != 0:
                fail("stream %d, in flight on %s at SIGTERM, failed: %s" % (i, victim.name, stderr))
            if len(json.loads(stdout)["token_ids"]) != 1800:
                fail("stream %d came back short" % i)
        print("k8s_test: %s, SIGTERM with %s sequences in flight: NOT_SERVING, turned not ready, "
              "finished them all, exited 0 after %.1f s; other requests kept succeeding"
              % (victim.name, in_flight[-1], time.monotonic() - t0))

        # The StatefulSet replaces it: same name, same volume. Its disk tier finds its blocks again.
        victim.expect_exit = False
        cluster.start(victim)
        cluster.wait("%s ready again" % victim.name, lambda: victim.ready, 60)
        for coord in coordinators:
            cluster.wait("%s to see %s again" % (coord.name, victim.name),
                         lambda: serving_workers(cluster, coord) == expect, 30)
        with open(victim.log, errors="replace") as f:
            log = f.read()
        recovered = re.findall(r"\((\d+) recovered\)", log)
        persisted = re.findall(r"KV cache persisted: (\d+) blocks", log)
        if len(recovered) != 2 or len(persisted) != 1:
            fail("%s: want a KV tiers line from each start and one persist line, found %s, %s" % (victim.name, recovered, persisted))
        if int(persisted[0]) < held[victim.name] or int(recovered[1]) < int(recovered[0]) + int(persisted[0]):
            fail("%s held %d device blocks, wrote %s to disk on SIGTERM and its replacement recovered "
                 "%s (the first start %s)" % (victim.name, held[victim.name], persisted[0], recovered[1], recovered[0]))
        print("k8s_test: %s back on its volume: %s KV blocks written on SIGTERM, recovered by its replacement"
              % (victim.name, persisted[0]))
        generate(coordinators[0], "def parse(")
        stop_and_check(cluster)
    finally:
        kill_leftovers(cluster)


# ---------------------------------------------------------------------------------------------------


def run_pods_disaggregated(m, rootfs, work):
    """k8s/disaggregated: a prefill and a decode worker. A long prompt is computed on the prefill
    pod and generated on the decode pod, which copies its KV blocks over the prefill pod's KV
    transfer port; a repeat
    of it (held by the decode pod now) and a short prompt go to the decode pod whole."""
    cluster = Cluster(m, rootfs, work)
    try:
        start_pods(cluster)
        coordinators = [p for p in cluster.pods if p.name.startswith("strata-coordinator")]
        prefill = [p for p in cluster.pods if p.name.startswith("strata-prefill")]
        decode = [p for p in cluster.pods if p.name.startswith("strata-worker")]
        if len(prefill) != 1 or len(decode) != 1 or not coordinators:
            fail("k8s/disaggregated should run one prefill and one decode worker, got %s" % [p.name for p in cluster.pods])
        coord = coordinators[0]
        expect = sorted(p.name for p in prefill + decode)
        cluster.wait("%s to see both workers" % coord.name,
                     lambda: serving_workers(cluster, coord) == expect, 30)
        out = stratactl(cluster, "status", "--json", "--coordinator", addr(coord))
        roles = {w["info"]["worker_id"]: w["info"].get("role", "WORKER_ROLE_MIXED")
                 for w in json.loads(out.stdout)["cluster"]["workers"]}
        if roles != {prefill[0].name: "WORKER_ROLE_PREFILL", decode[0].name: "WORKER_ROLE_DECODE"}:
            fail("worker roles %s" % roles)

        def generate(prompt):
            out = stratactl(cluster, "generate", "--coordinator", addr(coord), "--prompt", prompt,
                            "--max-tokens", "12", "--seed", "7", "--ignore-eos", "--json")
            if out.returncode != 0:
                cluster.dump()
                fail("generate through %s: %s" % (coord.name, out.stderr.strip()))
            return json.loads(out.stdout)

        def handoffs():
            return scrape(coord).get("strata_coordinator_prefill_handoffs_total", 0)

        # Well over --disaggregate_min_uncached_tokens (512).
        long_prompt = "".join("def step_%d(state):\n    return state + %d\n\n" % (i, i) for i in range(60))
        first = generate(long_prompt)
        if first["usage"]["num_prompt_tokens"] < 600 or len(first["token_ids"]) != 12:
            fail("the long prompt returned %s" % first)
        cluster.wait("the coordinator to count the handoff", lambda: handoffs() == 1, 10)
        copied = 'strata_worker_kv_fetches_total{outcome="copied"}'
        cluster.wait("the decode pod to count its copy", lambda: scrape(decode[0]).get(copied) == 1, 10)
        # Over the prefill pod's KV transfer port (50062), not gRPC.
        transports = {t: scrape(decode[0]).get('strata_worker_kv_fetch_bytes_total{transport="%s"}' % t, 0)
                      for t in ("tcp", "grpc")}
        if transports["tcp"] <= 0 or transports["grpc"] != 0:
            fail("the decode pod's copy went over %s, not the KV transfer port" % transports)
        again = generate(long_prompt)
        if again["token_ids"] != first["token_ids"]:
            fail("the repeated prompt gave other tokens: %s vs %s" % (again["token_ids"], first["token_ids"]))
        generate("def parse(")
        if handoffs() != 1:
            fail("a prompt the decode pod holds, or a short one, was handed off: %s handoffs" % handoffs())
        print("k8s_test: k8s/disaggregated: a %d-token prompt prefilled on %s, decoded on %s from its "
              "KV blocks copied over the transfer port (%d bytes); repeats and short prompts stay on "
              "the decode pod" % (first["usage"]["num_prompt_tokens"], prefill[0].name,
                                  decode[0].name, transports["tcp"]))
        stop_and_check(cluster)
    finally:
        kill_leftovers(cluster)


def with_secrets(objs, where):
    """The manifests with API keys and the cluster secret turned on, as k8s/base/model.yaml says
    (and the image's draft model, STRATA_DRAFT_MODEL_DIR, for speculative decoding)."""
    keyed = copy.deepcopy(objs)
    for o in keyed:
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "strata-model":
            if o["data"].get("STRATA_DRAFT_MODEL_DIR") != "":
                fail("%s: STRATA_DRAFT_MODEL_DIR must be empty by default (no draft model)" % where)
            o["data"]["STRATA_DRAFT_MODEL_DIR"] = "/models/strata-tiny-draft"
            if o["data"].get("STRATA_API_KEYS_FILE") != "":
                fail("%s: STRATA_API_KEYS_FILE must be empty by default (no keys asked)" % where)
            o["data"]["STRATA_API_KEYS_FILE"] = "/etc/strata/api-keys/keys.json"
            if o["data"].get("STRATA_CLUSTER_SECRET_FILE") != "":
                fail("%s: STRATA_CLUSTER_SECRET_FILE must be empty by default (no secret)" % where)
            o["data"]["STRATA_CLUSTER_SECRET_FILE"] = "/etc/strata/cluster-secret/secret"
    return Manifests(keyed, where + " with API keys and a cluster secret")


def run_pods_keyed(m, rootfs, work):
    """k8s/base with API keys and the cluster secret turned on, as docs/KUBERNETES.md says: keys
    asked for over both APIs, the workers answering the coordinators' secret, the secret rotated
    through the Secret's volume without a restart."""
    ops, team = "sk-k8s-test-ops-0000000", "sk-k8s-test-team-000000"
    keys = json.dumps({"tenants": [{"name": "ops", "keys": [ops], "admin": True},
                                   {"name": "team", "keys": [team], "models": ["strata-tiny"]}]})
    old, new = "k8s-test-cluster-secret-old-0123", "k8s-test-cluster-secret-new-4567"
    cluster = Cluster(m, rootfs, work, secrets={"strata-api-keys": {"keys.json": keys},
                                                "strata-cluster-secret": {"secret": old + "\n"}})
    try:
        start_pods(cluster)
        coordinators = [p for p in cluster.pods if p.name.startswith("strata-coordinator")]
        workers = sorted(p.name for p in cluster.pods if p.name.startswith("strata-worker"))

        for coord in coordinators:
            cluster.wait("%s to see both workers (they answer its secret)" % coord.name,
                         lambda: serving_workers(cluster, coord, ops) == workers, 30)

        def generate(coord, key):
            return stratactl(cluster, "generate", "--coordinator", addr(coord), "--prompt", "def parse(",
                             "--max-tokens", "8", "--seed", "7", "--ignore-eos", "--json", key=key)

        def http(coord, key):
            return http_completion(coord, {"model": "strata-tiny", "prompt": "def parse(", "max_tokens": 8,
                                           "seed": 7, "ignore_eos": True}, key)

        def served_everywhere(when):
            for coord in coordinators:
                out = generate(coord, team)
                if out.returncode != 0 or len(json.loads(out.stdout)["token_ids"]) != 8:
                    cluster.dump()
                    fail("%s: generate with the team's key through %s: %s" % (when, coord.name, out.stderr.strip()))
                status, reply = http(coord, team)
                if status != 200 or reply["usage"]["completion_tokens"] != 8:
                    fail("%s: HTTP completion with the team's key through %s: %s %s" % (when, coord.name, status, reply))

        served_everywhere("keys on")
        for coord in coordinators:
            out = generate(coord, None)
            if out.returncode == 0 or "API key" not in out.stderr:
                fail("generate without a key through %s: rc %d, %s" % (coord.name, out.returncode, out.stderr))
            status, _ = http(coord, None)
            if status != 401:
                fail("HTTP completion without a key through %s answered %s, want 401" % (coord.name, status))
        print("k8s_test (keys on): both coordinators ask for keys over gRPC and HTTP and serve the tenant's")
        # The workers draft with the image's draft model (STRATA_DRAFT_MODEL_DIR).
        cluster.wait("the workers' draft model to propose drafts",
                     lambda: sum(scrape(w).get("strata_worker_draft_model_tokens_total{kind=\"draft\"}", 0)
                                 for w in cluster.pods if w.name.startswith("strata-worker")) > 0, 10)
        print("k8s_test (keys on): the workers draft with the image's draft model")
        # Each coordinator hears from the other (--peers, with the cluster secret), so a tenant's
        # limits hold across both.
        cluster.wait("each coordinator to hear from the other (--peers)",
                     lambda: all(scrape(c).get("strata_coordinator_peers") == 1 for c in coordinators), 20)
        print("k8s_test (keys on): the coordinators share their tenants' use (--peers)")

        # The tenant's calls in the coordinators' access logs, by tenant and API.
        def logged(api):
            return [r for c in coordinators for r in access_log_records(c)
                    if r.get("event") == "generate" and r.get("tenant") == "team" and r.get("api") == api
                    and r.get("status") == "OK"]
        cluster.wait("the access logs to name the tenant's calls",
                     lambda: len(logged("grpc")) >= 2 and len(logged("http")) >= 2, 10)

        # The cluster secret rotated through the Secret's volume (every pod reads it again every
        # 5 s), serving throughout; each step goes on once every pod has logged that it took the
        # new file, so at the end the old secret is gone everywhere.
        def reloads(p):
            try:
                with open(p.log, errors="replace") as f:
                    return f.read().count("cluster secret reloaded")
            except OSError:
                return 0

        for step, text in enumerate([old + "\n" + new + "\n", new + "\n" + old + "\n", new + "\n"]):
            before = {p.name: reloads(p) for p in cluster.pods}
            cluster.update_secret("strata-cluster-secret", "secret", text)
            cluster.wait("every pod to reload the cluster secret (step %d)" % (step + 1),
                         lambda: all(reloads(p) > before[p.name] for p in cluster.pods), 20)
            served_everywhere("rotation step %d" % (step + 1))
        for coord in coordinators:
            if serving_workers(cluster, coord, ops) != workers:
                fail("%s lost a worker across the secret's rotation: %s"
                     % (coord.name, serving_workers(cluster, coord, ops)))
        print("k8s_test (keys on): the cluster secret rotated in three steps without a restart, serving throughout")
        stop_and_check(cluster)
    finally:
        kill_leftovers(cluster)


def expect_tls_everywhere(m):
    """Every coordinator and worker serves and calls over TLS with the strata-tls Secret's files
    (components/tls), probed on the plaintext health port."""
    for w in m.workloads():
        for c in w["spec"]["template"]["spec"]["containers"]:
            args = parse_args(c.get("args", []))
            want = {"tls_cert": "/etc/strata/tls/tls.crt", "tls_key": "/etc/strata/tls/tls.key",
                    "tls_ca": "/etc/strata/tls/ca.crt", "tls_server_name": "strata.internal"}
            got = {f: args.get(f) for f in want}
            if got != want:
                fail("%s: %s's TLS flags are %s, not %s" % (m.name, w["metadata"]["name"], got, want))
            volumes = {v["name"]: v for v in w["spec"]["template"]["spec"].get("volumes", [])}
            tls = volumes.get("tls", {}).get("secret", {})
            if tls.get("secretName") != "strata-tls" or tls.get("optional"):
                fail("%s: %s does not mount the Secret strata-tls (not optional)" % (m.name, w["metadata"]["name"]))
    for s in m.of("Service"):
        for port in s["spec"]["ports"]:
            if port.get("appProtocol") == "kubernetes.io/h2c":
                fail("%s: Service %s port %s still says cleartext HTTP/2 (h2c)" % (m.name, s["metadata"]["name"], port["name"]))
    return 1


def expect_cert_manager_issues_it(m):
    """components/tls-cert-manager: cert-manager issues the Secret every pod mounts, from a CA
    issuer whose CA certificate it also issues, for the name the pods check and both uses."""
    cert = next((c for c in m.of("Certificate") if c["spec"]["secretName"] == "strata-tls"), None)
    if cert is None:
        fail("%s: no cert-manager Certificate writes the Secret strata-tls" % m.name)
    spec = cert["spec"]
    names = set()
    for w in m.workloads():
        for c in w["spec"]["template"]["spec"]["containers"]:
            names.add(parse_args(c.get("args", [])).get("tls_server_name"))
    if not names <= set(spec.get("dnsNames", [])):
        fail("%s: Certificate strata-tls names %s, not the --tls_server_name %s the pods check"
             % (m.name, spec.get("dnsNames"), sorted(names)))
    if not {"server auth", "client auth"} <= set(spec.get("usages", [])):
        fail("%s: Certificate strata-tls is not for both server and client auth (mutual TLS): %s"
             % (m.name, spec.get("usages")))
    issuer = m.get(spec["issuerRef"].get("kind", "Issuer"), spec["issuerRef"]["name"])
    if issuer is None or "ca" not in issuer["spec"]:
        fail("%s: Certificate strata-tls's issuer %s is not a CA issuer in the manifests (ca.crt "
             "would be missing)" % (m.name, spec["issuerRef"]))
    ca = next((c for c in m.of("Certificate")
               if c["spec"]["secretName"] == issuer["spec"]["ca"]["secretName"]), None)
    if ca is None or not ca["spec"].get("isCA"):
        fail("%s: the CA issuer's Secret %s is not written by a CA Certificate"
             % (m.name, issuer["spec"]["ca"]["secretName"]))
    if m.get(ca["spec"]["issuerRef"].get("kind", "Issuer"), ca["spec"]["issuerRef"]["name"]) is None:
        fail("%s: the CA Certificate's issuer %s is not in the manifests" % (m.name, ca["spec"]["issuerRef"]))
    return 1


def run_pods_tls(m, rootfs, work):
    """k8s/tls: every gRPC connection over TLS with the certificate tools/make_dev_certs.sh makes,
    the kubelet's probes on the plaintext health ports. The workers turn ready, both coordinators
    reach both workers (mutual TLS) and answer stratactl over TLS, and refuse it in plaintext."""
    certs = os.path.join(work, "certs")
    files = {}
    for f in ("tls.crt", "tls.key", "ca.crt"):
        with open(os.path.join(certs, f)) as fh:
            files[f] = fh.read()
    cluster = Cluster(m, rootfs, work, secrets={"strata-tls": files})
    try:
        # stratactl's TLS settings, from the environment as a user's shell would have them.
        os.environ["STRATA_TLS_CA"] = os.path.join(certs, "ca.crt")
        os.environ["STRATA_TLS_SERVER_NAME"] = "strata.internal"
        start_pods(cluster)
        coordinators = [p for p in cluster.pods if p.name.startswith("strata-coordinator")]
        workers = sorted(p.name for p in cluster.pods if p.name.startswith("strata-worker"))
        for coord in coordinators:
            cluster.wait("%s to see both workers over mutual TLS" % coord.name,
                         lambda: serving_workers(cluster, coord) == workers and workers, 30)
            out = stratactl(cluster, "generate", "--coordinator", addr(coord), "--prompt", "def parse(",
                            "--max-tokens", "8", "--seed", "7", "--ignore-eos", "--json")
            if out.returncode != 0 or len(json.loads(out.stdout)["token_ids"]) != 8:
                cluster.dump()
                fail("generate over TLS through %s: %s" % (coord.name, out.stderr.strip()))
            # The OpenAI-compatible API over HTTPS with the same certificate.
            status, reply = https_completion(
                coord, {"model": "strata-tiny", "prompt": "def parse(", "max_tokens": 8, "seed": 7,
                        "ignore_eos": True}, os.path.join(certs, "ca.crt"), "strata.internal")
            if status != 200 or reply["usage"]["completion_tokens"] != 8:
                fail("HTTPS completion through %s: %s %s" % (coord.name, status, reply))
        plain = dict(os.environ)
        for k in ("STRATA_TLS_CA", "STRATA_TLS_SERVER_NAME"):
            plain.pop(k)
        out = subprocess.run([os.path.join(ROOT, BINARIES["stratactl"]), "status", "--coordinator",
                              addr(coordinators[0])], capture_output=True, text=True, timeout=60, env=plain)
        if out.returncode == 0:
            fail("%s answered stratactl in plaintext: %s" % (coordinators[0].name, out.stdout))
        print("k8s_test: k8s/tls: %d pods ready on their plaintext health ports; both coordinators "
              "reach both workers over mutual TLS and answer over TLS only, gRPC and HTTPS"
              % len(cluster.pods))
        stop_and_check(cluster)
    finally:
        kill_leftovers(cluster)


def main():
    os.environ["PATH"] = os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
    if len(sys.argv) == 4 and sys.argv[1] == "--pods-tls":
        with open(os.path.join(sys.argv[3], "manifests.json")) as f:
            run_pods_tls(Manifests(json.load(f), "k8s/tls"), sys.argv[2], sys.argv[3])
        print("PASS")
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--pods-disaggregated":
        with open(os.path.join(sys.argv[3], "manifests.json")) as f:
            run_pods_disaggregated(Manifests(json.load(f), "k8s/disaggregated"), sys.argv[2], sys.argv[3])
        print("PASS")
        return
    if len(sys.argv) == 4 and sys.argv[1] in ("--pods", "--pods-keyed"):
        m = Manifests(render_base(os.path.join(ROOT, "k8s/base")), "k8s/base")
        if sys.argv[1] == "--pods":
            run_pods(m, sys.argv[2], sys.argv[3])
        else:
            run_pods_keyed(with_secrets(m.objs, "k8s/base"), sys.argv[2], sys.argv[3])
        print("PASS")
        return

    work = os.environ.get("TEST_TMPDIR") or tempfile.mkdtemp()
    flags = {name: binary_flags(os.path.join(ROOT, BINARIES[name]))
             for name in ("strata-worker", "strata-coordinator")}
    image_models = {"models/strata-tiny", "models/strata-tiny-draft"}
    image_fine_tunes = {"fine-tunes/strata-tiny"}

    base = Manifests(render_base(os.path.join(ROOT, "k8s/base")), "k8s/base")
    n = check_manifests(base, flags, image_models, image_fine_tunes)
    # With API keys and the cluster secret turned on as k8s/base/model.yaml says: the coordinators'
    # keys file and everyone's cluster secret are on the Secrets' volumes, and every coordinator
    # and worker reads the same secret.
    def expect_secret_everywhere(m):
        """Every coordinator and worker container takes --cluster_secret_file."""
        for w in m.workloads():
            for c in w["spec"]["template"]["spec"]["containers"]:
                if expand(parse_args(c.get("args", [])).get("cluster_secret_file", ""),
                          m.container_env(c)) != "/etc/strata/cluster-secret/secret":
                    fail("%s: %s does not read the cluster secret" % (m.name, w["metadata"]["name"]))
        return 1

    keyed = with_secrets(base.objs, "k8s/base")
    n += check_manifests(keyed, flags, image_models, image_fine_tunes) + expect_secret_everywhere(keyed)
    # kustomize refuses the symlinks a Bazel runfiles tree is made of: render a copy.
    k8s_copy = os.path.join(work, "k8s")
    shutil.rmtree(k8s_copy, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "k8s"), k8s_copy)
    rendered = kubectl_render(os.path.join(k8s_copy, "base"))
    if rendered is not None:
        if sorted(json.dumps(o, sort_keys=True) for o in rendered) != sorted(json.dumps(o, sort_keys=True) for o in base.objs):
            fail("kubectl kustomize k8s/base differs from its resource files")
        gpu = kubectl_render(os.path.join(k8s_copy, "gpu"))
        n += check_manifests(Manifests(gpu, "k8s/gpu"), flags, image_models, image_fine_tunes)
        keyed = with_secrets(gpu, "k8s/gpu")
        n += check_manifests(keyed, flags, image_models, image_fine_tunes) + expect_secret_everywhere(keyed)
        def plan_overlay(name, emit, base):
            """What `stratactl plan --emit EMIT` writes, as an overlay of k8s/BASE named NAME."""
            d = os.path.join(k8s_copy, name)
            os.makedirs(d)
            out = subprocess.run([os.path.join(ROOT, BINARIES["stratactl"]), "plan", "--model",
                                  os.path.join(ROOT, "bench/configs/llama3_8b.json"), "--gpu", "h100",
                                  "--rate", "20", "--emit", emit],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                fail("stratactl plan --emit %s: %s" % (emit, out.stderr))
            with open(os.path.join(d, "worker.yaml"), "w") as f:
                f.write(out.stdout)
            with open(os.path.join(d, "kustomization.yaml"), "w") as f:
                f.write("resources: [../%s]\npatches:\n  - path: worker.yaml\n" % base)
            return d

        planned = kubectl_render(plan_overlay("planned", "k8s", "gpu"))
        n += check_manifests(Manifests(planned, "stratactl plan --emit k8s"), flags, image_models,
                             image_fine_tunes)
        keyed = with_secrets(planned, "stratactl plan --emit k8s")
        n += check_manifests(keyed, flags, image_models, image_fine_tunes) + expect_secret_everywhere(keyed)
        # Disaggregated prefill and decode, over k8s/base and over k8s/gpu, and the planner's
        # patch of the latter.
        plan_overlay("planned-disaggregated", "k8s-disaggregated", "gpu-disaggregated")
        split = {}
        for d in ("disaggregated", "gpu-disaggregated", "planned-disaggregated"):
            split[d] = kubectl_render(os.path.join(k8s_copy, d))
            sm = Manifests(split[d], "k8s/" + d)
            n += check_manifests(sm, flags, image_models, image_fine_tunes)
            roles = {}
            for w in sm.of("StatefulSet"):
                args = parse_args(w["spec"]["template"]["spec"]["containers"][0].get("args", []))
                roles[w["metadata"]["name"]] = args.get("role")
            if roles != {"strata-worker": "decode", "strata-prefill": "prefill"}:
                fail("k8s/%s: worker roles %s" % (d, roles))
            base_workers = sm.get("StatefulSet", "strata-worker")["spec"]["template"]["spec"]
            prefill_workers = copy.deepcopy(sm.get("StatefulSet", "strata-prefill")["spec"]["template"]["spec"])
            prefill_workers["containers"][0]["args"] = [a for a in prefill_workers["containers"][0]["args"]
                                                         if a != "--role=prefill"] + ["--role=decode"]
            if prefill_workers != base_workers:
                fail("k8s/%s: the prefill pods differ from the decode pods beyond their role" % d)
            keyed = with_secrets(split[d], "k8s/" + d)
            n += check_manifests(keyed, flags, image_models, image_fine_tunes) + expect_secret_everywhere(keyed)
        # TLS: k8s/tls, and components/tls over k8s/gpu-disaggregated (the component's patches
        # must take every workload of the larger overlay).
        tls_sets = {"tls": kubectl_render(os.path.join(k8s_copy, "tls"))}
        d = os.path.join(k8s_copy, "gpu-disaggregated-tls")
        os.makedirs(d)
        with open(os.path.join(d, "kustomization.yaml"), "w") as f:
            f.write("resources: [../gpu-disaggregated]\ncomponents: [../components/tls]\n")
        tls_sets["gpu-disaggregated-tls"] = kubectl_render(d)
        for name, objs in tls_sets.items():
            tm = Manifests(objs, "k8s/" + name)
            n += check_manifests(tm, flags, image_models, image_fine_tunes) + expect_tls_everywhere(tm)
        # With cert-manager issuing the Secret (components/tls-cert-manager).
        d = os.path.join(k8s_copy, "tls-cert-manager")
        os.makedirs(d)
        with open(os.path.join(d, "kustomization.yaml"), "w") as f:
            f.write("resources: [../base]\ncomponents: [../components/tls, ../components/tls-cert-manager]\n")
        cm = Manifests(kubectl_render(d), "k8s/base with components/tls and tls-cert-manager")
        n += (check_manifests(cm, flags, image_models, image_fine_tunes) + expect_tls_everywhere(cm)
              + expect_cert_manager_issues_it(cm))
        print("k8s_test: k8s/base, k8s/gpu, both disaggregated overlays, stratactl plan's "
              "overlays of k8s/gpu and k8s/gpu-disaggregated, and k8s/tls pass %d checks" % n)
    else:
        print("k8s_test: k8s/base passes %d checks; no kubectl here, so k8s/gpu is not rendered" % n)

    validate_schemas(work, [("k8s/base", base.objs)] +
                     ([("k8s/gpu", gpu), ("stratactl plan --emit k8s", planned),
                       ("k8s/disaggregated", split["disaggregated"]),
                       ("k8s/gpu-disaggregated", split["gpu-disaggregated"]),
                       ("stratactl plan --emit k8s-disaggregated", split["planned-disaggregated"]),
                       ("k8s/tls", tls_sets["tls"]),
                       ("k8s/gpu-disaggregated with components/tls", tls_sets["gpu-disaggregated-tls"])]
                      if rendered is not None else []))

    archive = os.path.join(work, "strata-image.tar")
    rootfs = os.path.join(work, "rootfs")
    builder = os.path.join(ROOT, "tools/image/build_image.py")
    py = sys.executable
    # The bundled fine-tunes as tools/build_image.sh packs them.
    deltas = os.path.join(work, "deltas")
    os.makedirs(deltas, exist_ok=True)
    for ft in ("c-headers", "man"):
        sh(os.path.join(ROOT, BINARIES["stratactl"]), "delta", "compress", "--base",
           os.path.join(ROOT, "models/strata-tiny/base"), "--fine-tune",
           os.path.join(ROOT, "models/strata-tiny/ft-" + ft), "--out",
           os.path.join(deltas, ft + ".delta.safetensors"), "--json")
    shutil.copytree(os.path.join(ROOT, "models/strata-tiny/lora-c-headers"),
                    os.path.join(deltas, "lora-c-headers"))
    sh(py, builder, "--out", archive, "--tag", "strata:test",
       *sum((["--binary", os.path.join(ROOT, p)] for p in BINARIES.values()), []),
       "--model", "strata-tiny=" + os.path.join(ROOT, "models/strata-tiny/base"),
       "--model", "strata-tiny-draft=" + os.path.join(ROOT, "models/strata-tiny/draft"),
       "--fine-tunes", "strata-tiny=" + deltas)
    sh(py, builder, "--unpack", archive, "--rootfs", rootfs)
    os.unlink(archive)
    for name in BINARIES:
        if not os.access(os.path.join(rootfs, "usr/local/bin", name), os.X_OK):
            fail("the image has no /usr/local/bin/%s" % name)

    # Pods need their own network and mount namespaces: as root, directly; otherwise inside a user
    # namespace where this user is root (the image's user cannot be taken on there).
    real_root = os.geteuid() == 0
    if not real_root:
        print("k8s_test: not root, so pods run as root of a user namespace: runAsUser, fsGroup and "
              "file permissions are NOT exercised (run as root, as CI does, for those)")
    env = dict(os.environ, STRATA_K8S_TEST_REAL_ROOT="1" if real_root else "0")
    ns = ["unshare", "--net", "--mount", "--pid", "--fork", "--propagation", "private"]
    if not real_root:
        ns[1:1] = ["--user", "--map-root-user"]
    # A private /run for `ip netns`; each phase in namespaces of its own.
    phases = [("--pods", work), ("--pods-keyed", os.path.join(work, "keyed"))]
    if rendered is not None:
        phases.append(("--pods-disaggregated", os.path.join(work, "disaggregated")))
        os.makedirs(phases[-1][1], exist_ok=True)
        with open(os.path.join(phases[-1][1], "manifests.json"), "w") as f:
            json.dump(split["disaggregated"], f)
        # TLS with the certificate the documented script makes.
        phases.append(("--pods-tls", os.path.join(work, "tls")))
        os.makedirs(phases[-1][1], exist_ok=True)
        with open(os.path.join(phases[-1][1], "manifests.json"), "w") as f:
            json.dump(tls_sets["tls"], f)
        sh(os.path.join(ROOT, "tools/make_dev_certs.sh"), os.path.join(phases[-1][1], "certs"))
    for phase, phase_work in phases:
        os.makedirs(phase_work, exist_ok=True)
        inner = "mount -t tmpfs tmpfs /run && mount -t proc proc /proc && exec %s %s %s %s %s" % (
            shquote(py), shquote(os.path.abspath(__file__)), phase, shquote(rootfs), shquote(phase_work))
        rc = subprocess.run(ns + ["/bin/sh", "-c", inner], env=env).returncode
        if rc != 0:
            fail("%s phase exited %d" % (phase, rc))


if __name__ == "__main__":
    main()
