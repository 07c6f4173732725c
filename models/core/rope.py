"""Rotary position embeddings: the 2D RoPE of the class-conditional backbone."""

from __future__ import annotations

import torch


def rope_2d_angles(h: int, w: int, head_dim: int, prefix_len: int, base: float = 10000.0) -> torch.Tensor:
    """Angles [prefix_len + h*w, head_dim/2] in raster order: pairs 0..k-1 turn by x f_j, pairs k..2k-1 by
    y f_j, with k = head_dim/4, f_j = 1/base^(2j/(head_dim/2)), x = col + 1.5, y = row + 1.5; prefix = 0."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    k = head_dim // 4
    freqs = 1.0 / base ** (torch.arange(k, dtype=torch.float32) * 2 / (head_dim // 2))
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    x = cols.reshape(-1).float() + 1.5
    y = rows.reshape(-1).float() + 1.5
    image = torch.cat([x[:, None] * freqs, y[:, None] * freqs], dim=1)
    return torch.cat([torch.zeros(prefix_len, 2 * k), image])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of x [B, L, H, d] by angles with cos/sin [L, d/2]; computed in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2).type_as(x)
