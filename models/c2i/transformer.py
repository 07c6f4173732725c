"""Pre-norm RMSNorm/SwiGLU transformer blocks of the class-conditional backbone, with a static KV cache.

Parameter names follow the official ImageNet checkpoints: `attention.wqkv` ([q; k; v] stacked, no bias),
`attention.wo`, `feed_forward.w1` (gate and up halves) / `w2`, `attention_norm`, `ffn_norm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.core.kv_cache import KVCache
from models.core.rope import apply_rope


def ffn_hidden_dim(dim: int, multiple_of: int = 256) -> int:
    """int(2 * 4 * dim / 3) rounded up to a multiple of 256."""
    hidden = int(2 * 4 * dim / 3)
    return -(-hidden // multiple_of) * multiple_of


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        if dim % n_head:
            raise ValueError(f"dim {dim} is not divisible by n_head {n_head}")
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
    ) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.wqkv(x).view(b, n, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, n, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        hidden = ffn_hidden_dim(dim)
        self.w1 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.attention = Attention(dim, n_head)
        self.feed_forward = FeedForward(dim)
        self.attention_norm = nn.RMSNorm(dim, eps=1e-6)
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer, start)
        return x + self.feed_forward(self.ffn_norm(x))
