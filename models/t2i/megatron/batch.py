"""Padding packed T2I batches to one fixed sequence length: even TP splits, aligned FP8 GEMMs and FlexAttention blocks.

The megatron engine pads every micro-batch to `row_length(data.token_budget, tp, ...)`, so compiled attention kernels
see one shape (FlexAttention under `torch.compile(dynamic=False)` recompiles per new length) and pipeline stages
exchange activations of one shape without sending shapes first. Padding positions form document -1: they are
unlabelled, have no image targets and are masked from and to every real token, so the loss is unchanged. The T2I task
pads the same way for the DeepSpeed engine whenever the attention backend is flex (`row_length(budget, flex=True)`),
so compiled flex compiles once there too; `cluster.plan` sizes its layouts with the same `row_length`.
"""

from __future__ import annotations

import math

import torch

from models.t2i.packing import IGNORE_INDEX, PackedT2IBatch

FLEX_BLOCK = 128  # FlexAttention's block size: rows of whole blocks need no partial-block handling
FP8_TOKENS = 16  # Transformer Engine FP8 GEMMs need the token count per TP rank divisible by 16


def sequence_multiple(tp: int = 1, sequence_parallel: bool = False, fp8: bool = False, flex: bool = False) -> int:
    """What every row length must be a multiple of: tp under sequence parallelism (each TP rank holds length / tp
    positions), 16 positions per TP rank with FP8, 128 with FlexAttention."""
    ranks = tp if sequence_parallel else 1
    return math.lcm(ranks * (FP8_TOKENS if fp8 else 1), FLEX_BLOCK if flex else 1)


def fixed_length(token_budget: int, multiple: int) -> int:
    """The padded row length: the loader's token budget rounded up to `multiple`."""
    return -(-token_budget // multiple) * multiple


def row_length(
    token_budget: int, tp: int = 1, sequence_parallel: bool = False, fp8: bool = False, flex: bool = False
) -> int:
    """The fixed length every packed row is padded to: the token budget rounded up to `sequence_multiple`."""
    return fixed_length(token_budget, sequence_multiple(tp, sequence_parallel, fp8, flex))


def _remap(flat: torch.Tensor, length: int, new_length: int) -> torch.Tensor:
    return flat // length * new_length + flat % length


def pad_to_length(batch: PackedT2IBatch, new_length: int, pad_id: int) -> PackedT2IBatch:
    """`batch` with rows right-padded to `new_length` positions (padding: document -1, its own causal blocks, no
    labels), flat indices remapped; the loss is unchanged. Returns `batch` itself when already that long."""
    b, length = batch.input_ids.shape
    extra = new_length - length
    if extra < 0:
        raise ValueError(f"cannot pad a batch of {length} positions to {new_length}")
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


def pad_packed_batch(batch: PackedT2IBatch, multiple: int, pad_id: int) -> PackedT2IBatch:
    """`batch` with rows right-padded to the next multiple of `multiple` positions (see `pad_to_length`)."""
    return pad_to_length(batch, fixed_length(batch.input_ids.shape[1], multiple), pad_id)


def pad_to_rows(batch: PackedT2IBatch, rows: int, pad_id: int) -> PackedT2IBatch:
    """`batch` with rows of padding (document -1, a causal block per position, no labels, no targets) appended up to
    `rows` rows, so that every micro-batch of a schedule has one shape; flat indices are unchanged and so is the loss.
    Returns `batch` itself when it already has that many rows."""
    b, length = batch.input_ids.shape
    extra = rows - b
    if extra < 0:
        raise ValueError(f"cannot pad a batch of {b} rows to {rows}")
    if extra == 0:
        return batch

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t, t.new_full((extra, length), value)])

    blocks = torch.arange(length, device=batch.block_ids.device).expand(extra, length)
    return PackedT2IBatch(
        input_ids=pad(batch.input_ids, pad_id),
        position_ids=pad(batch.position_ids, 0),
        doc_ids=pad(batch.doc_ids, -1),
        block_ids=torch.cat([batch.block_ids, blocks]),
        text_labels=pad(batch.text_labels, IGNORE_INDEX),
        image_in_index=batch.image_in_index,
        image_in_bits=batch.image_in_bits,
        image_in_coords=batch.image_in_coords,
        target_index=batch.target_index,
        target_bits=batch.target_bits,
        target_coords=batch.target_coords,
        parallel_num=batch.parallel_num,
    )
