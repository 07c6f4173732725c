"""Packed block-causal attention inside megatron's SelfAttention: the per-batch mask metadata and the core kernel.

megatron's `SelfAttention` hands its core attention q, k, v as [s, b, heads, d] (this TP rank's heads, full
sequence even under sequence parallelism) plus whatever the model passed as `attention_mask`. We pass a
`BlockCausalMask`: the document and block ids of the batch, from which the dense boolean mask or the FlexAttention
BlockMask is built once per forward and shared by every layer of the stage. Every pipeline stage builds its own
from the batch it reads, so nothing mask-related travels between stages.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from models.core.attention import AttentionMask, attend, build_mask


class BlockCausalMask:
    """Document/block ids [B, L] of a packed batch; `get()` builds the kernel's mask on first use and caches it."""

    def __init__(self, doc_ids: torch.Tensor, block_ids: torch.Tensor, backend: str = "auto"):
        self.doc_ids, self.block_ids, self.backend = doc_ids, block_ids, backend
        self._mask: AttentionMask | None = None

    def get(self) -> AttentionMask:
        if self._mask is None:
            self._mask = build_mask(self.doc_ids, self.block_ids, self.backend)
        return self._mask


class BlockCausalCoreAttention(MegatronModule):
    """Core attention for `SelfAttentionSubmodules(core_attention=...)`: GQA over a `BlockCausalMask`."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        cp_comm_type=None,
        softmax_scale: float | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if softmax_scale is not None:
            raise ValueError("BlockCausalCoreAttention uses the 1/sqrt(head_dim) scale; leave softmax_scale unset")
        if config.context_parallel_size > 1:
            raise ValueError("BlockCausalCoreAttention has no context parallelism; set context_parallel_size=1")
        self.layer_number = layer_number

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ) -> torch.Tensor:
        """q [s, b, Hq, d], k/v [s, b, Hkv, d] -> [s, b, Hq * d]."""
        if not isinstance(attention_mask, BlockCausalMask):
            raise TypeError(f"expected a BlockCausalMask as attention_mask, got {type(attention_mask).__name__}")
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("BlockCausalCoreAttention takes neither attention_bias nor packed_seq_params")
        s, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = attend(q, k, v, attention_mask.get())
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
