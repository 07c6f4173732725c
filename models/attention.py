"""Attention kernels behind one call: dense-mask SDPA (exact; CPU and tests) or FlexAttention with a BlockMask.

Masks come from per-position document ids and block ids (`block_ids` never decrease along a row): a query may
attend a key of the same document whose block id is not larger than its own. Causal tokens each have their own
block id; the P positions of one next-patch block share one. Padding has document id -1.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

AttentionMask = torch.Tensor | BlockMask
ATTENTION_BACKENDS = ("auto", "dense", "flex")


def dense_block_causal_mask(doc_q, blk_q, doc_k=None, blk_k=None) -> torch.Tensor:
    """Bool [B, 1, Lq, Lk] from document/block ids [B, Lq] (and [B, Lk] for keys; defaults to the queries)."""
    doc_k = doc_q if doc_k is None else doc_k
    blk_k = blk_q if blk_k is None else blk_k
    same_doc = doc_q[:, :, None] == doc_k[:, None, :]
    return (same_doc & (blk_k[:, None, :] <= blk_q[:, :, None]))[:, None]


def flex_block_causal_mask(doc_ids: torch.Tensor, block_ids: torch.Tensor) -> BlockMask:
    """The same mask as a FlexAttention BlockMask, built once per batch (compiled on GPU)."""

    def mask_mod(b, h, q, k):
        return (doc_ids[b, q] == doc_ids[b, k]) & (block_ids[b, k] <= block_ids[b, q])

    b, length = doc_ids.shape
    return create_block_mask(
        mask_mod, B=b, H=None, Q_LEN=length, KV_LEN=length, device=doc_ids.device, _compile=doc_ids.is_cuda
    )


def build_mask(doc_ids: torch.Tensor, block_ids: torch.Tensor, backend: str) -> AttentionMask:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    if backend == "flex" or (backend == "auto" and doc_ids.is_cuda):
        return flex_block_causal_mask(doc_ids, block_ids)
    return dense_block_causal_mask(doc_ids, block_ids)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """q [B, Hq, Lq, d], k/v [B, Hkv, Lk, d] (grouped-query when Hkv < Hq) -> [B, Hq, Lq, d]."""
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, BlockMask):
        if q.is_cuda:
            return _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=gqa)
        with warnings.catch_warnings():  # eager CPU flex is the unfused reference implementation; fine for tests
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
