"""Preallocated per-layer keys and values for incremental (KV-cache) decoding, shared by every backbone."""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys/values of every layer for incremental decoding: [B, H, max_len, d] per layer."""

    def __init__(self, n_layer: int, batch: int, n_head: int, head_dim: int, max_len: int, device, dtype):
        shape = (batch, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len

    def update(
        self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, H, L, d] of `layer` and return the keys/values to attend. `start` an int: columns
        [start, start + L), returning columns [0, start + L). `start` a LongTensor [L] of columns (fixed-shape
        decoding under torch.compile): those columns, returning the whole buffers, whose columns not written yet
        the caller's attention mask hides; the shapes never change, so one compiled graph serves every step."""
        if isinstance(start, torch.Tensor):
            self.k[layer].index_copy_(2, start, k)
            self.v[layer].index_copy_(2, start, v)
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
