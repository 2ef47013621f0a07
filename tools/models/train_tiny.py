#!/usr/bin/env python3
"""Trains the strata-tiny model family: a tiny Llama (LlamaForCausalLM) base model on the Python
standard library, plus full fine-tunes on C headers and on man pages, with a byte-level BPE
tokenizer trained on all three.  Everything comes from files a Debian 12 machine has; no network.
The corpus files are those of pinned Debian packages (DOMAIN_PACKAGES: libpython3.11-stdlib,
libc6-dev + linux-libc-dev, manpages + manpages-dev + core utilities), found with dpkg-query.

  /usr/bin/python3 tools/models/train_tiny.py --threads 2            # full run (prints its ETA first)
  /usr/bin/python3 tools/models/train_tiny.py --smoke --out /tmp/st  # a few steps, every code path

Outputs (under --out, default models/strata-tiny):
  base/, ft-c-headers/, ft-man/      config.json, model.safetensors (bf16), tokenizer.json,
                                     tokenizer_config.json, generation_config.json
  heldout/{python,c_headers,man}.txt held-out text (files never used for training)
  README.md                          settings, corpus, and perplexities (numpy float64 and torch)
Scratch (tokenized corpora, fp32 checkpoints, logs) goes to --work.

Needs /usr/bin/python3 with Debian's python3-torch, python3-numpy and python3-regex.
"""

import argparse
import glob
import gzip
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time


def _threads_from_argv(argv):
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "2"


# numpy's BLAS reads its thread count at import: make it follow --threads too.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _threads_from_argv(sys.argv))

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tools", "reference"))

import bpe_train  # noqa: E402
import hf_tokenizer  # noqa: E402
import llama_ref  # noqa: E402
import make_random_model  # noqa: E402
import safetensors_io  # noqa: E402

EOS = "<|endoftext|>"
BOS = "<|bos|>"
SPECIALS = [EOS, BOS]  # ids vocab_size-2, vocab_size-1
DOMAINS = ("python", "c_headers", "man")
MODELS = (("base", "python"), ("ft-c-headers", "c_headers"), ("ft-man", "man"))

# Training throughput (fwd+bwd+AdamW, fp32, batch 16 x 512) on the 2-core AMD EPYC (AVX2) dev
# machine with torch 1.13: ~1900 tokens/s measured on 1 thread; 2 threads extrapolated (x1.6).
# Used only for the up-front estimate; the run re-estimates from its own steps (the "eta" in the
# log).  A concurrent build on the same cores can halve it.
TOKENS_PER_SEC = {1: 1900.0, 2: 3000.0}

T0 = time.time()


def log(msg):
    el = time.time() - T0
    print("[%02d:%02d:%02d] %s" % (el // 3600, el % 3600 // 60, el % 60, msg), flush=True)


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------

def _score(domain, path):
    return hashlib.sha256(("strata-tiny:%s:%s" % (domain, path)).encode()).hexdigest()


def _read_text(path):
    with open(path, "rb") as f:
        data = f.read()
    return data.decode("utf-8", errors="replace")


_ROFF_COMMENT = re.compile(r"^[.']\s*\\[\"#]")


def _read_man(path):
    with open(path, "rb") as f:
        data = gzip.decompress(f.read())
    text = data.decode("utf-8", errors="replace")
    lines = [ln for ln in text.splitlines(keepends=True) if not _ROFF_COMMENT.match(ln)]
    text = "".join(lines)
    if len(text) < 300 and text.lstrip().startswith(".so "):
        return None  # a redirect stub (".so man3/other.3")
    return text


def _cap(text, limit):
    """First `limit` characters, cut back to a line boundary."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[: cut + 1 if cut > 0 else limit]


# Files come from named Debian packages, so the corpus is the same on every Debian 12 machine with
# those packages (build-essential pulls in libc6-dev, linux-libc-dev and manpages-dev; the rest are
# required/important/standard).  Without dpkg the globs below are used instead.
DOMAIN_PACKAGES = {
    "python": ["libpython3.11-minimal", "libpython3.11-stdlib"],
    "c_headers": ["libc6-dev", "linux-libc-dev"],
    "man": ["manpages", "manpages-dev", "coreutils", "util-linux", "bash", "findutils", "grep", "sed",
            "tar", "gzip", "diffutils", "procps", "dpkg", "apt", "man-db"],
}
DOMAIN_GLOBS = {
    "python": ["/usr/lib/python3.11/**/*.py"],
    "c_headers": ["/usr/include/**/*.h"],
    "man": ["/usr/share/man/man%d/*.gz" % s for s in (1, 2, 3, 5, 7, 8)],
}
_PY_SKIP = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
_DOMAIN_RE = {
    "python": re.compile(r"^/usr/lib/python3\.11/.*\.py$"),
    "c_headers": re.compile(r"^/usr/include/.*\.h$"),
    "man": re.compile(r"^/usr/share/man/man[123578]/[^/]*\.gz$"),
}


def package_versions(packages):
    """{package: version} for the installed ones (empty if dpkg-query is missing)."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Version} ${Status}\\n"] + list(packages),
                             capture_output=True, text=True).stdout
    except OSError:
        return {}
    vers = {}
    for line in out.splitlines():
        parts = line.split(" ")
        if len(parts) >= 3 and line.endswith("installed") and "not-installed" not in line:
            vers[parts[0]] = parts[1]
    return vers


def domain_files(domain):
    """(sorted file list, {package: version} or None when globbing)."""
    pkgs = DOMAIN_PACKAGES[domain]
    vers = package_versions(pkgs)
    files = set()
    if vers:
        for pkg in pkgs:
            if pkg not in vers:
                log("warning: package %s is not installed: its %s files are missing" % (pkg, domain))
                continue
            out = subprocess.run(["dpkg-query", "-L", pkg], capture_output=True, text=True).stdout
            files.update(ln for ln in out.splitlines() if _DOMAIN_RE[domain].match(ln))
    else:
        log("warning: dpkg-query unavailable; globbing %s" % DOMAIN_GLOBS[domain])
        for g in DOMAIN_GLOBS[domain]:
            files.update(glob.glob(g, recursive=True))
        vers = None
    if domain == "python":
        files = {p for p in files if not (set(p.split(os.sep)) & _PY_SKIP)}
    return sorted(p for p in files if os.path.isfile(p) and not os.path.islink(p)), vers


def collect_domain(domain, train_budget, heldout_budget, file_cap, heldout_file_cap):
    """Deterministic split of one domain into held-out segments and training documents.

    Files are ordered by sha256("strata-tiny:<domain>:<path>"); the first ones (>= 1 KB, no special
    token strings) become held-out segments (each capped at heldout_file_cap chars, at a line
    boundary) until heldout_budget characters; every later file is a training candidate, capped at
    file_cap characters, taken in the same order until train_budget characters (None = all)."""
    files, versions = domain_files(domain)
    order = sorted(files, key=lambda p: _score(domain, p))
    reader = _read_man if domain == "man" else _read_text
    heldout, train = [], []
    held_chars = train_chars = 0
    for p in order:
        if train_budget is not None and train_chars >= train_budget:
            break
        text = reader(p)
        if not text or len(text.strip()) == 0:
            continue
        if held_chars < heldout_budget:
            if len(text) >= 1024 and EOS not in text and BOS not in text:
                seg = _cap(text, heldout_file_cap)
                heldout.append((p, seg))
                held_chars += len(seg)
                continue
        doc = _cap(text, file_cap)
        train.append((p, doc))
        train_chars += len(doc)
    return {"files_total": len(files), "heldout": heldout, "train": train, "packages": versions}


# ----------------------------------------------------------------------------------------------
# Model helpers
# ----------------------------------------------------------------------------------------------

def model_config(args, bos_id, eos_id):
    cfg = make_random_model.make_config(
        "llama", vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
        kv_heads=args.kv_heads, head_dim=args.hidden // args.heads, intermediate=args.intermediate,
        tied=True, dtype="bf16", rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=args.max_position_embeddings, rms_norm_eps=1e-5,
        bos_token_id=bos_id, eos_token_id=eos_id)
    return cfg


def param_count(cfg):
    spec = llama_ref.Spec(cfg)
    return sum(int(np.prod(s)) for s in llama_ref.expected_shapes(spec).values())


def export_model(out_dir, cfg, torch_model, tokenizer_json, bos_id, eos_id, model_max_length):
    import torch  # noqa: F401
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().cpu().float().numpy() for k, v in torch_model.hf_state_dict().items()}
    make_random_model.write_model(out_dir, cfg, sd, "bf16", shards=1)
    bpe_train.write_tokenizer_files(out_dir, tokenizer_json, BOS, EOS, model_max_length)
    gen = {"_from_model_config": True, "bos_token_id": bos_id, "eos_token_id": eos_id,
           "transformers_version": make_random_model.TRANSFORMERS_VERSION}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")


def eval_windows(ids, window):
    """Held-out protocol (the same as `stratactl eval ppl --context <window>`): ids is the whole
    text encoded with special tokens (so ids[0] is bos); consecutive non-overlapping windows of
    `window` ids, each run from position 0; inside a window token i+1 is predicted from tokens 0..i.
    A window of n ids scores n - 1 tokens; a trailing 1-id window scores nothing and is dropped."""
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids) - i >= 2]


def perplexity_numpy(model_dir, ids, window, max_windows=None):
    m = llama_ref.Model.load(model_dir)
    nll, n = 0.0, 0
    for w in eval_windows(ids, window)[:max_windows]:
        lp = llama_ref.log_softmax(m.logits(w[:-1]))
        nll -= float(lp[np.arange(len(w) - 1), np.asarray(w[1:])].sum())
        n += len(w) - 1
    return nll, n


def load_torch_model(model_dir):
    """The model in model_dir as torch_llama's float32 LlamaForCausalLM (eval mode), and its config."""
    import torch
    import torch_llama
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    m = torch_llama.LlamaForCausalLM(cfg)
    m.load_hf_state_dict({k: torch.from_numpy(v.astype(np.float32))
                          for k, v in safetensors_io.load_model_dir(model_dir, np.float32).items()})
    m.eval()
    return m, cfg


def perplexity_torch(model_dir, ids, window, max_windows=None):
    import torch
    m, _ = load_torch_model(model_dir)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in eval_windows(ids, window)[:max_windows]:
            lp = torch.log_softmax(m(torch.tensor([w[:-1]]))[0].float(), dim=-1)
            nll -= float(lp[torch.arange(len(w) - 1), torch.tensor(w[1:])].double().sum())
            n += len(w) - 1
    return nll, n


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def train(model, stream, steps, args, lr, warmup, seed, tag, val=None, steps_after=0, loss_fn=None):
    """AdamW + linear warmup + cosine decay to 10%; each sample is stream[o:o+T+1] at a random o.
    loss_fn(model, x, y) -> (loss, note) replaces next-token cross entropy (note: logged text)."""
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    T, B = args.seq_len, args.batch
    stream = np.asarray(stream)
    hi = len(stream) - T
    if hi <= 0:
        raise ValueError("%s: corpus too small (%d tokens) for seq_len %d" % (tag, len(stream), T))
    model.train()
    t_start = time.time()
    ema = None
    for step in range(steps):
        if step < warmup:
            cur = lr * (step + 1) / warmup
        else:
            prog = (step - warmup) / max(1, steps - warmup)
            cur = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))
        for g in opt.param_groups:
            g["lr"] = cur
        offs = rng.integers(0, hi, size=B)
        batch = np.stack([stream[o:o + T + 1] for o in offs]).astype(np.int64)
        x = torch.from_numpy(batch[:, :-1])
        y = torch.from_numpy(batch[:, 1:])
        if loss_fn is None:
            logits = model(x)
            loss, note = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), ""
        else:
            loss, note = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = float(loss)
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if step == 4 or step + 1 == steps or (step + 1) % args.log_every == 0:
            el = time.time() - t_start
            rate = (step + 1) * B * T / el
            eta = (steps - step - 1) * B * T / rate
            eta_all = (steps - step - 1 + steps_after) * B * T / rate
            msg = "%s step %d/%d loss %.4f (ema %.4f%s) lr %.2e  %.0f tok/s  eta %.1f min (all training %.1f)" % (
                tag, step + 1, steps, lv, ema, note, cur, rate, eta / 60, eta_all / 60)
            if val is not None and ((step + 1) % (args.log_every * 5) == 0 or step + 1 == steps):
                model.eval()
                msg += "  | heldout ppl " + val(model)
                model.train()
            log(msg)
    model.eval()
    return ema


def quick_val(ids_by_domain, window, max_windows):
    import torch

    def run(model):
        out = []
        with torch.no_grad():
            for d, ids in ids_by_domain.items():
                nll, n = 0.0, 0
                for w in eval_windows(ids, window)[:max_windows]:
                    lp = torch.log_softmax(model(torch.tensor([w[:-1]]))[0], dim=-1)
                    nll -= float(lp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
                    n += len(w) - 1
                out.append("%s %.2f" % (d, math.exp(nll / max(n, 1))))
        return ", ".join(out)
    return run


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def estimate_seconds(args):
    tps = TOKENS_PER_SEC.get(args.threads, TOKENS_PER_SEC[2] * args.threads / 2)
    steps = args.base_steps + 2 * args.ft_steps
    train_s = steps * args.batch * args.seq_len / tps
    prep_s = 120 if not args.smoke else 15      # corpus reading, BPE training, tokenization
    eval_s = 3 * 3 * (25 if not args.smoke else 2) + 60
    return prep_s + train_s + eval_s, train_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "models", "strata-tiny"))
    ap.add_argument("--work", default="/tmp/strata-tiny-work")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--base-steps", type=int, default=800)
    ap.add_argument("--ft-steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--base-lr", type=float, default=2e-3)
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--max-position-embeddings", type=int, default=2048)
    ap.add_argument("--train-budget-mb", type=float, default=12.0,
                    help="cap on the characters of training text per domain")
    ap.add_argument("--heldout-kb", type=float, default=75.0)
    ap.add_argument("--bpe-sample-mb", type=float, default=3.0, help="per domain")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-max-windows", type=int, default=None,
                    help="limit held-out windows per set in the final evaluation")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny corpora and 3 steps per model; checks every code path in under a minute")
    args = ap.parse_args(argv)
    if args.smoke:
        args.base_steps = min(args.base_steps, 3)
        args.ft_steps = min(args.ft_steps, 3)
        args.batch = min(args.batch, 2)
        args.seq_len = min(args.seq_len, 128)
        args.train_budget_mb = min(args.train_budget_mb, 0.4)
        args.bpe_sample_mb = min(args.bpe_sample_mb, 0.2)
        args.heldout_kb = min(args.heldout_kb, 20)
        args.eval_max_windows = args.eval_max_windows or 2
        args.log_every = 1
        if os.path.abspath(args.out) == os.path.abspath(os.path.join(REPO, "models", "strata-tiny")):
            raise SystemExit("--smoke writes throw-away models: pass --out somewhere else (e.g. /tmp/st)")
        if args.work == "/tmp/strata-tiny-work":
            args.work = "/tmp/strata-tiny-work-smoke"

    total_s, train_s = estimate_seconds(args)
    log("strata-tiny: %d base steps + 2 x %d fine-tune steps, batch %d x %d tokens, %d thread(s)"
        % (args.base_steps, args.ft_steps, args.batch, args.seq_len, args.threads))
    log("ESTIMATED RUN TIME: about %.0f minutes (training %.0f min at ~%.0f tokens/s; re-estimated "
        "after the first steps)" % (total_s / 60, train_s / 60,
                                    TOKENS_PER_SEC.get(args.threads, 1500.0 * args.threads)))

    import torch
    import torch_llama
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)

    # 1. corpora ---------------------------------------------------------------------------------
    budget = int(args.train_budget_mb * 1e6)
    corpora = {}
    for d in DOMAINS:
        corpora[d] = collect_domain(d, budget, int(args.heldout_kb * 1000), file_cap=256 * 1024,
                                    heldout_file_cap=16 * 1024)
        c = corpora[d]
        log("corpus %-9s: %d files found, %d training docs (%.2f MB), %d held-out segments (%.1f KB)"
            % (d, c["files_total"], len(c["train"]), sum(len(t) for _, t in c["train"]) / 1e6,
               len(c["heldout"]), sum(len(t) for _, t in c["heldout"]) / 1e3))
        with open(os.path.join(args.work, "manifest_%s.txt" % d), "w") as f:
            for p, t in c["heldout"]:
                f.write("heldout\t%d\t%s\n" % (len(t), p))
            for p, t in c["train"]:
                f.write("train\t%d\t%s\n" % (len(t), p))
        c["train_sha256"] = hashlib.sha256("\0".join(t for _, t in c["train"]).encode()).hexdigest()
    heldout_dir = os.path.join(args.out, "heldout")
    os.makedirs(heldout_dir, exist_ok=True)
    heldout_text = {}
    for d in DOMAINS:
        heldout_text[d] = "\n".join(t for _, t in corpora[d]["heldout"])
        with open(os.path.join(heldout_dir, "%s.txt" % d), "w", encoding="utf-8") as f:
            f.write(heldout_text[d])

    # 2. tokenizer -------------------------------------------------------------------------------
    sample_chars = int(args.bpe_sample_mb * 1e6)
    texts = []
    for d in DOMAINS:
        got = 0
        for _, t in corpora[d]["train"]:
            if got >= sample_chars:
                break
            texts.append(t)
            got += len(t)
    log("bpe: counting pre-tokens in %.1f MB" % (sum(len(t) for t in texts) / 1e6))
    counts = bpe_train.count_words(texts)
    log("bpe: %d distinct pre-tokens; training to %d tokens" % (len(counts), args.vocab - len(SPECIALS)))
    tokens, merges = bpe_train.train_bpe(counts, args.vocab - len(SPECIALS), log=log)
    tj = bpe_train.build_tokenizer_json(tokens, merges, SPECIALS, BOS, args.vocab)
    tok = hf_tokenizer.Tokenizer(tj)
    eos_id, bos_id = tj["model"]["vocab"][EOS], tj["model"]["vocab"][BOS]
    log("bpe: %d merges, vocab %d (eos %d, bos %d)" % (len(merges), len(tj["model"]["vocab"]), eos_id, bos_id))

    # 3. tokenize --------------------------------------------------------------------------------
    streams = {}
    bytes_per_token = {}
    for d in DOMAINS:
        parts = []
        nbytes = ntok = 0
        for _, t in corpora[d]["train"]:
            ids = tok.encode_ordinary(t)
            parts.append(np.asarray([bos_id] + ids + [eos_id], dtype=np.uint16))
            nbytes += len(t.encode("utf-8"))
            ntok += len(ids)
        streams[d] = np.concatenate(parts)
        bytes_per_token[d] = nbytes / max(ntok, 1)
        log("tokenized %-9s: %d tokens (%.2f bytes/token)" % (d, len(streams[d]), bytes_per_token[d]))
    heldout_ids = {d: tok.encode(heldout_text[d], add_special_tokens=True) for d in DOMAINS}
    for d in DOMAINS:
        assert heldout_ids[d][0] == bos_id
        assert tok.decode(heldout_ids[d], skip_special_tokens=True) == heldout_text[d], \
            "tokenizer round trip failed on " + d

    # 4. train -----------------------------------------------------------------------------------
    cfg = model_config(args, bos_id, eos_id)
    log("model: %d parameters (%.2f MB as bf16)" % (param_count(cfg), param_count(cfg) * 2 / 1e6))
    val = quick_val(heldout_ids, args.seq_len, 4)
    torch.manual_seed(args.seed)
    base = torch_llama.LlamaForCausalLM(cfg)
    with torch.no_grad():  # HF LlamaPreTrainedModel._init_weights: normal(0, initializer_range)
        for name, p in base.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, cfg["initializer_range"])
    run_stats = {}
    t = time.time()
    run_stats["base"] = train(base, streams["python"], args.base_steps, args, args.base_lr,
                              max(1, min(100, args.base_steps // 10)), args.seed + 1, "base", val,
                              steps_after=2 * args.ft_steps)
    run_stats["base_seconds"] = time.time() - t
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.save(base_state, os.path.join(args.work, "base_fp32.pt"))
    model_max_length = args.max_position_embeddings
    export_model(os.path.join(args.out, "base"), cfg, base, tj, bos_id, eos_id, model_max_length)
    for name, dom in MODELS[1:]:
        m = torch_llama.LlamaForCausalLM(cfg)
        m.load_state_dict(base_state)
        t = time.time()
        run_stats[name] = train(m, streams[dom], args.ft_steps, args, args.ft_lr,
                                max(1, min(40, args.ft_steps // 10)), args.seed + 2 + len(run_stats),
                                name, val, steps_after=args.ft_steps if name == "ft-c-headers" else 0)
        run_stats[name + "_seconds"] = time.time() - t
        torch.save(m.state_dict(), os.path.join(args.work, "%s_fp32.pt" % name))
        export_model(os.path.join(args.out, name), cfg, m, tj, bos_id, eos_id, model_max_length)

    # 5. evaluate the exported bf16 checkpoints ---------------------------------------------------
    results = {}
    for name, _ in MODELS:
        mdir = os.path.join(args.out, name)
        for d in DOMAINS:
            nll_np, n = perplexity_numpy(mdir, heldout_ids[d], args.seq_len, args.eval_max_windows)
            nll_t, n2 = perplexity_torch(mdir, heldout_ids[d], args.seq_len, args.eval_max_windows)
            assert n == n2
            used = [t for w in eval_windows(heldout_ids[d], args.seq_len)[:args.eval_max_windows] for t in w]
            nbytes = len(tok.decode(used, skip_special_tokens=True).encode("utf-8"))
            results[(name, d)] = (math.exp(nll_np / n), math.exp(nll_t / n), n, nll_np / math.log(2) / nbytes)
            log("eval %-13s on %-9s: ppl numpy-f64 %.4f torch-f32 %.4f (%d tokens, %.3f bits/byte)"
                % (name, d, results[(name, d)][0], results[(name, d)][1], n, results[(name, d)][3]))

    write_readme(args, cfg, corpora, bytes_per_token, streams, merges, results, run_stats,
                 bos_id, eos_id)
    sizes = 0
    for root, _, files in os.walk(args.out):
        sizes += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    log("done: %s (%.2f MB)" % (args.out, sizes / 1e6))
    return 0


def write_readme(args, cfg, corpora, bytes_per_token, streams, merges, results, run_stats, bos_id, eos_id):
    L = []
    w = L.append
    w("# strata-tiny")
    w("")
    w("Three tiny Llama-architecture models (`LlamaForCausalLM`, Hugging Face layout, bf16 safetensors) for")
    w("testing Strata end to end: `base/` (Python standard library), and two full fine-tunes of it,")
    w("`ft-c-headers/` (C headers) and `ft-man/` (man pages). They share one byte-level BPE tokenizer.")
    w("They are small enough to commit and to run on a CPU; they are not useful language models.")
    w("")
    w("Generated by `tools/models/train_tiny.py` (see Regenerating). Do not edit by hand.")
    w("")
    w("## Model")
    w("")
    w("| | |")
    w("| --- | --- |")
    spec = llama_ref.Spec(cfg)
    w("| architecture | LlamaForCausalLM, pre-norm RMSNorm, SwiGLU MLP, RoPE (rotate_half), GQA |")
    w("| parameters | %d (tied embeddings; %.2f MB in bf16) |" % (param_count(cfg), param_count(cfg) * 2 / 1e6))
    w("| hidden / intermediate | %d / %d |" % (cfg["hidden_size"], cfg["intermediate_size"]))
    w("| layers | %d |" % cfg["num_hidden_layers"])
    w("| heads / kv heads / head_dim | %d / %d / %d |" % (cfg["num_attention_heads"],
                                                       cfg["num_key_value_heads"], spec.head_dim))
    w("| vocab | %d (eos `%s` = %d, bos `%s` = %d) |" % (cfg["vocab_size"], EOS, eos_id, BOS, bos_id))
    w("| rope_theta / rms_norm_eps | %g / %g |" % (cfg["rope_theta"], cfg["rms_norm_eps"]))
    w("| trained context | %d tokens (config max_position_embeddings %d; quality beyond %d is untested) |"
      % (args.seq_len, cfg["max_position_embeddings"], args.seq_len))
    w("| stored dtype | bfloat16 (trained in float32, rounded to nearest even at export) |")
    w("")
    w("## Held-out perplexity")
    w("")
    w("Each model on each held-out file (`heldout/*.txt`, files never seen in training). Protocol, the same")
    w("as `stratactl eval ppl --context %d`: encode the whole file with special tokens (one `%s` at the" % (args.seq_len, BOS))
    w("start), cut the ids into consecutive windows of %d, run each window from position 0 and score" % args.seq_len)
    w("every id after the first of the window from the ids before it; perplexity =")
    w("exp(total NLL / scored tokens). `numpy f64` is `tools/reference/llama_ref.py` in float64, `torch f32`")
    w("is `tools/models/torch_llama.py` in float32, both on the stored bf16 weights. Bits/byte = total")
    w("NLL / ln 2 / UTF-8 bytes.")
    w("")
    w("| model | held-out | tokens | ppl (numpy f64) | ppl (torch f32) | bits/byte |")
    w("| --- | --- | ---: | ---: | ---: | ---: |")
    for (name, d), (p_np, p_t, n, bpb) in results.items():
        w("| %s | %s | %d | %.4f | %.4f | %.3f |" % (name, d, n, p_np, p_t, bpb))
    if args.eval_max_windows:
        w("")
        w("(Evaluated on the first %d windows of each file only.)" % args.eval_max_windows)
    w("")
    w("## Tokenizer")
    w("")
    w("Byte-level BPE, GPT-2 style: bytes map to printable characters with GPT-2's `bytes_to_unicode`, text")
    w("is pre-split with the GPT-2 regex (`'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`),")
    w("and %d merges were learned from %.1f MB per domain of training text (most frequent pair first, ties to" % (len(merges), args.bpe_sample_mb))
    w("the smaller token-id pair). Ids 0-255 are the 256 single bytes (id = byte value), then merged tokens")
    w("in creation order, then the special tokens `%s` (%d, eos) and `%s` (%d, bos)." % (EOS, eos_id, BOS, bos_id))
    w("`tokenizer.json`: model BPE (vocab + merges as \"a b\" strings), pre_tokenizer ByteLevel")
    w("(add_prefix_space false, use_regex true), decoder ByteLevel, post_processor Sequence[ByteLevel,")
    w("TemplateProcessing] which prepends `%s` when special tokens are added (like Llama 3)." % BOS)
    w("In training every document is `%s` + text + `%s`." % (BOS, EOS))
    w("")
    w("## Corpus")
    w("")
    w("Every domain's files are ordered by sha256(\"strata-tiny:<domain>:<path>\"). The first files of at")
    w("least 1 KB (up to %.0f KB, each capped at 16 KB at a line boundary) are held out; training takes the" % args.heldout_kb)
    w("remaining files in the same order, each capped at 256 KB, up to the budget.")
    w("")
    w("| domain | source | files found | training docs | training MB | tokens | bytes/token | held-out files |")
    w("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    src = {"python": "`/usr/lib/python3.11/**/*.py`, minus test/, tests/, idle_test/",
           "c_headers": "`/usr/include/**/*.h`",
           "man": "`/usr/share/man/man{1,2,3,5,7,8}/*.gz`"}
    for d in DOMAINS:
        c = corpora[d]
        w("| %s | %s | %d | %d | %.2f | %d | %.2f | %d |" % (
            d, src[d], c["files_total"], len(c["train"]), sum(len(t) for _, t in c["train"]) / 1e6,
            len(streams[d]), bytes_per_token[d], len(c["heldout"])))
    w("")
    w("Only files that belong to these Debian packages are used (via `dpkg-query -L`), so the corpus is")
    w("the same on any Debian 12 machine with the same package versions (build-essential brings")
    w("libc6-dev, linux-libc-dev and manpages-dev; the others are required/important/standard):")
    w("")
    for d in DOMAINS:
        pk = corpora[d]["packages"]
        if pk is None:
            w("- %s: dpkg-query unavailable, every file matching the pattern was used" % d)
        else:
            w("- %s: %s" % (d, ", ".join("%s %s" % kv for kv in sorted(pk.items()))))
    w("")
    w("Each domain takes at most %g MB of text. Man pages are gunzipped and kept as roff source," % args.train_budget_mb)
    w("minus comment lines (`.\\\"`, `'\\\"`, `.\\#`); `.so` redirect stubs and symlinks are skipped. Text is")
    w("decoded as UTF-8 (invalid bytes become U+FFFD). The SHA-256 of each training text (documents")
    w("joined by NUL) identifies it:")
    w("")
    for d in DOMAINS:
        w("- %s: `%s`" % (d, corpora[d]["train_sha256"]))
    w("")
    w("Held-out files:")
    w("")
    for d in DOMAINS:
        w("- %s: %s" % (d, ", ".join("`%s`" % p for p, _ in corpora[d]["heldout"])))
    w("")
    w("## Training")
    w("")
    w("| | base | fine-tunes |")
    w("| --- | --- | --- |")
    w("| data | python | c_headers / man, starting from the final base weights (fp32) |")
    w("| steps | %d | %d each |" % (args.base_steps, args.ft_steps))
    w("| batch | %d x %d tokens | same |" % (args.batch, args.seq_len))
    w("| peak lr | %g | %g |" % (args.base_lr, args.ft_lr))
    w("| schedule | linear warmup (%d steps), cosine to 10%% | warmup %d steps, cosine to 10%% |"
      % (max(1, min(100, args.base_steps // 10)), max(1, min(40, args.ft_steps // 10))))
    w("| optimizer | AdamW(0.9, 0.95), weight decay %g on matrices, grad clip 1.0 | same |" % args.weight_decay)
    w("| final training loss (EMA) | %.3f | c_headers %.3f, man %.3f |"
      % (run_stats["base"], run_stats["ft-c-headers"], run_stats["ft-man"]))
    w("| wall time | %.0f min | %.0f + %.0f min |" % (run_stats["base_seconds"] / 60,
                                                   run_stats["ft-c-headers_seconds"] / 60,
                                                   run_stats["ft-man_seconds"] / 60))
    w("")
    w("Init: normal(0, 0.02) for matrices, ones for norms (as HF Llama). Seed %d; float32 on CPU with" % args.seed)
    w("torch %s, %d thread(s). Each sample is %d + 1 consecutive tokens at a random offset of the" % (
        __import__("torch").__version__, args.threads, args.seq_len))
    w("tokenized corpus (documents joined as `[bos] doc [eos]`). A rerun with the same files, flags")
    w("and thread count should reproduce the weights; other thread counts or CPUs may differ in the last")
    w("bits of float32 reductions, and so in the trained weights.")
    w("")
    w("## Regenerating")
    w("")
    w("```sh")
    w("/usr/bin/python3 tools/models/train_tiny.py --threads %d%s" % (
        args.threads, "" if (args.base_steps, args.ft_steps) == (800, 250) else
        " --base-steps %d --ft-steps %d" % (args.base_steps, args.ft_steps)))
    w("```")
    w("")
    w("It prints its estimated run time first. Use Debian's `/usr/bin/python3` (python3-torch,")
    w("python3-numpy, python3-regex). `--smoke --out /tmp/st` runs every stage in a couple of minutes.")
    w("")
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write("\n".join(L))


if __name__ == "__main__":
    sys.exit(main())
