"""Next-patch sampling of the class-conditional model: KV cache, batched CFG rows, linear/constant CFG schedules.

Step 0 runs the class prefix and the P - 1 query tokens; step i > 0 feeds patch i - 1 and predicts patch i.
The unconditional rows (null class) always see the same image tokens as the conditional rows. With
`batched_cfg` both row sets go through the backbone and the head in one batched call; otherwise in two.
"""

from __future__ import annotations

import torch

from models.c2i.model import ClassConditionalBitDance
from models.core.head_sampler import euler_maruyama
from models.core.patch_order import from_patch_raster

CFG_SCHEDULES = ("linear", "constant")


def cfg_at_step(cfg_scale: float, schedule: str, step: int, num_ar_steps: int) -> float:
    """Guidance weight of AR step `step`: linear grows from 1 at step 0 towards w; constant is w."""
    if cfg_scale <= 1.0:
        return 1.0
    if schedule == "constant":
        return cfg_scale
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * step / num_ar_steps
    raise ValueError(f"unknown cfg_schedule {schedule!r}; choose one of {CFG_SCHEDULES}")


def to_bits(x: torch.Tensor) -> torch.Tensor:
    """sign() of the head output as ±1 (an exact 0 maps to -1, like the tokenizer's quantizer)."""
    return torch.where(x > 0, 1.0, -1.0).to(x.dtype)


@torch.no_grad()
def sample_class_conditional(
    model: ClassConditionalBitDance,
    labels: torch.Tensor,
    num_steps: int = 50,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "linear",
    generator: torch.Generator | list[torch.Generator] | None = None,
    batched_cfg: bool = True,
) -> torch.Tensor:
    """Generate ±1 latent grids [B, C, h, w] for class ids `labels` [B]; decode them with the tokenizer."""
    cfg_at_step(cfg_scale, cfg_schedule, 0, 1)  # validates the schedule name up front
    c = model.cfg
    if labels.dim() != 1 or ((labels < 0) | (labels >= c.num_classes)).any():
        raise ValueError(f"labels must be a 1-D tensor of class ids in [0, {c.num_classes})")
    model.eval()
    P, b = c.parallel_num, labels.shape[0]
    n_steps = c.grid * c.grid // P
    guided = cfg_scale > 1.0
    rows = [labels]
    if guided:
        rows.append(torch.full_like(labels, c.num_classes))
    if batched_cfg or not guided:
        rows = [torch.cat(rows)]
    caches = [model.new_cache(r.shape[0]) for r in rows]
    inputs = [model.prefix_embeddings(r) for r in rows]
    start, patches = 0, []
    for step in range(n_steps):
        hidden = [model.run_backbone(x, start, cache) for x, cache in zip(inputs, caches, strict=True)]
        start += inputs[0].shape[1]
        pos = model.pos_for_diff.weight[step * P : (step + 1) * P]
        cond_all = torch.cat([h[:, -P:] for h in hidden]) + pos
        cond, uncond = (cond_all[:b], cond_all[b:]) if guided else (cond_all, None)
        x = euler_maruyama(
            model.head.net,
            cond,
            c.latent_dim,
            num_steps,
            cfg_at_step(cfg_scale, cfg_schedule, step, n_steps),
            uncond,
            c.time_shift,
            generator,
            batched_cfg,
        )
        bits = to_bits(x).to(cond.dtype)
        patches.append(bits)
        emb = model.proj_in(bits)
        inputs = [emb.repeat(r.shape[0] // b, 1, 1) for r in rows]
    return from_patch_raster(torch.cat(patches, dim=1), P, c.grid, c.grid)
