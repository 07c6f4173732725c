"""Attention kernels behind one call: dense-mask SDPA (exact reference), the same per document run ("segments":
exact, and the fast path on CPU for packed rows), or FlexAttention with a BlockMask (GPU).

Masks come from per-position document ids and block ids (`block_ids` never decrease along a row): a query may
attend a key of the same document whose block id is not larger than its own. Causal tokens each have their own
block id; the P positions of one next-patch block share one. Padding has document id -1.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

ATTENTION_BACKENDS = ("auto", "dense", "segments", "flex")  # auto: flex on CUDA, segments otherwise


@dataclass(frozen=True)
class SegmentMask:
    """Per row, the runs of equal document id as (start, end, dense block-causal mask [1, 1, n, n]): attention
    never crosses documents, so each run is attended on its own; the cost is sum(n^2) instead of L^2 per row."""

    rows: tuple[tuple[tuple[int, int, torch.Tensor], ...], ...]


AttentionMask = torch.Tensor | BlockMask | SegmentMask


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


def segment_block_causal_mask(doc_ids: torch.Tensor, block_ids: torch.Tensor) -> SegmentMask | torch.Tensor:
    """The mask split by document runs; the full dense mask when a document id occurs in two separate runs."""
    rows = []
    for b in range(doc_ids.shape[0]):
        d = doc_ids[b]
        bounds = [0, *(torch.nonzero(d[1:] != d[:-1]).flatten() + 1).tolist(), d.numel()]
        runs = list(zip(bounds[:-1], bounds[1:], strict=True))
        if len({int(d[s]) for s, _ in runs}) != len(runs):
            return dense_block_causal_mask(doc_ids, block_ids)
        rows.append(
            tuple((s, e, dense_block_causal_mask(doc_ids[b : b + 1, s:e], block_ids[b : b + 1, s:e])) for s, e in runs)
        )
    return SegmentMask(tuple(rows))


def resolve_attention(backend: str, cuda: bool) -> str:
    """The backend `backend` names on a CUDA (`cuda`) or CPU device: "auto" is flex on CUDA, segments elsewhere."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    if backend == "auto":
        return "flex" if cuda else "segments"
    return backend


def build_mask(doc_ids: torch.Tensor, block_ids: torch.Tensor, backend: str) -> AttentionMask:
    backend = resolve_attention(backend, doc_ids.is_cuda)
    if backend == "flex":
        return flex_block_causal_mask(doc_ids, block_ids)
    if backend == "dense":
        return dense_block_causal_mask(doc_ids, block_ids)
    return segment_block_causal_mask(doc_ids, block_ids)


_cpu_compile_backend: str | None = None  # set by compile_flex_on_cpu


def compile_flex_on_cpu(backend: str | None) -> None:
    """Run CPU FlexAttention through the compiled path GPUs take (`torch.compile(flex_attention, dynamic=False)`,
    one compilation per shape) with dynamo `backend`: "inductor" needs a C++ compiler, "eager" only traces (enough to
    count compilations, e.g. in tests); None: back to uncompiled CPU flex."""
    global _cpu_compile_backend
    _cpu_compile_backend = backend


@functools.cache
def _compiled_flex(backend: str = "inductor"):
    return torch.compile(flex_attention, dynamic=False, backend=backend)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """q [B, Hq, Lq, d], k/v [B, Hkv, Lk, d] (grouped-query when Hkv < Hq) -> [B, Hq, Lq, d]."""
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, BlockMask):
        if q.is_cuda or _cpu_compile_backend is not None:
            backend = "inductor" if q.is_cuda else _cpu_compile_backend
            return _compiled_flex(backend)(q, k, v, block_mask=mask, enable_gqa=gqa)
        with warnings.catch_warnings():  # eager CPU flex is the unfused reference implementation; fine for tests
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    if isinstance(mask, SegmentMask):
        if q.shape[2] != k.shape[2]:
            raise ValueError("a SegmentMask is for full-sequence attention (queries = keys); use a dense mask")
        rows = [
            torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e], attn_mask=m, enable_gqa=gqa
                    )
                    for s, e, m in segments
                ],
                dim=2,
            )
            for b, segments in enumerate(mask.rows)
        ]
        return torch.cat(rows, dim=0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
