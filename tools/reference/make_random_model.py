#!/usr/bin/env python3
"""Writes small random Llama-family models in Hugging Face layout (numpy only).

  make_random_model.py --family qwen3 --dtype bf16 --out /tmp/m [--shards 2] [--seed 0]
                       [--hidden 64 --layers 2 --heads 4 --kv-heads 2 --head-dim 24
                        --intermediate 128 --vocab 256 --tied/--untied ...]

The directory gets config.json (the fields transformers writes for that architecture) and
model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json with
--shards n.  Tensor names are HF's: model.embed_tokens.weight,
model.layers.N.self_attn.{q,k,v,o}_proj.weight (+ .bias for qwen2 q/k/v, or attention_bias),
model.layers.N.self_attn.{q,k}_norm.weight (qwen3), model.layers.N.{input,post_attention}_layernorm.weight,
model.layers.N.mlp.{gate,up,down}_proj.weight, model.norm.weight, lm_head.weight (unless tied).

Weights: normal(0, 0.2) for projections, normal(0, 0.25) for embeddings/lm_head, 1 + normal(0, 0.1)
for norm weights, normal(0, 0.05) for biases: logits are far from uniform and far from one-hot.
Output is deterministic for a given seed and arguments (same bytes every run).
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_ref  # noqa: E402
import safetensors_io  # noqa: E402

DTYPES = {"f32": ("F32", "float32"), "f16": ("F16", "float16"), "bf16": ("BF16", "bfloat16")}
TRANSFORMERS_VERSION = "4.46.3"


def make_config(family, vocab=256, hidden=64, layers=2, heads=4, kv_heads=None, head_dim=None,
                intermediate=128, tied=False, dtype="f32", rope_theta=None, rope_scaling=None,
                sliding_window=None, max_position_embeddings=None, rms_norm_eps=None,
                bos_token_id=1, eos_token_id=2, attention_bias=False):
    """A config.json dict with the fields transformers writes for `family`."""
    kv_heads = heads if kv_heads is None else kv_heads
    torch_dtype = DTYPES[dtype][1]
    common = {
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "tie_word_embeddings": bool(tied),
        "torch_dtype": torch_dtype,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": vocab,
    }
    if family == "llama":
        cfg = dict(common, architectures=["LlamaForCausalLM"], model_type="llama",
                   attention_bias=bool(attention_bias), mlp_bias=False, pretraining_tp=1,
                   max_position_embeddings=max_position_embeddings or 2048,
                   rms_norm_eps=rms_norm_eps if rms_norm_eps is not None else 1e-5,
                   rope_scaling=rope_scaling,
                   rope_theta=float(rope_theta if rope_theta is not None else 10000.0))
        if head_dim is not None:
            cfg["head_dim"] = head_dim
    elif family == "mistral":
        cfg = dict(common, architectures=["MistralForCausalLM"], model_type="mistral",
                   head_dim=head_dim if head_dim is not None else hidden // heads,
                   max_position_embeddings=max_position_embeddings or 32768,
                   rms_norm_eps=rms_norm_eps if rms_norm_eps is not None else 1e-5,
                   rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                   sliding_window=sliding_window)
    elif family == "qwen2":
        cfg = dict(common, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                   max_position_embeddings=max_position_embeddings or 32768,
                   max_window_layers=layers,
                   rms_norm_eps=rms_norm_eps if rms_norm_eps is not None else 1e-6,
                   rope_scaling=rope_scaling,
                   rope_theta=float(rope_theta if rope_theta is not None else 1000000.0),
                   sliding_window=sliding_window if sliding_window is not None else 32768,
                   use_sliding_window=False)
    elif family == "qwen3":
        cfg = dict(common, architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                   attention_bias=bool(attention_bias),
                   head_dim=head_dim if head_dim is not None else hidden // heads,
                   max_position_embeddings=max_position_embeddings or 40960,
                   max_window_layers=layers,
                   rms_norm_eps=rms_norm_eps if rms_norm_eps is not None else 1e-6,
                   rope_scaling=rope_scaling,
                   rope_theta=float(rope_theta if rope_theta is not None else 1000000.0),
                   sliding_window=None, use_sliding_window=False)
    else:
        raise ValueError("unknown family %r" % family)
    return dict(sorted(cfg.items()))


def random_weights(config, seed):
    """{name: float32 array} for every tensor the config's architecture needs."""
    spec = llama_ref.Spec(config)
    shapes = llama_ref.expected_shapes(spec)
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):  # sorted: generation order is independent of dict order
        shape = shapes[name]
        if name.endswith("norm.weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            a = 0.05 * rng.standard_normal(shape)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            a = 0.25 * rng.standard_normal(shape)
        else:
            a = 0.2 * rng.standard_normal(shape)
        out[name] = a.astype(np.float32)
    return out


def write_model(out_dir, config, weights, dtype, shards=1):
    """Writes config.json and the safetensors file(s); returns the list of files written."""
    os.makedirs(out_dir, exist_ok=True)
    st_dtype = DTYPES[dtype][0]
    for f in os.listdir(out_dir):  # stale shards from an earlier run would confuse loaders
        if f.endswith(".safetensors") or f == safetensors_io.INDEX_NAME:
            os.remove(os.path.join(out_dir, f))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    files = safetensors_io.save_model_dir({k: (v, st_dtype) for k, v in weights.items()}, out_dir,
                                          num_shards=shards)
    return ["config.json"] + files


def make_model(out_dir, family, dtype="f32", seed=0, shards=1, **config_kwargs):
    config = make_config(family, dtype=dtype, **config_kwargs)
    weights = random_weights(config, seed)
    files = write_model(out_dir, config, weights, dtype, shards)
    return config, files


def main(argv=None):
    ap = argparse.ArgumentParser(description="write a small random HF Llama-family model")
    ap.add_argument("--family", required=True, choices=["llama", "mistral", "qwen2", "qwen3"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--rope-theta", type=float)
    ap.add_argument("--rope-scaling", help='JSON, e.g. \'{"rope_type":"linear","factor":2.0}\'')
    ap.add_argument("--sliding-window", type=int)
    ap.add_argument("--attention-bias", action="store_true", help="llama/qwen3 attention_bias")
    args = ap.parse_args(argv)
    config, files = make_model(
        args.out, args.family, dtype=args.dtype, seed=args.seed, shards=args.shards,
        vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
        kv_heads=args.kv_heads, head_dim=args.head_dim, intermediate=args.intermediate,
        tied=args.tied, rope_theta=args.rope_theta,
        rope_scaling=json.loads(args.rope_scaling) if args.rope_scaling else None,
        sliding_window=args.sliding_window, attention_bias=args.attention_bias)
    print("wrote %s: %s" % (args.out, ", ".join(files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
