#!/usr/bin/env python3
"""Tests for safetensors_io, llama_ref, make_random_model and make_testdata.

  /usr/bin/python3 -m unittest discover -s tools/reference -p 'test_*.py'

numpy only; the cross-checks against tools/models/torch_llama.py run when torch imports.
"""

import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tools", "models"))

import llama_ref  # noqa: E402
import make_random_model  # noqa: E402
import make_testdata  # noqa: E402
import safetensors_io as st  # noqa: E402

def _load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:  # pragma: no cover
    HAVE_TORCH = False

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}

# (family, make_model kwargs) covering every feature.
FAMILY_CASES = [
    ("llama", dict(dtype="f32", hidden=32, heads=2, intermediate=64)),
    ("llama", dict(dtype="bf16", heads=4, kv_heads=2, head_dim=16, rope_scaling=LLAMA3_SCALING)),
    ("llama", dict(dtype="f16", heads=4, kv_heads=1, rope_scaling={"type": "linear", "factor": 2.0},
                   attention_bias=True, tied=True)),
    ("mistral", dict(dtype="f16", kv_heads=2, sliding_window=5, shards=2)),
    ("mistral", dict(dtype="f32", kv_heads=2, head_dim=24, sliding_window=4096)),
    ("qwen2", dict(dtype="bf16", kv_heads=2, tied=True)),
    ("qwen3", dict(dtype="f32", hidden=32, heads=4, kv_heads=2, head_dim=16, tied=True, intermediate=64)),
    ("qwen3", dict(dtype="bf16", heads=4, kv_heads=2, head_dim=8, attention_bias=True)),
]


class SafetensorsTest(unittest.TestCase):
    def test_bf16_rounding(self):
        x = np.array([1.0, -2.5, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.0e38, 1e-40, 0.0, -0.0, np.inf],
                     dtype=np.float32)
        bits = st.f32_to_bf16_bits(x)
        # 1+2^-8 is a tie between 1 and 1+2^-7: rounds to even (1.0); 1+3*2^-8 rounds up.
        self.assertEqual([hex(b) for b in bits[:4]], ["0x3f80", "0xc020", "0x3f80", "0x3f82"])
        self.assertEqual(st.bf16_bits_to_f32(bits)[-1], np.inf)
        self.assertTrue(np.isnan(st.bf16_bits_to_f32(st.f32_to_bf16_bits(np.array([np.nan], np.float32))))[0])
        if HAVE_TORCH:
            import torch
            r = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 10
            tb = torch.from_numpy(r).bfloat16().view(torch.int16).numpy().view(np.uint16)
            np.testing.assert_array_equal(st.f32_to_bf16_bits(r), tb)

    def test_roundtrip_single(self):
        rng = np.random.default_rng(1)
        a = rng.standard_normal((3, 5)).astype(np.float32)
        tensors = {"b.f32": (a, "F32"), "a.f16": (a, "F16"), "c.bf16": (a, "BF16"),
                   "d.scalar": (np.float32(2.0), "F32"), "e.i32": (np.arange(4), "I32")}
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "x.safetensors")
            st.save_file(tensors, p, {"format": "pt"})
            with open(p, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            self.assertEqual(n % 8, 0)
            self.assertEqual(header["__metadata__"], {"format": "pt"})
            self.assertEqual(header["a.f16"]["dtype"], "F16")
            raw, meta = st.load_file_raw(p)
            self.assertEqual(meta, {"format": "pt"})
            np.testing.assert_array_equal(raw["b.f32"].to_float(np.float32), a)
            np.testing.assert_array_equal(raw["a.f16"].array, a.astype(np.float16))
            np.testing.assert_array_equal(raw["c.bf16"].to_float(np.float32), st.round_to_dtype(a, "BF16"))
            self.assertEqual(raw["d.scalar"].shape, ())
            np.testing.assert_array_equal(raw["e.i32"].array, np.arange(4))
            # offsets are contiguous, in sorted name order
            ends = sorted((v["data_offsets"] for k, v in header.items() if k != "__metadata__"))
            self.assertEqual(ends[0][0], 0)
            for (_, e), (b, _) in zip(ends, ends[1:]):
                self.assertEqual(e, b)
            # re-serializing the raw tensors gives the same bytes
            self.assertEqual(st.serialize(raw, meta), _read_bytes(p))

    def test_sharded_dir(self):
        rng = np.random.default_rng(2)
        tensors = {"t%d" % i: (rng.standard_normal((4, i + 1)).astype(np.float32), "BF16") for i in range(7)}
        with tempfile.TemporaryDirectory() as d:
            files = st.save_model_dir(tensors, d, num_shards=2)
            self.assertEqual(files, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                     "model.safetensors.index.json"])
            index = _load_json(os.path.join(d, st.INDEX_NAME))
            self.assertEqual(set(index["weight_map"]), set(tensors))
            self.assertEqual(set(index["weight_map"].values()), set(files[:2]))
            self.assertEqual(index["metadata"]["total_size"], sum(4 * (i + 1) * 2 for i in range(7)))
            loaded = st.load_model_dir(d, np.float32)
            for k, (a, _) in tensors.items():
                np.testing.assert_array_equal(loaded[k], st.round_to_dtype(a, "BF16"))

    def test_bad_offsets_rejected(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "bad.safetensors")
            h = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
            with open(p, "wb") as f:
                f.write(struct.pack("<Q", len(h)) + h + b"\0" * 8)
            with self.assertRaises(ValueError):
                st.load_file_raw(p)


def _model(family, seed=3, **kw):
    d = tempfile.mkdtemp()
    cfg, _ = make_random_model.make_model(d, family, seed=seed, **kw)
    return d, cfg, llama_ref.Model.load(d)


class ReferenceTest(unittest.TestCase):
    def test_llama3_inv_freq_elementwise(self):
        # written out per element, straight from the Llama 3.1 reference code
        dim, theta = 16, 10000.0
        s = LLAMA3_SCALING
        got = llama_ref.rope_inv_freq(dim, theta, s)
        low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
        high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
        kinds = []
        for i in range(dim // 2):
            f = 1.0 / theta ** (2 * i / dim)
            wl = 2 * math.pi / f
            if wl < high_wl:
                want, k = f, "high"
            elif wl > low_wl:
                want, k = f / s["factor"], "low"
            else:
                sm = (s["original_max_position_embeddings"] / wl - s["low_freq_factor"]) / (
                    s["high_freq_factor"] - s["low_freq_factor"])
                want, k = (1 - sm) * f / s["factor"] + sm * f, "medium"
            kinds.append(k)
            self.assertAlmostEqual(got[i], want, places=15)
        self.assertEqual(kinds, ["high", "medium", "medium"] + ["low"] * 5)

    def test_linear_scaling_equals_scaled_positions(self):
        d, cfg, m = _model("llama", rope_scaling={"rope_type": "linear", "factor": 4.0})
        cfg2 = dict(cfg, rope_scaling=None)
        m2 = llama_ref.Model(llama_ref.Spec(cfg2), m.w)
        ids = [5, 9, 200, 3, 3, 17, 255, 0]
        np.testing.assert_allclose(m.logits(ids), m2.logits(ids, positions=np.arange(8) / 4.0), atol=1e-12)

    def test_rope_is_relative(self):
        for fam, kw in [("llama", {}), ("qwen3", dict(head_dim=24)), ("qwen2", dict(kv_heads=2))]:
            _, _, m = _model(fam, **kw)
            ids = [1, 50, 60, 70, 80, 90, 100]
            np.testing.assert_allclose(m.logits(ids), m.logits(ids, positions=np.arange(7) + 123),
                                       atol=1e-9, err_msg=fam)

    def test_causal_prefix(self):
        _, _, m = _model("qwen3", kv_heads=2, head_dim=24)
        ids = list(range(10, 30))
        full = m.logits(ids)
        for k in (1, 5, 19):
            np.testing.assert_allclose(m.logits(ids[:k]), full[:k], atol=1e-12)

    def test_gqa_equals_mha_with_repeated_kv(self):
        _, cfg, m = _model("llama", heads=4, kv_heads=2)
        cfg2 = dict(cfg, num_key_value_heads=4)
        w = dict(m.w)
        D = m.spec.head_dim
        for i in range(cfg["num_hidden_layers"]):
            for p in ("k_proj", "v_proj"):
                name = "model.layers.%d.self_attn.%s.weight" % (i, p)
                heads = w[name].reshape(2, D, -1)
                w[name] = np.repeat(heads, 2, axis=0).reshape(4 * D, -1)  # q head h -> kv head h // 2
        m2 = llama_ref.Model(llama_ref.Spec(cfg2), w)
        ids = [3, 1, 4, 1, 5, 9, 2, 6]
        np.testing.assert_allclose(m.logits(ids), m2.logits(ids), atol=1e-12)

    def test_sliding_window(self):
        _, cfg, m = _model("mistral", sliding_window=3)
        ids = list(range(40, 52))
        big = llama_ref.Model(llama_ref.Spec(dict(cfg, sliding_window=12)), m.w)
        none = llama_ref.Model(llama_ref.Spec(dict(cfg, sliding_window=None)), m.w)
        np.testing.assert_allclose(big.logits(ids), none.logits(ids), atol=1e-12)
        sw = m.logits(ids)
        np.testing.assert_allclose(sw[:3], none.logits(ids)[:3], atol=1e-12)  # window not yet binding
        self.assertGreater(np.abs(sw[3:] - none.logits(ids)[3:]).max(), 1e-3)
        # one layer: with window 3 the last position sees exactly the last 3 tokens
        cfg1 = dict(cfg, num_hidden_layers=1)
        w1 = {k: v for k, v in m.w.items() if not k.startswith("model.layers.1.")}
        m1 = llama_ref.Model(llama_ref.Spec(cfg1), w1)
        n1 = llama_ref.Model(llama_ref.Spec(dict(cfg1, sliding_window=None)), w1)
        np.testing.assert_allclose(m1.logits(ids)[-1], n1.logits(ids[-3:], positions=[9, 10, 11])[-1],
                                   atol=1e-12)

    def test_qwen_sliding_layers(self):
        spec = llama_ref.Spec(make_random_model.make_config("qwen2", layers=4, sliding_window=7))
        self.assertEqual(spec.layer_windows, [None] * 4)  # use_sliding_window false
        cfg = dict(make_random_model.make_config("qwen2", layers=4, sliding_window=7),
                   use_sliding_window=True, max_window_layers=2)
        self.assertEqual(llama_ref.Spec(cfg).layer_windows, [None, None, 7, 7])

    def test_missing_and_extra_tensors_rejected(self):
        d, cfg, m = _model("qwen2")
        w = dict(m.w)
        w.pop("model.layers.0.self_attn.q_proj.bias")
        with self.assertRaises(ValueError):
            llama_ref.Model(llama_ref.Spec(cfg), w)
        w = dict(m.w, **{"model.layers.0.self_attn.o_proj.bias": np.zeros(64)})
        with self.assertRaises(ValueError):
            llama_ref.Model(llama_ref.Spec(cfg), w)

    def test_dtypes_stored_exactly(self):
        for dt, st_dt in (("f16", "F16"), ("bf16", "BF16"), ("f32", "F32")):
            d, cfg, m = _model("llama", dtype=dt)
            raw = st.load_model_dir_raw(d)
            self.assertEqual({t.dtype for t in raw.values()}, {st_dt})
            ref = make_random_model.random_weights(cfg, 3)
            for k, v in ref.items():
                np.testing.assert_array_equal(m.w[k], st.round_to_dtype(v, st_dt).astype(np.float64))

    def test_cli(self):
        d, _, m = _model("qwen3", kv_heads=2, head_dim=8)
        with tempfile.TemporaryDirectory() as t:
            out = os.path.join(t, "l.bin")
            r = subprocess.run([sys.executable, os.path.join(HERE, "llama_ref.py"), "--model", d,
                                "--ids", "1,2,3", "--out", out], capture_output=True, text=True, check=True)
            self.assertIn("logits shape: [3, 256]", r.stdout)
            got = np.fromfile(out, dtype="<f4").reshape(3, 256)
            np.testing.assert_array_equal(got, m.logits([1, 2, 3]).astype(np.float32))


class TestdataTest(unittest.TestCase):
    def test_regenerates_identically(self):
        committed = os.path.join(REPO, "worker", "model", "testdata")
        if not os.path.isdir(committed):
            self.skipTest("worker/model/testdata not generated")
        with tempfile.TemporaryDirectory() as t:
            make_testdata.main(["--out", t])
            total = 0
            for v in make_testdata.VARIANTS:
                names = sorted(os.listdir(os.path.join(t, v)))
                self.assertEqual(names, sorted(os.listdir(os.path.join(committed, v))), v)
                for n in names:
                    a = _read_bytes(os.path.join(t, v, n))
                    self.assertEqual(a, _read_bytes(os.path.join(committed, v, n)), "%s/%s" % (v, n))
                    total += len(a)
            self.assertLess(total, 1000000)

    def test_reference_logits_match(self):
        committed = os.path.join(REPO, "worker", "model", "testdata")
        if not os.path.isdir(committed):
            self.skipTest("worker/model/testdata not generated")
        for v in make_testdata.VARIANTS:
            d = os.path.join(committed, v)
            ref = _load_json(os.path.join(d, "reference.json"))
            m = llama_ref.Model.load(d)
            lengths = []
            for c in ref["cases"]:
                got = np.fromfile(os.path.join(d, c["logits_file"]), dtype="<f4").reshape(c["shape"])
                np.testing.assert_array_equal(got, m.logits(c["ids"]).astype(np.float32))
                self.assertEqual(c["argmax"], [int(a) for a in got.argmax(-1)])
                lengths.append(len(c["ids"]))
            self.assertEqual(lengths, list(make_testdata.CASE_LENGTHS))


@unittest.skipUnless(HAVE_TORCH, "torch not installed")
class TorchCrossCheckTest(unittest.TestCase):
    def test_families_match_torch(self):
        import torch
        import torch_llama
        torch.set_num_threads(1)
        for fam, kw in FAMILY_CASES:
            d, cfg, m = _model(fam, seed=11, **kw)
            ids = np.random.default_rng(5).integers(0, 256, 23)
            tm = torch_llama.LlamaForCausalLM(cfg).double()
            tm.load_hf_state_dict({k: torch.from_numpy(v) for k, v in st.load_model_dir(d).items()})
            with torch.no_grad():
                tl = tm(torch.from_numpy(ids)[None])[0].numpy()
            np.testing.assert_allclose(m.logits(ids), tl, atol=1e-10, err_msg="%s %r" % (fam, kw))
            # torch state dict names are exactly the checkpoint names
            self.assertEqual(set(tm.hf_state_dict()), set(st.load_model_dir_raw(d)), fam)


if __name__ == "__main__":
    unittest.main()
