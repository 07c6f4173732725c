"""Activation checkpointing applied from outside the model: wraps every backbone and head block.

Uses torch's `checkpoint_wrapper`, whose state-dict hooks keep parameter names unchanged, so checkpoints and
official-layout exports are the same with and without it. On megatron chunks only the diffusion head is handled here
(`recompute_head`; the backbone recomputes through megatron's own `recompute_granularity`), without a wrapper module.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.checkpoint import checkpoint

from models.c2i.model import ClassConditionalBitDance
from models.t2i.model import TextToImageBitDance


def _wrap_all(blocks: nn.ModuleList) -> int:
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return len(blocks)


def apply_activation_checkpointing(model: nn.Module, backbone: bool = True, head: bool = True) -> int:
    """Recompute block activations in backward; returns the number of wrapped blocks."""
    if isinstance(model, TextToImageBitDance):
        parts = [(backbone, model.llm.model.layers), (head, model.vision_head.net.res_blocks)]
    elif isinstance(model, ClassConditionalBitDance):
        parts = [(backbone, model.layers), (head, model.head.net.res_blocks)]
    else:
        raise TypeError(f"activation checkpointing does not know {type(model).__name__}")
    return sum(_wrap_all(blocks) for enabled, blocks in parts if enabled)


def recompute_head(chunk: nn.Module) -> int:
    """Recompute the diffusion head's block activations in backward on a megatron last-stage chunk (one with a
    `vision_head`); returns the number of blocks. Each block's forward becomes a non-reentrant `checkpoint` of itself
    instead of a `checkpoint_wrapper` module, so parameter names (optimizer groups, EMA keys) stay the same with and
    without recompute; calling it again changes nothing."""
    blocks = chunk.vision_head.net.res_blocks
    for block in blocks:
        if "forward" not in vars(block):  # not yet recomputed
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return len(blocks)
