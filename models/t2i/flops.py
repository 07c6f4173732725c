"""Model FLOPs of a text-to-image training step: the formula the training loop logs (its MFU), the planner's step
time and the GPU check use.

6 x (matmul weights a token passes through) per token (backbone layers on every real position, projector on image
inputs, LM head on labelled text, diffusion head on its targets) plus attention over the (query, key) pairs the
block-causal mask allows (12 x heads x head_dim per pair, forward and backward); embeddings and norms are not counted,
nor is padding.
"""

from __future__ import annotations

import torch

from models.t2i.model import T2IConfig
from models.t2i.packing import IGNORE_INDEX, PackedT2IBatch


def mask_pairs(doc_ids: torch.Tensor, block_ids: torch.Tensor) -> int:
    """(query, key) pairs the block-causal mask allows between real positions (doc id >= 0): same document, key block
    <= query block. Linear time: documents and blocks are contiguous runs and block ids never decrease inside a
    document, so a query sees its document from its start up to the end of the query's own block."""
    _, length = doc_ids.shape
    idx = torch.arange(length, device=doc_ids.device).expand_as(doc_ids)
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    new_run = new_doc.clone()
    new_run[:, 1:] |= block_ids[:, 1:] != block_ids[:, :-1]
    doc_start = torch.cummax(torch.where(new_doc, idx, 0), dim=1).values
    last_of_run = torch.ones_like(new_run)
    last_of_run[:, :-1] = new_run[:, 1:]
    run_end = torch.where(last_of_run, idx + 1, length).flip(1).cummin(dim=1).values.flip(1)
    return int(((run_end - doc_start) * (doc_ids >= 0)).sum())


def t2i_linear_params(cfg: T2IConfig) -> dict[str, int]:
    """Matmul weights each token passes through, per component: `backbone` (all layers, every position), `lm_head`
    (labelled text), `projector` (image inputs), `head_token` (diffusion targets), `head_patch` (the head's timestep
    MLP, once per patch)."""
    m, h = cfg.llm, cfg.head
    d, q, kv = m.hidden_size, m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    layer = d * q + 2 * d * kv + q * d + 3 * d * m.intermediate_size
    w, hidden = h.ch_latent, int(h.ch_latent * 1.5)
    mlp = 3 * w * hidden if h.use_swiglu else 2 * w * hidden
    head_token = (
        h.ch_target * w
        + h.ch_cond * w
        + h.depth_adanln * 6 * w * w
        + h.depth_latent * (4 * w * w + mlp)
        + 2 * w * w
        + w * h.ch_target
    )
    return dict(
        backbone=m.num_hidden_layers * layer,
        lm_head=d * m.vocab_size,
        projector=cfg.latent_dim * d + d * d,
        head_token=head_token,
        head_patch=256 * w + w * w,
    )


def t2i_batch_flops(cfg: T2IConfig, batch: PackedT2IBatch, pairs: int | None = None) -> dict[str, int]:
    """Model FLOPs of one forward+backward over `batch`: `dense`, `attention`, `total`, and the counts they use."""
    m, h, P = cfg.llm, cfg.head, cfg.parallel_num
    pairs = mask_pairs(batch.doc_ids, batch.block_ids) if pairs is None else pairs
    n = dict(
        positions=int((batch.doc_ids >= 0).sum()),
        text=int((batch.text_labels != IGNORE_INDEX).sum()),
        image_in=batch.image_in_index.numel(),
        targets=batch.target_index.numel() * h.diff_batch_mul,
    )
    lp = t2i_linear_params(cfg)
    dense = 6 * (
        lp["backbone"] * n["positions"]
        + lp["lm_head"] * n["text"]
        + lp["projector"] * n["image_in"]
        + lp["head_token"] * n["targets"]
        + lp["head_patch"] * n["targets"] // P
    )
    attention = (
        12 * m.num_hidden_layers * m.num_attention_heads * m.head_dim * pairs
        + 12 * h.depth_latent * h.ch_latent * n["targets"] * P
    )
    return dict(dense=dense, attention=attention, total=dense + attention, pairs=pairs, **n)
