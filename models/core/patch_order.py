"""Next-patch geometry: patch-raster token order and the block-causal attention mask.

A grid of h x w tokens is cut into p x p patches (P = p*p tokens each); patches go in raster order and the
tokens inside a patch in raster order too. One AR step predicts one whole patch.
"""

from __future__ import annotations

import math

import torch


def patch_side(parallel_num: int, h: int, w: int) -> int:
    """Side p of a patch of P = p*p tokens; a one-line error when P is not square or does not tile the grid."""
    p = math.isqrt(parallel_num) if parallel_num > 0 else 0
    if parallel_num < 1 or p * p != parallel_num:
        raise ValueError(f"parallel_num P={parallel_num} must be a square number (1, 4, 16, 64, ...)")
    if h % p or w % p:
        raise ValueError(
            f"token grid {h}x{w} is not divisible by the patch side sqrt(P)={p}; pick P whose root divides both"
        )
    return p


def patch_raster_index(h: int, w: int, parallel_num: int) -> torch.Tensor:
    """perm[s] = raster index (row * w + col) of the token at patch-raster position s."""
    p = patch_side(parallel_num, h, w)
    raster = torch.arange(h * w).view(h // p, p, w // p, p)
    return raster.permute(0, 2, 1, 3).reshape(-1)


def to_patch_raster(grid: torch.Tensor, parallel_num: int) -> torch.Tensor:
    """[B, C, h, w] latent grid -> [B, h*w, C] tokens in patch-raster order."""
    b, c, h, w = grid.shape
    perm = patch_raster_index(h, w, parallel_num).to(grid.device)
    return grid.flatten(2).transpose(1, 2)[:, perm]


def from_patch_raster(tokens: torch.Tensor, parallel_num: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `to_patch_raster`: [B, h*w, C] -> [B, C, h, w]."""
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"got {n} tokens for a {h}x{w} grid")
    perm = patch_raster_index(h, w, parallel_num).to(tokens.device)
    raster = torch.empty_like(tokens)
    raster[:, perm] = tokens
    return raster.transpose(1, 2).reshape(b, c, h, w)


def block_ids(seq_len: int, causal_len: int, block: int, device: torch.device | None = None) -> torch.Tensor:
    """Block index of each position: positions < causal_len are their own block, then blocks of `block`."""
    if (seq_len - causal_len) % block:
        raise ValueError(f"{seq_len - causal_len} block positions do not split into blocks of {block}")
    pos = torch.arange(seq_len, device=device)
    return torch.where(pos < causal_len, pos, causal_len + (pos - causal_len).div(block, rounding_mode="floor"))


def block_causal_mask(seq_len: int, causal_len: int, block: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool [seq_len, seq_len], True = may attend: causal over the first `causal_len` positions, then blocks of
    `block` positions that see each other fully and every earlier position."""
    ids = block_ids(seq_len, causal_len, block, device)
    return ids[None, :] <= ids[:, None]
