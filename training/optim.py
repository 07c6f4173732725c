"""AdamW with the official parameter grouping, and the warmup + constant/cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import OptimConfig, ScheduleConfig

# Parameter-name fragments trained without weight decay (besides every norm weight and bias): embeddings,
# the learned query tokens and the bit projector / connector, as in the official recipes.
NO_DECAY_NAMES = ("embedding", "embed_tokens", "pos_for_diff", "query_token", "proj_in", "projector")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    norm_types = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
    norm_params = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or id(p) in norm_params or any(k in name for k in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_at(step: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """Linear warmup from 0, then constant or cosine down to min_lr at total_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return base_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (base_lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
