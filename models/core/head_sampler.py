"""Euler-Maruyama sampler of the binary diffusion head, with classifier-free guidance.

t grid = shift(linspace(0, 1 - last_step, N + 1)); x ~ N(0, I); each of the N steps turns the head's
x-prediction into a velocity v = (x_hat - x) / max(1 - t, 0.05), mixes v = v_u + w (v_c - v_u), and takes
x += (v + (1 - t) score) dt + sqrt(2 (1 - t) dt) eps with score = (t v - x) / (1 - t); a last deterministic
Euler step of `last_step` starts from t = 1 - last_step. All random draws come from one `torch.Generator`.
The conditional and unconditional rows go through the network in one batched call (`batched_cfg=True`) or
in two calls; both give the same numbers. The caller takes sign() of the result to get the bits.
A list of generators (one per row) makes every image's randomness independent of the batch it is in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.core.diffusion_head import shift_time, velocity

NetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | list[torch.Generator] | None


def randn_rows(shape: tuple[int, ...], device, generator: Generators) -> torch.Tensor:
    """N(0, 1) noise; with a list of generators row i is drawn from generator i alone, so an image's noise does
    not depend on which other images share its batch."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
        return torch.cat([torch.randn((1, *shape[1:]), device=device, generator=g) for g in generator])
    return torch.randn(shape, device=device, generator=generator, dtype=torch.float32)


def _guided_velocity(
    net: NetFn,
    x: torch.Tensor,
    t: float,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    cfg_scale: float,
    batched_cfg: bool,
) -> torch.Tensor:
    n = x.shape[0]
    if uncond is None or cfg_scale == 1.0:
        tt = torch.full((n,), t, device=x.device)
        return velocity(net(x.to(cond.dtype), tt, cond).float(), x, tt)
    tt = torch.full((2 * n,), t, device=x.device)
    xx = torch.cat([x, x]).to(cond.dtype)
    if batched_cfg:
        x_hat = net(xx, tt, torch.cat([cond, uncond])).float()
    else:
        x_hat = torch.cat([net(xx[:n], tt[:n], cond), net(xx[n:], tt[n:], uncond)]).float()
    v_c, v_u = velocity(x_hat, torch.cat([x, x]), tt).chunk(2)
    return v_u + cfg_scale * (v_c - v_u)


@torch.no_grad()
def euler_maruyama(
    net: NetFn,
    cond: torch.Tensor,
    ch_target: int,
    num_steps: int,
    cfg_scale: float = 1.0,
    uncond: torch.Tensor | None = None,
    time_shift: float = 1.0,
    generator: Generators = None,
    batched_cfg: bool = True,
    last_step: float = 0.05,
) -> torch.Tensor:
    """Sample continuous bits x [N, P, ch_target] for conditions cond [N, P, D] (uncond: same shape)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if uncond is not None and uncond.shape != cond.shape:
        raise ValueError(f"uncond shape {tuple(uncond.shape)} differs from cond shape {tuple(cond.shape)}")
    device = cond.device
    shape = (cond.shape[0], cond.shape[1], ch_target)
    x = randn_rows(shape, device, generator)
    grid = shift_time(torch.linspace(0, 1 - last_step, num_steps + 1, dtype=torch.float32), time_shift)
    ts, dts = grid[:-1].tolist(), (grid[1:] - grid[:-1]).tolist()
    for t, dt in zip(ts, dts, strict=True):
        v = _guided_velocity(net, x, t, cond, uncond, cfg_scale, batched_cfg)
        score = (t * v - x) / (1 - t)
        eps = randn_rows(shape, device, generator)
        x = x + (v + (1 - t) * score) * dt + (2 * (1 - t) * dt) ** 0.5 * eps
    v = _guided_velocity(net, x, 1 - last_step, cond, uncond, cfg_scale, batched_cfg)
    return x + v * last_step
