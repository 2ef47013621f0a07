#!/usr/bin/env python3
"""Writes worker/model/testdata/<variant>/: tiny random HF models + float64 reference logits.

  /usr/bin/python3 tools/reference/make_testdata.py [--out worker/model/testdata]

Each variant directory holds config.json, the safetensors weights (one file, or two shards plus
model.safetensors.index.json), reference.json and logits_<n>.f32 files.  reference.json:
  {"variant": ..., "description": ..., "vocab_size": V,
   "cases": [{"ids": [...], "logits_file": "logits_0.f32", "shape": [T, V], "argmax": [...]}]}
A logits file is float32 little-endian [T, V] (row t = logits after ids[0..t]), computed by
llama_ref.py in float64 from the weights exactly as stored (bf16/f16 widened exactly).
Deterministic: fixed seeds, sorted tensor order; rerunning gives identical bytes.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_ref  # noqa: E402
import make_random_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (family, dtype, shards, config kwargs, description)
VARIANTS = {
    "llama2_f32": (
        "llama", "f32", 1,
        dict(hidden=32, heads=2, kv_heads=2, intermediate=64, tied=False, rope_theta=10000.0,
             max_position_embeddings=4096, rms_norm_eps=1e-5),
        "LlamaForCausalLM, Llama 2 style: MHA (2 heads x 16), untied lm_head, no head_dim in config, "
        "rope_scaling null, F32"),
    "llama3_bf16": (
        "llama", "bf16", 1,
        dict(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96, tied=False,
             rope_theta=10000.0, max_position_embeddings=512, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2,
             rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                           "original_max_position_embeddings": 64, "rope_type": "llama3"}),
        "LlamaForCausalLM, Llama 3 style: GQA 4 q / 2 kv heads, rope_scaling llama3 (factor 8, "
        "low 1, high 4, original 64: frequency 0 unchanged, 1-2 smoothed, 3-7 divided by 8), "
        "untied, BF16"),
    "mistral_f16": (
        "mistral", "f16", 2,
        dict(hidden=64, heads=4, kv_heads=2, intermediate=96, tied=True, rope_theta=10000.0,
             sliding_window=4096, rms_norm_eps=1e-5),
        "MistralForCausalLM: GQA 4 q / 2 kv heads, sliding_window 4096 (longer than every case), "
        "tied embeddings, F16, sharded into 2 files with model.safetensors.index.json"),
    "qwen2_bf16": (
        "qwen2", "bf16", 1,
        dict(hidden=64, heads=4, kv_heads=2, intermediate=96, tied=True, rope_theta=1000000.0,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2),
        "Qwen2ForCausalLM: q/k/v biases (no o_proj bias), GQA 4 q / 2 kv heads, tied embeddings, BF16"),
    "qwen3_f32": (
        "qwen3", "f32", 1,
        dict(hidden=32, heads=4, kv_heads=2, head_dim=16, intermediate=64, tied=True,
             rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2),
        "Qwen3ForCausalLM: per-head q_norm/k_norm before RoPE, head_dim 16 != hidden/heads = 8 "
        "(q_proj out 64, hidden 32), GQA 4 q / 2 kv heads, tied embeddings, F32"),
}

CASE_LENGTHS = (1, 5, 32)


def case_ids(variant_index, length, vocab):
    rng = np.random.default_rng(1000 + 17 * variant_index + length)
    ids = rng.integers(0, vocab, size=length).tolist()
    if length >= 5:  # exercise the extreme ids and a repeated token
        ids[1], ids[2], ids[3] = 0, vocab - 1, ids[0]
    return [int(t) for t in ids]


def _format_reference(ref):
    """Indented JSON with each case on its own line (keeps the id lists compact)."""
    head = {k: v for k, v in ref.items() if k != "cases"}
    lines = ["{"]
    for k, v in head.items():
        lines.append("  %s: %s," % (json.dumps(k), json.dumps(v)))
    lines.append('  "cases": [')
    cases = [json.dumps(c, separators=(", ", ": ")) for c in ref["cases"]]
    lines.append(",\n".join("    " + c for c in cases))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def build_variant(out_root, vi, name):
    family, dtype, shards, kwargs, desc = VARIANTS[name]
    d = os.path.join(out_root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    config, files = make_random_model.make_model(d, family, dtype=dtype, seed=100 + vi, shards=shards,
                                                 vocab=256, layers=2, **kwargs)
    model = llama_ref.Model.load(d)
    cases = []
    for ci, n in enumerate(CASE_LENGTHS):
        ids = case_ids(vi, n, config["vocab_size"])
        logits = model.logits(ids)
        fname = "logits_%d.f32" % ci
        logits.astype("<f4").tofile(os.path.join(d, fname))
        cases.append({"ids": ids, "logits_file": fname, "shape": list(logits.shape),
                      "argmax": [int(a) for a in np.argmax(logits, axis=-1)]})
    ref = {
        "variant": name,
        "description": desc,
        "generator": "tools/reference/make_testdata.py (logits: tools/reference/llama_ref.py, float64)",
        "weights_dtype": make_random_model.DTYPES[dtype][0],
        "weight_files": [f for f in files if f != "config.json"],
        "vocab_size": config["vocab_size"],
        "logits_format": "float32 little-endian, row-major [num_tokens, vocab_size]",
        "cases": cases,
    }
    with open(os.path.join(d, "reference.json"), "w") as f:
        f.write(_format_reference(ref))
    return d


def main(argv=None):
    ap = argparse.ArgumentParser(description="write worker/model/testdata")
    ap.add_argument("--out", default=os.path.join(REPO, "worker", "model", "testdata"))
    args = ap.parse_args(argv)
    total = 0
    for vi, name in enumerate(VARIANTS):
        d = build_variant(args.out, vi, name)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        total += size
        print("%-12s %7d bytes  %s" % (name, size, d))
    print("total %d bytes" % total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
