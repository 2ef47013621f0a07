"""Reference logits for the bundled trained model on held-out text.

Writes worker/model/testdata/strata_tiny_base/{reference.json, logits_*.f32}: for the start of each
held-out file (tokenized with the model's own tokenizer.json, BOS first), the float64 NumPy forward
pass's logits. The C++ runner must match them (worker/model/model_runner_test.cc).

    /usr/bin/python3 tools/reference/make_trained_reference.py
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_tokenizer  # noqa: E402
import llama_ref  # noqa: E402
from make_testdata import _format_reference  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL = os.path.join(ROOT, "models", "strata-tiny", "base")
HELDOUT = os.path.join(ROOT, "models", "strata-tiny", "heldout")
OUT = os.path.join(ROOT, "worker", "model", "testdata", "strata_tiny_base")
CASES = [("python.txt", 48), ("c_headers.txt", 32), ("man.txt", 24)]


def main():
    with open(os.path.join(MODEL, "tokenizer.json"), encoding="utf-8") as f:
        tok = hf_tokenizer.Tokenizer(json.load(f))
    model = llama_ref.Model.load(MODEL)
    os.makedirs(OUT, exist_ok=True)
    cases = []
    for i, (name, n) in enumerate(CASES):
        with open(os.path.join(HELDOUT, name), encoding="utf-8") as f:
            text = f.read(4000)
        ids = tok.encode(text, add_special_tokens=True)[:n]
        logits = model.logits(ids)
        fname = "logits_%d.f32" % i
        logits.astype("<f4").tofile(os.path.join(OUT, fname))
        cases.append({"ids": [int(x) for x in ids], "logits_file": fname,
                      "shape": list(logits.shape), "source": name})
    ref = {
        "variant": "strata_tiny_base",
        "description": "the bundled trained model (models/strata-tiny/base) on held-out text",
        "generator": "tools/reference/make_trained_reference.py (logits: llama_ref.py, float64)",
        "logits_format": "float32 little-endian, row-major [num_tokens, vocab_size]",
        "cases": cases,
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        f.write(_format_reference(ref))
    print("wrote %d cases to %s" % (len(cases), OUT))


if __name__ == "__main__":
    main()
