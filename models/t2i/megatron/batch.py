"""Padding a packed T2I batch to a sequence length that sequence parallelism can split evenly over TP ranks."""

from __future__ import annotations

import torch

from models.t2i.packing import IGNORE_INDEX, PackedT2IBatch


def _remap(flat: torch.Tensor, length: int, new_length: int) -> torch.Tensor:
    return flat // length * new_length + flat % length


def pad_packed_batch(batch: PackedT2IBatch, multiple: int, pad_id: int) -> PackedT2IBatch:
    """`batch` with rows right-padded to a multiple of `multiple` positions (padding: document -1, its own causal
    blocks, no labels), flat indices remapped; the loss is unchanged. Returns `batch` itself when already aligned."""
    b, length = batch.input_ids.shape
    new_length = -(-length // multiple) * multiple
    extra = new_length - length
    if extra == 0:
        return batch

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t, t.new_full((b, extra), value)], dim=1)

    next_block = batch.block_ids.max(dim=1, keepdim=True).values + 1
    arange = torch.arange(extra, device=batch.block_ids.device)
    return PackedT2IBatch(
        input_ids=pad(batch.input_ids, pad_id),
        position_ids=pad(batch.position_ids, 0),
        doc_ids=pad(batch.doc_ids, -1),
        block_ids=torch.cat([batch.block_ids, next_block + arange], dim=1),
        text_labels=pad(batch.text_labels, IGNORE_INDEX),
        image_in_index=_remap(batch.image_in_index, length, new_length),
        image_in_bits=batch.image_in_bits,
        image_in_coords=batch.image_in_coords,
        target_index=_remap(batch.target_index, length, new_length),
        target_bits=batch.target_bits,
        target_coords=batch.target_coords,
        parallel_num=batch.parallel_num,
    )
