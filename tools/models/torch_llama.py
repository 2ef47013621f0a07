"""A small torch implementation of the HF Llama-family causal LM (torch >= 1.13, no transformers).

Parameter names equal the Hugging Face checkpoint names (model.embed_tokens.weight,
model.layers.N.self_attn.q_proj.weight, ..., lm_head.weight), so state_dict() can be written as a
HF safetensors checkpoint directly (drop lm_head.weight when tied).  Used to train the strata-tiny
models, and as a second, independently written implementation to check tools/reference/llama_ref.py.

Config is a HF config.json dict; supports llama (rope_scaling llama3 / linear, attention_bias),
mistral (sliding_window), qwen2 (q/k/v bias), qwen3 (q_norm/k_norm, head_dim).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _family(cfg):
    arch = (cfg.get("architectures") or [""])[0]
    return {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
            "Qwen3ForCausalLM": "qwen3"}.get(arch, cfg.get("model_type"))


def inv_freq_from_config(cfg, head_dim, dtype=torch.float64):
    theta = float(cfg.get("rope_theta", 10000.0))
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    sc = cfg.get("rope_scaling")
    if not sc:
        return inv
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        out = []
        for f in inv.tolist():
            wl = 2 * math.pi / f
            if wl < old / hi:
                out.append(f)
            elif wl > old / lo:
                out.append(f / factor)
            else:
                s = (old / wl - lo) / (hi - lo)
                out.append((1 - s) * f / factor + s * f)
        return torch.tensor(out, dtype=dtype)
    raise ValueError("unsupported rope scaling %r" % kind)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        fam = _family(cfg)
        H = cfg["hidden_size"]
        self.nh = cfg["num_attention_heads"]
        self.nkv = cfg.get("num_key_value_heads") or self.nh
        self.hd = cfg.get("head_dim") or H // self.nh
        if fam == "qwen2":
            qkv_bias, o_bias = True, False
        elif fam in ("llama", "qwen3"):
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        else:
            qkv_bias = o_bias = False
        self.q_proj = nn.Linear(H, self.nh * self.hd, bias=qkv_bias)
        self.k_proj = nn.Linear(H, self.nkv * self.hd, bias=qkv_bias)
        self.v_proj = nn.Linear(H, self.nkv * self.hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, H, bias=o_bias)
        self.qk_norm = fam == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.get("rms_norm_eps", 1e-6))
            self.k_norm = RMSNorm(self.hd, cfg.get("rms_norm_eps", 1e-6))
        self.window = None
        sw = cfg.get("sliding_window")
        if fam == "mistral" and sw is not None:
            self.window = sw
        if fam in ("qwen2", "qwen3") and cfg.get("use_sliding_window") and sw is not None:
            if layer_idx >= cfg.get("max_window_layers", 28):
                self.window = sw

    @staticmethod
    def _rope(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = self._rope(q.transpose(1, 2), cos, sin)
        k = self._rope(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if self.nkv != self.nh:
            rep = self.nh // self.nkv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.hd))
        i = torch.arange(T, device=x.device)
        mask = i[None, :] <= i[:, None]
        if self.window is not None:
            mask = mask & ((i[:, None] - i[None, :]) < self.window)
        att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, I = cfg["hidden_size"], cfg["intermediate_size"]
        b = bool(cfg.get("mlp_bias", False)) and _family(cfg) == "llama"
        self.gate_proj = nn.Linear(H, I, bias=b)
        self.up_proj = nn.Linear(H, I, bias=b)
        self.down_proj = nn.Linear(I, H, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, idx):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = Attention(cfg, idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg["num_hidden_layers"])])
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        self.register_buffer("inv_freq", inv_freq_from_config(cfg, hd), persistent=False)

    def rope(self, T, dtype, device):
        pos = torch.arange(T, dtype=torch.float64, device=device)
        ang = pos[:, None] * self.inv_freq.to(device)[None, :]
        emb = torch.cat((ang, ang), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, ids):
        """ids: [B, T] int64 -> logits [B, T, vocab]."""
        x = self.model.embed_tokens(ids)
        cos, sin = self.rope(ids.shape[1], x.dtype, x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def hf_state_dict(self):
        """{HF name: tensor}; lm_head.weight dropped when tied."""
        sd = {k: v for k, v in self.state_dict().items() if k != "inv_freq"}
        if self.tied:
            sd.pop("lm_head.weight", None)
        return sd

    def load_hf_state_dict(self, tensors):
        """tensors: {HF name: array or tensor}; strict."""
        sd = {}
        for k, v in tensors.items():
            if k.endswith("rotary_emb.inv_freq"):
                continue
            sd[k] = torch.as_tensor(v)
        if self.tied:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        own = self.state_dict()
        missing = set(own) - set(sd) - {"inv_freq"}
        extra = set(sd) - set(own)
        if missing or extra:
            raise ValueError("state dict mismatch: missing %s extra %s" % (sorted(missing), sorted(extra)))
        with torch.no_grad():
            for k, v in sd.items():
                own[k].copy_(v.to(own[k].dtype))
