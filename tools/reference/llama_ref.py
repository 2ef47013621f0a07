#!/usr/bin/env python3
"""Independent float64 numpy forward pass for Hugging Face Llama-family causal LMs.

Written from the Hugging Face transformers model definitions (modeling_llama, modeling_mistral,
modeling_qwen2, modeling_qwen3); numpy only, no torch.

Supported: LlamaForCausalLM (Llama 2 / 3, rope_scaling "llama3" and "linear", optional
attention_bias / mlp_bias / head_dim), MistralForCausalLM (sliding_window), Qwen2ForCausalLM (q/k/v
bias, optional per-layer sliding window), Qwen3ForCausalLM (per-head q_norm/k_norm before RoPE,
explicit head_dim), GQA, tied or untied embeddings, SiLU gated MLP.

Math, per decoder layer (HF pre-norm residual layout):
    h   = x + o_proj(Attn(input_layernorm(x)))
    out = h + down_proj(silu(gate_proj(n)) * up_proj(n)),  n = post_attention_layernorm(h)
    RMSNorm(x) = weight * x / sqrt(mean(x^2) + rms_norm_eps)
Attention: q/k/v = Linear(x) (+bias), reshaped to [heads, T, head_dim]; Qwen3 applies RMSNorm over
head_dim (weights q_norm / k_norm, shape [head_dim]) to every q/k head *before* RoPE.  RoPE is the
HF "rotate_half" (non-interleaved) form: inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2;
angle = pos * inv_freq; cos/sin are tiled twice ([f, f]) across head_dim;
    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1].
Scores = q k^T / sqrt(head_dim), causal mask (key j visible to query i iff j <= i, and with a
sliding window W also i - j < W), softmax, @ v; KV head for query head h is h // (heads / kv_heads).
Logits = lm_head(norm(x)), lm_head = embed_tokens when tie_word_embeddings.

CLI:  llama_ref.py --model DIR --ids 1,2,3 [--out logits.bin]
writes float32 little-endian logits [num_tokens, vocab_size] and prints the shape.
      llama_ref.py --model DIR --text "def f(" [--generate 20]
tokenizes with DIR/tokenizer.json (tools/reference/hf_tokenizer.py, needs python3-regex; special
tokens added as the post_processor says) and optionally continues greedily (argmax, float64),
stopping at eos_token_id.
"""

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402

ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class Spec:
    """Normalized model hyperparameters from a HF config.json dict."""

    def __init__(self, cfg):
        archs = cfg.get("architectures") or []
        family = None
        for a in archs:
            if a in ARCHS:
                family = ARCHS[a]
                break
        if family is None:
            family = cfg.get("model_type")
        if family not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError("unsupported architecture %r / model_type %r" % (archs, cfg.get("model_type")))
        self.family = family
        self.vocab_size = int(cfg["vocab_size"])
        self.hidden_size = int(cfg["hidden_size"])
        self.intermediate_size = int(cfg["intermediate_size"])
        self.num_layers = int(cfg["num_hidden_layers"])
        self.num_heads = int(cfg["num_attention_heads"])
        kv = cfg.get("num_key_value_heads")
        self.num_kv_heads = int(kv) if kv is not None else self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        # HF: getattr(config, "head_dim", None) or hidden_size // num_attention_heads
        self.head_dim = int(cfg.get("head_dim") or self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        self.rms_norm_eps = float(cfg.get("rms_norm_eps", 1e-6))
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError("unsupported hidden_act %r" % act)
        # Every one of these configs defaults tie_word_embeddings to False.
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        self.max_position_embeddings = int(cfg.get("max_position_embeddings", 2048))

        # Biases.
        if family == "llama":
            self.qkv_bias = self.o_bias = bool(cfg.get("attention_bias", False))
            self.mlp_bias = bool(cfg.get("mlp_bias", False))
        elif family == "mistral":
            self.qkv_bias = self.o_bias = False
            self.mlp_bias = False
        elif family == "qwen2":
            self.qkv_bias, self.o_bias, self.mlp_bias = True, False, False
        else:  # qwen3
            self.qkv_bias = self.o_bias = bool(cfg.get("attention_bias", False))
            self.mlp_bias = False
        self.qk_norm = family == "qwen3"

        # Sliding window per layer (None = full causal attention).
        sw = cfg.get("sliding_window")
        self.layer_windows = [None] * self.num_layers
        if family == "mistral":
            if sw is not None:
                self.layer_windows = [int(sw)] * self.num_layers
        elif family in ("qwen2", "qwen3"):
            layer_types = cfg.get("layer_types")
            use_sw = bool(cfg.get("use_sliding_window", False))
            if layer_types is None:
                mwl = int(cfg.get("max_window_layers", 28))
                layer_types = ["sliding_attention" if (use_sw and sw is not None and i >= mwl)
                               else "full_attention" for i in range(self.num_layers)]
            for i, t in enumerate(layer_types):
                if t == "sliding_attention" and use_sw and sw is not None:
                    self.layer_windows[i] = int(sw)
        elif family == "llama":
            pass  # Llama has no sliding window.

        # RoPE.
        rope_params = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        self.rope_theta = float(theta)
        scaling = cfg.get("rope_scaling")
        if scaling is None and rope_params:
            scaling = rope_params
        self.rope_scaling = dict(scaling) if scaling else None
        prf = cfg.get("partial_rotary_factor", 1.0)
        if prf not in (None, 1, 1.0):
            raise ValueError("partial_rotary_factor != 1 is not supported")
        self.inv_freq = rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)

    def n_rep(self):
        return self.num_heads // self.num_kv_heads


def rope_inv_freq(head_dim, theta, scaling):
    """inverse frequencies (float64, length head_dim/2), per transformers.modeling_rope_utils."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not scaling:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        # positions / factor  ==  inv_freq / factor
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context_len = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2.0 * math.pi / inv_freq
        # long wavelengths (low frequency): divide by factor; short: unchanged
        inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        # in between: interpolate with smooth = (old_ctx / wavelen - low) / (high - low)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1.0 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, smoothed, inv_freq_llama)
    raise ValueError("unsupported rope_scaling type %r" % rope_type)


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def expected_tensor_names(spec):
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not spec.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(spec.num_layers):
        p = "model.layers.%d." % i
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(p + "self_attn.%s.weight" % proj)
        if spec.qkv_bias:
            names += [p + "self_attn.%s.bias" % x for x in ("q_proj", "k_proj", "v_proj")]
        if spec.o_bias:
            names.append(p + "self_attn.o_proj.bias")
        if spec.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.append(p + "mlp.%s.weight" % proj)
            if spec.mlp_bias:
                names.append(p + "mlp.%s.bias" % proj)
    return names


def expected_shapes(spec):
    H, I, V, D = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.head_dim
    qd, kvd = spec.num_heads * D, spec.num_kv_heads * D
    shapes = {}
    for n in expected_tensor_names(spec):
        leaf = n.split(".")[-2] + "." + n.split(".")[-1]
        if n in ("model.embed_tokens.weight", "lm_head.weight"):
            s = (V, H)
        elif n == "model.norm.weight" or leaf in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            s = (H,)
        else:
            s = {"q_proj.weight": (qd, H), "k_proj.weight": (kvd, H), "v_proj.weight": (kvd, H),
                 "o_proj.weight": (H, qd), "q_proj.bias": (qd,), "k_proj.bias": (kvd,),
                 "v_proj.bias": (kvd,), "o_proj.bias": (H,), "q_norm.weight": (D,), "k_norm.weight": (D,),
                 "gate_proj.weight": (I, H), "up_proj.weight": (I, H), "down_proj.weight": (H, I),
                 "gate_proj.bias": (I,), "up_proj.bias": (I,), "down_proj.bias": (H,)}[leaf]
        shapes[n] = s
    return shapes


def check_weights(spec, weights):
    shapes = expected_shapes(spec)
    missing = [n for n in shapes if n not in weights]
    if missing:
        raise ValueError("missing tensors: %s" % missing[:10])
    allowed = set(shapes) | {"lm_head.weight"}
    extra = [n for n in weights if n not in allowed and not n.endswith("rotary_emb.inv_freq")]
    if extra:
        raise ValueError("unexpected tensors: %s" % sorted(extra)[:10])
    for n, s in shapes.items():
        if tuple(weights[n].shape) != s:
            raise ValueError("%s: shape %s, expected %s" % (n, weights[n].shape, s))


class Model:
    def __init__(self, spec, weights):
        check_weights(spec, weights)
        self.spec = spec
        self.w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
        if spec.tie_word_embeddings:
            self.lm_head = self.w["model.embed_tokens.weight"]
        else:
            self.lm_head = self.w["lm_head.weight"]

    @classmethod
    def load(cls, model_dir):
        spec = Spec(load_config(model_dir))
        return cls(spec, safetensors_io.load_model_dir(model_dir, np.float64))

    # --- building blocks -------------------------------------------------
    def _rms(self, x, weight):
        var = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(var + self.spec.rms_norm_eps) * weight

    def _linear(self, x, name):
        y = x @ self.w[name + ".weight"].T
        b = self.w.get(name + ".bias")
        return y + b if b is not None else y

    def rope_cos_sin(self, positions):
        ang = np.asarray(positions, dtype=np.float64)[:, None] * self.spec.inv_freq[None, :]
        emb = np.concatenate([ang, ang], axis=-1)  # [T, head_dim]
        return np.cos(emb), np.sin(emb)

    @staticmethod
    def _apply_rope(x, cos, sin):
        # x: [heads, T, D]
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos[None] + rot * sin[None]

    def _attention(self, layer, x, cos, sin, positions, trace):
        s = self.spec
        p = "model.layers.%d.self_attn." % layer
        T = x.shape[0]
        D = s.head_dim
        q = self._linear(x, p + "q_proj").reshape(T, s.num_heads, D)
        k = self._linear(x, p + "k_proj").reshape(T, s.num_kv_heads, D)
        v = self._linear(x, p + "v_proj").reshape(T, s.num_kv_heads, D)
        if s.qk_norm:
            q = self._rms(q, self.w[p + "q_norm.weight"])
            k = self._rms(k, self.w[p + "k_norm.weight"])
        q = self._apply_rope(q.transpose(1, 0, 2), cos, sin)  # [Hq, T, D]
        k = self._apply_rope(k.transpose(1, 0, 2), cos, sin)  # [Hkv, T, D]
        v = v.transpose(1, 0, 2)
        if trace is not None:
            trace["layer%d.q_rope" % layer] = q
            trace["layer%d.k_rope" % layer] = k
            trace["layer%d.v" % layer] = v
        rep = s.n_rep()
        k = np.repeat(k, rep, axis=0)  # head h uses kv head h // rep
        v = np.repeat(v, rep, axis=0)
        scores = (q @ k.transpose(0, 2, 1)) / math.sqrt(D)  # [Hq, T, T]
        pos = np.asarray(positions)
        allowed = pos[None, :] <= pos[:, None]
        window = s.layer_windows[layer]
        if window is not None:
            allowed &= (pos[:, None] - pos[None, :]) < window
        scores = np.where(allowed[None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = (probs @ v).transpose(1, 0, 2).reshape(T, s.num_heads * D)
        return self._linear(out, p + "o_proj")

    def _mlp(self, layer, x):
        p = "model.layers.%d.mlp." % layer
        g = self._linear(x, p + "gate_proj")
        u = self._linear(x, p + "up_proj")
        silu = g / (1.0 + np.exp(-g))
        return self._linear(silu * u, p + "down_proj")

    # --- forward ----------------------------------------------------------
    def hidden_states(self, ids, positions=None, trace=None):
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("ids must be a non-empty 1-D sequence")
        if ids.min() < 0 or ids.max() >= self.spec.vocab_size:
            raise ValueError("token id out of range [0, %d)" % self.spec.vocab_size)
        if positions is None:
            positions = np.arange(ids.size)
        positions = np.asarray(positions)  # ints normally; any real numbers work for RoPE
        cos, sin = self.rope_cos_sin(positions)
        x = self.w["model.embed_tokens.weight"][ids]
        if trace is not None:
            trace["embed"] = x
        for i in range(self.spec.num_layers):
            p = "model.layers.%d." % i
            h = x + self._attention(i, self._rms(x, self.w[p + "input_layernorm.weight"]), cos, sin,
                                    positions, trace)
            x = h + self._mlp(i, self._rms(h, self.w[p + "post_attention_layernorm.weight"]))
            if trace is not None:
                trace["layer%d.attn_residual" % i] = h
                trace["layer%d.out" % i] = x
        x = self._rms(x, self.w["model.norm.weight"])
        if trace is not None:
            trace["final_norm"] = x
        return x

    def logits(self, ids, positions=None, trace=None):
        """float64 logits [len(ids), vocab_size]."""
        return self.hidden_states(ids, positions, trace) @ self.lm_head.T


def log_softmax(logits):
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory (config.json + safetensors)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help="comma-separated token ids")
    src.add_argument("--text", help="text to tokenize with the model's tokenizer.json")
    ap.add_argument("--no-special-tokens", action="store_true", help="with --text: add no bos")
    ap.add_argument("--generate", type=int, default=0, help="greedy-decode this many tokens")
    ap.add_argument("--out", help="write float32 little-endian logits [num_tokens, vocab] here")
    ap.add_argument("--top", type=int, default=5, help="print the top-N tokens of the last position")
    args = ap.parse_args(argv)
    tok = None
    if args.text is not None:
        import hf_tokenizer
        tok = hf_tokenizer.Tokenizer.load(os.path.join(args.model, "tokenizer.json"))
        ids = tok.encode(args.text, add_special_tokens=not args.no_special_tokens)
        print("ids: %s" % ",".join(str(i) for i in ids))
    else:
        ids = [int(t) for t in args.ids.replace(" ", "").split(",") if t != ""]
    model = Model.load(args.model)
    logits = model.logits(ids)
    if args.generate > 0:
        eos = load_config(args.model).get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        out = []
        cur = list(ids)
        for _ in range(args.generate):
            nxt = int(np.argmax(model.logits(cur)[-1]))
            out.append(nxt)
            cur.append(nxt)
            if nxt in eos:
                break
        print("generated ids: %s" % ",".join(str(i) for i in out))
        if tok is not None:
            print("generated text: %r" % tok.decode(out))
    print("logits shape: [%d, %d]" % logits.shape)
    if args.top > 0:
        last = logits[-1]
        top = np.argsort(-last, kind="stable")[: args.top]
        print("last position top-%d: %s" % (args.top, ", ".join("%d:%.6f" % (t, last[t]) for t in top)))
    if args.out:
        logits.astype("<f4").tofile(args.out)
        print("wrote %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
