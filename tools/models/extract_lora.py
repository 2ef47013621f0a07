#!/usr/bin/python3
"""Extracts a LoRA adapter from a full fine-tune: the best rank-r approximation (truncated SVD) of
each decoder projection's difference from the base, written as PEFT saves adapters
(adapter_config.json + adapter_model.safetensors), so that any PEFT-format loader reads it.

For a projection with difference D = W_ft - W_base [out, in] and SVD D = U S Vᵀ, the adapter holds
    lora_A = sqrt(S_r) V_rᵀ          [r, in]
    lora_B = U_r sqrt(S_r) / s       [out, r]
with s = lora_alpha / r (PEFT's scaling), so that s · B · A = U_r S_r V_rᵀ. Norms and biases are
left out (LoRA adapts matrices only). With --embeddings the input embedding and the LM head get
LoRA parts too, as PEFT stores them for target_modules embed_tokens and lm_head: the embedding's
lora_embedding_A [r, vocab] and lora_embedding_B [hidden, r] approximate the transposed difference
of embed_tokens, lm_head's lora_A and lora_B the difference of lm_head (of embed_tokens when the
model ties them).

Usage (numpy only; Debian's python3-numpy):
    tools/models/extract_lora.py --base models/strata-tiny/base \
        --fine-tune models/strata-tiny/ft-c-headers --rank 16 --out models/strata-tiny/lora-c-headers
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
import safetensors_io  # noqa: E402

PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--fine-tune", required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 * rank)")
    ap.add_argument("--dtype", default="BF16", choices=["F32", "BF16", "F16"])
    ap.add_argument("--modules", default=",".join(p.split(".")[1] for p in PROJECTIONS),
                    help="comma-separated projections to adapt (default all seven)")
    ap.add_argument("--embeddings", action="store_true",
                    help="also adapt embed_tokens and lm_head")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    with open(os.path.join(args.base, "config.json")) as f:
        config = json.load(f)
    base = safetensors_io.load_model_dir(args.base)
    ft = safetensors_io.load_model_dir(args.fine_tune)
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    scale = alpha / args.rank
    modules = args.modules.split(",")
    tensors = {}
    kept_energy = []

    def factor(d):
        # s · B · A = the rank-r truncation of d.
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        r = min(args.rank, len(s))
        root = np.sqrt(s[:r])
        kept_energy.append(float(np.sum(s[:r] ** 2) / np.sum(s ** 2)))
        return (root[:, None] * vt[:r]).astype(np.float32), (u[:, :r] * root[None, :] / scale).astype(np.float32)

    if args.embeddings:
        d_embed = ft["model.embed_tokens.weight"] - base["model.embed_tokens.weight"]
        head = "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"
        d_head = ft[head] - base[head]
        a, b = factor(d_embed.T)  # [hidden, vocab] = B [hidden, r] · A [r, vocab]
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = (a, args.dtype)
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = (b, args.dtype)
        a, b = factor(d_head)  # [vocab, hidden]
        tensors["base_model.model.lm_head.lora_A.weight"] = (a, args.dtype)
        tensors["base_model.model.lm_head.lora_B.weight"] = (b, args.dtype)
        modules = modules + ["embed_tokens", "lm_head"]
    for layer in range(config["num_hidden_layers"]):
        for proj in PROJECTIONS:
            if proj.split(".")[1] not in modules:
                continue
            name = "model.layers.%d.%s" % (layer, proj)
            d = ft[name + ".weight"] - base[name + ".weight"]
            if not np.any(d):
                continue
            a, b = factor(d)
            prefix = "base_model.model." + name
            tensors[prefix + ".lora_A.weight"] = (a, args.dtype)
            tensors[prefix + ".lora_B.weight"] = (b, args.dtype)

    os.makedirs(args.out, exist_ok=True)
    safetensors_io.save_file(tensors, os.path.join(args.out, "adapter_model.safetensors"),
                             metadata={"format": "pt"})
    adapter_config = {
        "base_model_name_or_path": os.path.basename(os.path.normpath(args.base)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": args.rank,
        "target_modules": sorted(set(modules)),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    with open(os.path.join(args.out, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
        f.write("\n")
    print("%d modules, rank %d, mean share of the difference's energy kept %.3f" %
          (len(tensors) // 2, args.rank, float(np.mean(kept_energy)) if kept_energy else 0.0))


if __name__ == "__main__":
    main()
