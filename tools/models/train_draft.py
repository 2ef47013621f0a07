#!/usr/bin/env python3
"""Trains strata-tiny's draft model: a smaller Llama with the base's tokenizer, distilled from the
base (models/strata-tiny/base) on the base's training text, for speculative decoding with a draft
model (a worker's --draft_model).  The draft learns to predict the base's next-token distribution
(KL divergence to the base's softmax at each position, plus a little cross entropy on the text),
so that its greedy drafts are the tokens the base goes on to draw.

  /usr/bin/python3 tools/models/train_draft.py --threads 2              # full run (prints its ETA)
  /usr/bin/python3 tools/models/train_draft.py --smoke --out /tmp/sd    # a few steps

Writes --out (default models/strata-tiny/draft): config.json, model.safetensors (bf16), the base's
tokenizer files copied unchanged, generation_config.json, and DRAFT.md (settings and results).
Needs /usr/bin/python3 with Debian's python3-torch, python3-numpy and python3-regex.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

import train_tiny  # noqa: E402  (sets the BLAS thread count from --threads before numpy loads)
from train_tiny import np  # noqa: E402

REPO = train_tiny.REPO
BASE = os.path.join(REPO, "models", "strata-tiny", "base")


def distill_loss(teacher, alpha):
    """alpha * KL(teacher || draft) + (1 - alpha) * cross entropy on the text."""
    import torch
    import torch.nn.functional as F

    def loss_fn(draft, x, y):
        with torch.no_grad():
            target = F.log_softmax(teacher(x).float(), dim=-1)
        logits = draft(x)
        logp = F.log_softmax(logits, dim=-1)
        kl = F.kl_div(logp.reshape(-1, logp.shape[-1]), target.reshape(-1, target.shape[-1]),
                      log_target=True, reduction="batchmean")
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return alpha * kl + (1 - alpha) * ce, "; kl %.4f ce %.4f" % (float(kl), float(ce))
    return loss_fn


def greedy_agreement(draft, teacher, ids, window, max_windows):
    """How often the draft's argmax is the teacher's argmax, over held-out windows (positions)."""
    import torch
    same = n = 0
    with torch.no_grad():
        for w in train_tiny.eval_windows(ids, window)[:max_windows]:
            x = torch.tensor([w])
            a = draft(x)[0].argmax(-1)
            b = teacher(x)[0].argmax(-1)
            same += int((a == b).sum())
            n += len(w)
    return same / max(n, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=BASE)
    ap.add_argument("--out", default=os.path.join(REPO, "models", "strata-tiny", "draft"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=20241129)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--alpha", type=float, default=0.9, help="weight of the KL term")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--train-budget-mb", type=float, default=12.0)
    ap.add_argument("--heldout-kb", type=float, default=75.0)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--smoke", action="store_true", help="3 steps on a small corpus")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.seq_len = 3, 2, 64
        args.train_budget_mb, args.heldout_kb, args.eval_windows, args.log_every = 0.3, 20, 1, 1
        if os.path.abspath(args.out) == os.path.abspath(os.path.join(REPO, "models", "strata-tiny", "draft")):
            raise SystemExit("--smoke writes a throw-away model: pass --out somewhere else")
    log = train_tiny.log

    import torch
    import torch_llama
    import hf_tokenizer
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with open(os.path.join(args.base, "tokenizer.json")) as f:
        tj = json.load(f)
    tok = hf_tokenizer.Tokenizer(tj)
    teacher, base_cfg = train_tiny.load_torch_model(args.base)
    bos_id, eos_id = base_cfg["bos_token_id"], base_cfg["eos_token_id"]

    # The base's training domain and held-out split (the same selection as train_tiny's).
    c = train_tiny.collect_domain("python", int(args.train_budget_mb * 1e6), int(args.heldout_kb * 1000),
                                  file_cap=256 * 1024, heldout_file_cap=16 * 1024)
    parts = [np.asarray([bos_id] + tok.encode_ordinary(t) + [eos_id], dtype=np.uint16)
             for _, t in c["train"]]
    stream = np.concatenate(parts)
    heldout = tok.encode("\n".join(t for _, t in c["heldout"]), add_special_tokens=True)
    log("corpus: %d training tokens, %d held-out tokens" % (len(stream), len(heldout)))

    ns = argparse.Namespace(vocab=base_cfg["vocab_size"], hidden=args.hidden, layers=args.layers,
                            heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate,
                            max_position_embeddings=base_cfg["max_position_embeddings"])
    cfg = train_tiny.model_config(ns, bos_id, eos_id)
    log("draft: %d parameters (base %d)" % (train_tiny.param_count(cfg), train_tiny.param_count(base_cfg)))
    draft = torch_llama.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for _, p in draft.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, cfg["initializer_range"])
    t = time.time()
    ema = train_tiny.train(draft, stream, args.steps, args, args.lr, max(1, min(40, args.steps // 10)),
                           args.seed + 1, "draft", loss_fn=distill_loss(teacher, args.alpha))
    seconds = time.time() - t

    train_tiny.export_model(args.out, cfg, draft, tj, bos_id, eos_id, base_cfg["max_position_embeddings"])
    # The base's tokenizer files exactly (export_model writes equivalent ones; keep them identical).
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(args.base, name), os.path.join(args.out, name))
    exported, _ = train_tiny.load_torch_model(args.out)
    agree = greedy_agreement(exported, teacher, heldout, args.seq_len, args.eval_windows)
    nll, n = train_tiny.perplexity_torch(args.out, heldout, 512, args.eval_windows)
    nll_b, n_b = train_tiny.perplexity_torch(args.base, heldout, 512, args.eval_windows)
    log("draft: greedy agreement with the base %.1f%%; held-out ppl %.2f (base %.2f)"
        % (100 * agree, math.exp(nll / n), math.exp(nll_b / n_b)))
    with open(os.path.join(args.out, "DRAFT.md"), "w") as f:
        f.write("# strata-tiny draft\n\n")
        f.write("A draft model for speculative decoding with `base/` (a worker's `--draft_model`): a smaller\n")
        f.write("Llama with the base's tokenizer, distilled from the base by `tools/models/train_draft.py`.\n")
        f.write("Do not edit by hand.\n\n")
        f.write("| | |\n| --- | --- |\n")
        f.write("| parameters | %d (base %d) |\n" % (train_tiny.param_count(cfg), train_tiny.param_count(base_cfg)))
        f.write("| hidden / intermediate / layers | %d / %d / %d |\n" % (args.hidden, args.intermediate, args.layers))
        f.write("| heads / kv heads | %d / %d |\n" % (args.heads, args.kv_heads))
        f.write("| training | %d steps of %d x %d tokens of the base's Python text, lr %g, loss %.2f KL to the base + %.2f CE |\n"
                % (args.steps, args.batch, args.seq_len, args.lr, args.alpha, 1 - args.alpha))
        f.write("| final loss (EMA) | %.4f |\n" % ema)
        f.write("| wall time | %.1f min, %d thread(s), seed %d |\n" % (seconds / 60, args.threads, args.seed))
        f.write("| greedy agreement with the base | %.1f%% of held-out positions (first %d windows of %d) |\n"
                % (100 * agree, args.eval_windows, args.seq_len))
        f.write("| held-out ppl (python, 512-token windows, first %d) | %.2f (base %.2f) |\n"
                % (args.eval_windows, math.exp(nll / n), math.exp(nll_b / n_b)))
        f.write("\nRegenerate: `/usr/bin/python3 tools/models/train_draft.py --threads 2`\n")
    log("done: %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
