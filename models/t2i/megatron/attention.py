"""Packed block-causal attention inside megatron's SelfAttention: the mask metadata tensor and the core kernel.

megatron's `SelfAttention` hands its core attention q, k, v as [s, b, heads, d] (this TP rank's heads, full
sequence even under sequence parallelism) plus whatever the model passed as `attention_mask`. That has to be a
tensor: with activation recompute megatron's checkpoint saves the layer inputs with `save_for_backward`. So the
model passes `block_causal_mask(doc_ids, block_ids, backend)`, the document and block ids stacked into one int64
tensor [2, B, L], and the kernel's mask (dense boolean, per-document segments or FlexAttention BlockMask) is built
once per forward of a stage, when that tensor is made, and carried on it as the attribute `kernel_mask`; every
layer of the stage reads it from there. Recompute hands the layers a detached copy (a new tensor object over the
same memory), which finds the original through a registry keyed by memory address and shape: the registry holds
only weak references, so an entry lives exactly as long as the original tensor (which megatron's checkpoint keeps
alive until the backward that recomputes from it), and a freed address cannot be mistaken for a live one. Every
pipeline stage builds its own mask from the batch it reads, so nothing mask-related travels between stages.
"""

from __future__ import annotations

import weakref

import torch
from megatron.core.transformer.module import MegatronModule

from models.core.attention import AttentionMask, attend, build_mask

_LIVE: dict[tuple, weakref.ref] = {}  # memory key of a live mask-metadata tensor -> that tensor


def _key(meta: torch.Tensor) -> tuple:
    return (meta.device, meta.data_ptr(), tuple(meta.shape), meta.stride(), meta.dtype)


def _register(meta: torch.Tensor, mask: AttentionMask) -> None:
    meta.kernel_mask = mask
    key = _key(meta)

    def forget(ref: weakref.ref) -> None:
        if _LIVE.get(key) is ref:  # a later tensor at the same address may have taken the slot over
            del _LIVE[key]

    _LIVE[key] = weakref.ref(meta, forget)


def block_causal_mask(doc_ids: torch.Tensor, block_ids: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The `attention_mask` a stage passes to its layers: doc/block ids [B, L] stacked into [2, B, L] (int64), with
    the kernel's mask for `backend` built now, once (the mask holds `doc_ids` / `block_ids`, never this tensor)."""
    meta = torch.stack([doc_ids, block_ids]).long()
    _register(meta, build_mask(doc_ids, block_ids, backend))
    return meta


def kernel_mask(meta: torch.Tensor, backend: str) -> AttentionMask:
    """The mask built for `meta` (or for the tensor `meta` is a detached copy of); built here only if neither lives."""
    mask = getattr(meta, "kernel_mask", None)
    if mask is not None:
        return mask
    ref = _LIVE.get(_key(meta))
    owner = ref() if ref is not None else None
    if owner is not None:
        return owner.kernel_mask
    doc_ids, block_ids = meta.clone()  # a clone, so that the mask does not keep `meta` alive through a view
    _register(meta, build_mask(doc_ids, block_ids, backend))
    return meta.kernel_mask


class BlockCausalCoreAttention(MegatronModule):
    """Core attention for `SelfAttentionSubmodules(core_attention=...)`: GQA over a `block_causal_mask` tensor."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        cp_comm_type=None,
        softmax_scale: float | None = None,
        pg_collection=None,
        backend: str = "auto",
    ):
        """`backend` (`models.core.attention.ATTENTION_BACKENDS`) builds the mask if a layer ever gets metadata
        whose mask was not built by `block_causal_mask`."""
        super().__init__(config=config)
        if softmax_scale is not None:
            raise ValueError("BlockCausalCoreAttention uses the 1/sqrt(head_dim) scale; leave softmax_scale unset")
        if config.context_parallel_size > 1:
            raise ValueError("BlockCausalCoreAttention has no context parallelism; set context_parallel_size=1")
        self.layer_number, self.backend = layer_number, backend

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ) -> torch.Tensor:
        """q [s, b, Hq, d], k/v [s, b, Hkv, d] -> [s, b, Hq * d]."""
        s, b = query.shape[:2]
        if not (
            isinstance(attention_mask, torch.Tensor)
            and attention_mask.dtype == torch.long
            and tuple(attention_mask.shape) == (2, b, s)
        ):
            got = (
                f"{attention_mask.dtype} {tuple(attention_mask.shape)}"
                if isinstance(attention_mask, torch.Tensor)
                else type(attention_mask).__name__
            )
            raise TypeError(
                f"attention_mask must be the int64 [2, {b}, {s}] doc/block ids of block_causal_mask, got {got}"
            )
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("BlockCausalCoreAttention takes neither attention_bias nor packed_seq_params")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = attend(q, k, v, kernel_mask(attention_mask, self.backend))
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
