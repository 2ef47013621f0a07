#!/usr/bin/env python3
"""Tests for the BPE trainer/exporter, train_tiny.py (smoke run) and the committed strata-tiny models.

  /usr/bin/python3 -m unittest discover -s tools/models -p 'test_*.py'

Needs Debian's python3-torch, python3-numpy, python3-regex.  The comparison with Hugging Face's own
tokenizers library runs when node and the `tokenizers` npm package are present
(tools/tokenizer_oracle/node_modules, or set STRATA_NODE_TOKENIZERS to the package directory).
"""

import glob
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tools", "reference"))

import bpe_train  # noqa: E402
import hf_tokenizer  # noqa: E402
import llama_ref  # noqa: E402
import safetensors_io  # noqa: E402

def _load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


TINY_DIR = os.path.join(REPO, "models", "strata-tiny")

EDGE_TEXTS = [
    "", "hello world", "  leading spaces\n\n\ttabs\r\n", "def f(x):\n    return x**2  # ünïcödé 日本語 🎉\n",
    "<|bos|>special<|endoftext|> mid <|bos|>", "it's we'll I'M 123 4567 3.14", "\x00\x01\x7f bytes \ufffd",
    "a" * 100, "   ", "\n", "#include <stdio.h>\nint main(void) { return 0; }\n", ".TH LS 1\n.SH NAME\nls \\- list\n",
]


def _sample_corpus():
    files = sorted(glob.glob("/usr/lib/python3.11/json/*.py"))
    return [_read_bytes(f).decode("utf-8") for f in files] + EDGE_TEXTS


def _node_tokenizers():
    cand = [os.environ.get("STRATA_NODE_TOKENIZERS", ""),
            os.path.join(REPO, "tools", "tokenizer_oracle", "node_modules", "tokenizers")]
    for c in cand:
        if c and os.path.isfile(os.path.join(c, "index.js")):
            try:
                subprocess.run(["node", "--version"], check=True, capture_output=True)
            except (OSError, subprocess.CalledProcessError):
                return None
            return c
    return None


NODE_SCRIPT = r"""
const tk = require(process.argv[1]);
const fs = require('fs');
const tok = tk.Tokenizer.fromFile(process.argv[2]);
const texts = JSON.parse(fs.readFileSync(process.argv[3], 'utf8'));
(async () => {
  const out = [];
  for (const t of texts) {
    const a = await tok.encode(t, null, {addSpecialTokens: true});
    const b = await tok.encode(t, null, {addSpecialTokens: false});
    out.push({with_special: a.getIds(), without: b.getIds(),
              decoded: await tok.decode(a.getIds(), false), decoded_skip: await tok.decode(a.getIds(), true)});
  }
  console.log(JSON.stringify(out));
})();
"""


def hf_tokenizers_encode(tokenizer_json_path, texts):
    """[{with_special, without, decoded, decoded_skip}] from HF tokenizers (Rust, via node)."""
    mod = _node_tokenizers()
    with tempfile.TemporaryDirectory() as t:
        inp = os.path.join(t, "in.json")
        with open(inp, "w", encoding="utf-8") as f:
            json.dump(texts, f)
        out = subprocess.run(["node", "-e", NODE_SCRIPT, mod, tokenizer_json_path, inp],
                             check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def _train_small(num_tokens=600):
    counts = bpe_train.count_words(_sample_corpus())
    tokens, merges = bpe_train.train_bpe(counts, num_tokens)
    tj = bpe_train.build_tokenizer_json(tokens, merges, ["<|endoftext|>", "<|bos|>"], "<|bos|>",
                                        num_tokens + 2)
    return counts, tokens, merges, tj


class BpeTest(unittest.TestCase):
    def test_deterministic_and_layout(self):
        _, tokens, merges, tj = _train_small()
        _, tokens2, merges2, tj2 = _train_small()
        self.assertEqual(merges, merges2)
        self.assertEqual(json.dumps(tj), json.dumps(tj2))
        vocab = tj["model"]["vocab"]
        self.assertEqual(len(vocab), 602)
        self.assertEqual(sorted(vocab.values()), list(range(602)))
        for b in range(256):
            self.assertEqual(vocab[hf_tokenizer.BYTE_TO_UNICODE[b]], b)
        self.assertEqual(vocab["<|endoftext|>"], 600)
        self.assertEqual(vocab["<|bos|>"], 601)
        self.assertEqual([t["id"] for t in tj["added_tokens"]], [600, 601])
        self.assertEqual(tj["pre_tokenizer"], {"type": "ByteLevel", "add_prefix_space": False,
                                               "trim_offsets": True, "use_regex": True})
        self.assertEqual(tj["decoder"]["type"], "ByteLevel")
        for m in tj["model"]["merges"]:
            a, b = m.split(" ")
            self.assertIn(a + b, vocab)

    def test_encoding_reproduces_training_segmentation(self):
        counts = bpe_train.count_words(_sample_corpus())
        seg = {}
        tokens, merges = bpe_train.train_bpe(counts, 600, segmentation=seg)
        tj = bpe_train.build_tokenizer_json(tokens, merges, ["<|endoftext|>", "<|bos|>"], "<|bos|>", 602)
        tok = hf_tokenizer.Tokenizer(tj)
        self.assertEqual(len(seg), len(counts))
        for w, ids in seg.items():
            self.assertEqual(tok._encode_word(w), ids, repr(w))

    def test_roundtrip_and_specials(self):
        _, _, _, tj = _train_small()
        tok = hf_tokenizer.Tokenizer(tj)
        for t in _sample_corpus():
            self.assertEqual(tok.decode(tok.encode(t, add_special_tokens=False)), t)
            ids = tok.encode(t)
            self.assertEqual(ids[0], 601)
        ids = tok.encode("<|bos|>x<|endoftext|>", add_special_tokens=False)
        self.assertEqual(ids[0], 601)
        self.assertEqual(ids[-1], 600)
        self.assertEqual(tok.decode(ids, skip_special_tokens=True), "x")

    @unittest.skipUnless(_node_tokenizers(), "node + tokenizers npm package not available")
    def test_matches_hf_tokenizers(self):
        _, _, _, tj = _train_small()
        with tempfile.TemporaryDirectory() as t:
            bpe_train.write_tokenizer_files(t, tj, "<|bos|>", "<|endoftext|>", 2048)
            path = os.path.join(t, "tokenizer.json")
            texts = _sample_corpus()
            got = hf_tokenizers_encode(path, texts)
            tok = hf_tokenizer.Tokenizer.load(path)
            for text, r in zip(texts, got):
                ids = tok.encode(text)
                self.assertEqual(ids, r["with_special"], repr(text[:40]))
                self.assertEqual(tok.encode(text, add_special_tokens=False), r["without"])
                self.assertEqual(tok.decode(ids), r["decoded"])
                self.assertEqual(tok.decode(ids, skip_special_tokens=True), r["decoded_skip"])


class SmokeRunTest(unittest.TestCase):
    def test_smoke(self):
        with tempfile.TemporaryDirectory() as t:
            out, work = os.path.join(t, "out"), os.path.join(t, "work")
            r = subprocess.run([sys.executable, os.path.join(HERE, "train_tiny.py"), "--smoke", "--threads", "1",
                                "--out", out, "--work", work], capture_output=True, text=True,
                               env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
            self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-3000:])
            self.assertIn("ESTIMATED RUN TIME", r.stdout.splitlines()[1])
            check_model_family(self, out, smoke=True)


class DraftSmokeRunTest(unittest.TestCase):
    def test_smoke(self):
        with tempfile.TemporaryDirectory() as t:
            out = os.path.join(t, "draft")
            r = subprocess.run([sys.executable, os.path.join(HERE, "train_draft.py"), "--smoke", "--threads", "1",
                                "--out", out], capture_output=True, text=True,
                               env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
            self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-3000:])
            check_draft(self, out, TINY_DIR)


def check_draft(tc, d, family):
    """A draft model of the family's base: same tokenizer (byte for byte) and vocabulary, smaller."""
    cfg = _load_json(os.path.join(d, "config.json"))
    base = _load_json(os.path.join(family, "base", "config.json"))
    tc.assertEqual(cfg["vocab_size"], base["vocab_size"])
    tc.assertEqual(cfg["eos_token_id"], base["eos_token_id"])
    tc.assertLess(cfg["hidden_size"] * cfg["num_hidden_layers"], base["hidden_size"] * base["num_hidden_layers"])
    for f in ("tokenizer.json", "tokenizer_config.json"):
        tc.assertEqual(_read_bytes(os.path.join(d, f)), _read_bytes(os.path.join(family, "base", f)))
    raw = safetensors_io.load_model_dir_raw(d)
    tc.assertEqual(set(raw), set(llama_ref.expected_tensor_names(llama_ref.Spec(cfg))))
    tc.assertIn("greedy agreement with the base", _read_bytes(os.path.join(d, "DRAFT.md")).decode("utf-8"))


def check_model_family(tc, root, smoke):
    names = ("base", "ft-c-headers", "ft-man")
    for n in names:
        d = os.path.join(root, n)
        tc.assertEqual(sorted(os.listdir(d)), ["config.json", "generation_config.json", "model.safetensors",
                                               "tokenizer.json", "tokenizer_config.json"])
        cfg = _load_json(os.path.join(d, "config.json"))
        tc.assertEqual(cfg["architectures"], ["LlamaForCausalLM"])
        tc.assertTrue(cfg["tie_word_embeddings"])
        tc.assertEqual(cfg["torch_dtype"], "bfloat16")
        raw = safetensors_io.load_model_dir_raw(d)
        tc.assertEqual({t.dtype for t in raw.values()}, {"BF16"})
        spec = llama_ref.Spec(cfg)
        tc.assertEqual(set(raw), set(llama_ref.expected_tensor_names(spec)))
        tc.assertNotIn("lm_head.weight", raw)
        gen = _load_json(os.path.join(d, "generation_config.json"))
        tj = _load_json(os.path.join(d, "tokenizer.json"))
        tc.assertEqual(gen["eos_token_id"], tj["model"]["vocab"]["<|endoftext|>"])
        tc.assertEqual(gen["bos_token_id"], tj["model"]["vocab"]["<|bos|>"])
        tc.assertEqual(cfg["bos_token_id"], gen["bos_token_id"])
        tc.assertEqual(len(tj["model"]["vocab"]), cfg["vocab_size"])
        tc.assertEqual(_read_bytes(os.path.join(d, "tokenizer.json")),
                       _read_bytes(os.path.join(root, "base", "tokenizer.json")))
    # the fine-tunes differ from the base
    b = safetensors_io.load_model_dir_raw(os.path.join(root, "base"))["model.norm.weight"].array
    f = safetensors_io.load_model_dir_raw(os.path.join(root, "ft-man"))["model.norm.weight"].array
    tc.assertFalse(np.array_equal(b, f))
    for dom in ("python", "c_headers", "man"):
        size = os.path.getsize(os.path.join(root, "heldout", dom + ".txt"))
        tc.assertGreater(size, 10000 if smoke else 50000)
        tc.assertLess(size, 100000 if smoke else 110000)
    readme = _read_bytes(os.path.join(root, "README.md")).decode("utf-8")
    tc.assertIn("| base | python |", readme)
    # README perplexities: numpy and torch agree closely
    rows = [ln for ln in readme.splitlines() if ln.startswith("| base |") or ln.startswith("| ft-")]
    tc.assertEqual(len(rows), 9)
    for ln in rows:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        p_np, p_t = float(cells[3]), float(cells[4])
        tc.assertLess(abs(p_np - p_t) / p_np, 1e-3, ln)


@unittest.skipUnless(os.path.isfile(os.path.join(TINY_DIR, "base", "config.json")), "models not trained yet")
class CommittedModelsTest(unittest.TestCase):
    def test_layout(self):
        check_model_family(self, TINY_DIR, smoke=False)
        total = 0
        for r, _, fs in os.walk(TINY_DIR):
            total += sum(os.path.getsize(os.path.join(r, f)) for f in fs)
        self.assertLess(total, 22 * 1000 * 1000)  # with the draft model

    def test_draft(self):
        check_draft(self, os.path.join(TINY_DIR, "draft"), TINY_DIR)

    def test_numpy_matches_torch_and_predicts(self):
        import torch
        import torch_llama
        torch.set_num_threads(1)
        d = os.path.join(TINY_DIR, "base")
        tok = hf_tokenizer.Tokenizer.load(os.path.join(d, "tokenizer.json"))
        text = _read_bytes(os.path.join(TINY_DIR, "heldout", "python.txt")).decode("utf-8")
        ids = tok.encode(text[:2000])[:128]
        m = llama_ref.Model.load(d)
        lg = m.logits(ids)
        cfg = _load_json(os.path.join(d, "config.json"))
        tm = torch_llama.LlamaForCausalLM(cfg).double()
        tm.load_hf_state_dict({k: torch.from_numpy(v) for k, v in safetensors_io.load_model_dir(d).items()})
        with torch.no_grad():
            tl = tm(torch.tensor([ids]))[0].numpy()
        np.testing.assert_allclose(lg, tl, atol=1e-9)
        lp = llama_ref.log_softmax(lg)
        nll = -lp[np.arange(len(ids) - 1), ids[1:]].mean()
        # Far below the vocabulary size (2048, a uniform guess): it learned something. (The held-out
        # file's first lines, a module docstring and imports, score about 160.)
        self.assertLess(math.exp(nll), 400.0)


if __name__ == "__main__":
    unittest.main()
