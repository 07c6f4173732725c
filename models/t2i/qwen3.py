"""Qwen3 decoder in plain PyTorch with Hugging Face parameter names (`model.*`, `lm_head.*`).

GQA attention with per-head RMSNorm on q and k, 1D RoPE (rotate-half convention) over explicit position ids,
SwiGLU MLP, RMSNorm eps 1e-6, untied LM head. The attention mask is any `models.core.attention.AttentionMask`, so
packed block-causal sequences and KV-cache decoding use the same layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from models.core.attention import AttentionMask, attend
from models.core.kv_cache import KVCache


@dataclass
class Qwen3Config:
    """The fields of a Hugging Face Qwen3 `config.json` that define the network."""

    vocab_size: int = 151936
    hidden_size: int = 5120
    intermediate_size: int = 17408
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.tie_word_embeddings:
            raise ValueError("BitDance uses Qwen3 with an untied LM head (tie_word_embeddings must be false)")

    @classmethod
    def from_hf_dict(cls, d: dict) -> Qwen3Config:
        if d.get("model_type", "qwen3") != "qwen3":
            raise ValueError(f"config.json has model_type {d.get('model_type')!r}; a Qwen3 backbone is required")
        rope = d.get("rope_parameters") or {}
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        if "rope_theta" not in d and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        return cls(**values)

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict:
        d = asdict(self)
        d.update(
            architectures=["Qwen3ForCausalLM"],
            model_type="qwen3",
            hidden_act="silu",
            attention_dropout=0.0,
            initializer_range=0.02,
            use_cache=True,
            use_sliding_window=False,
            sliding_window=None,
            rope_scaling=None,
            torch_dtype=torch_dtype,
        )
        return d


QWEN3_CONFIGS: dict[str, Qwen3Config] = {
    "14B": Qwen3Config(),
    "tiny": Qwen3Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
    ),
}


def get_qwen3_config(name: str, **overrides) -> Qwen3Config:
    if name not in QWEN3_CONFIGS:
        raise ValueError(f"unknown Qwen3 config {name!r}; known: {sorted(QWEN3_CONFIGS)}")
    return replace(QWEN3_CONFIGS[name], **overrides)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, L, head_dim] in fp32 for positions [B, L]: angles pos / theta^(2i/d), duplicated halves."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [B, H, L, d] with cos/sin [B, L, d], computed in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).type_as(x)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        hd = cfg.head_dim
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * hd, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask: AttentionMask, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, n, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, L, D]; with `cache`, inputs sit at cache columns [start, start + L)."""
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, start)
        return self.norm(x)


class Qwen3ForCausalLM(nn.Module):
    """Backbone (`model`) plus the untied `lm_head`."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for m in self.modules():  # Hugging Face's initialisation: N(0, 0.02), norms at 1
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        c = self.cfg
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, max_len, p.device, p.dtype)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """Logits [B, L, vocab] for token ids [B, L]."""
        return self.lm_head(self.model(self.model.embed_tokens(input_ids), position_ids, mask))
