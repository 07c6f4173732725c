"""Euler-Maruyama sampler of the binary diffusion head, with classifier-free guidance.

t grid = shift(linspace(0, 1 - last_step, N + 1)); x ~ N(0, I); each of the N steps turns the head's
x-prediction into a velocity v = (x_hat - x) / max(1 - t, 0.05), mixes v = v_u + w (v_c - v_u), and takes
x += (v + (1 - t) score) dt + sqrt(2 (1 - t) dt) eps with score = (t v - x) / (1 - t); a last deterministic
Euler step of `last_step` starts from t = 1 - last_step. All random draws come from one `torch.Generator`.
The conditional and unconditional rows go through the network in one batched call (`batched_cfg=True`) or
in two calls; both give the same numbers. The caller takes sign() of the result to get the bits.
A list of generators (one per row) makes every image's randomness independent of the batch it is in.

`euler_maruyama` draws as it goes. The fixed-shape form for torch.compile (`models.core.compiled_sampling`)
splits the same work in two: `em_noise` draws the N + 1 noises up front, in the same order from the same
generators, and `em_coefficients` holds the per-step scalars as tensors; `euler_maruyama_loop` (all steps as one
`torch.while_loop`) or `em_step` / `em_last` (one step each) then do pure tensor work without draws or host syncs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.core.diffusion_head import shift_time, velocity

NetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | list[torch.Generator] | None
Scalar = float | torch.Tensor  # a Python number (eager) or a 0-d tensor (compiled: no recompile when it changes)


def randn_rows(shape: tuple[int, ...], device, generator: Generators) -> torch.Tensor:
    """N(0, 1) noise; with a list of generators row i is drawn from generator i alone, so an image's noise does
    not depend on which other images share its batch."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
        return torch.cat([torch.randn((1, *shape[1:]), device=device, generator=g) for g in generator])
    return torch.randn(shape, device=device, generator=generator, dtype=torch.float32)


def _times(t: Scalar, rows: int, device) -> torch.Tensor:
    return t.expand(rows) if isinstance(t, torch.Tensor) else torch.full((rows,), t, device=device)


def _guided_velocity(
    net: NetFn,
    x: torch.Tensor,
    t: Scalar,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    cfg_scale: Scalar,
    batched_cfg: bool,
) -> torch.Tensor:
    """v at time t; `uncond` None: no guidance."""
    n = x.shape[0]
    if uncond is None:
        tt = _times(t, n, x.device)
        return velocity(net(x.to(cond.dtype), tt, cond).float(), x, tt)
    tt = _times(t, 2 * n, x.device)
    xx = torch.cat([x, x]).to(cond.dtype)
    if batched_cfg:
        x_hat = net(xx, tt, torch.cat([cond, uncond])).float()
    else:
        x_hat = torch.cat([net(xx[:n], tt[:n], cond), net(xx[n:], tt[n:], uncond)]).float()
    v_c, v_u = velocity(x_hat, torch.cat([x, x]), tt).chunk(2)
    return v_u + cfg_scale * (v_c - v_u)


def _em_update(x, v, t: Scalar, one_minus_t: Scalar, dt: Scalar, noise_scale: Scalar, eps) -> torch.Tensor:
    score = (t * v - x) / one_minus_t
    return x + (v + one_minus_t * score) * dt + noise_scale * eps


def _time_grid(num_steps: int, time_shift: float, last_step: float) -> tuple[list[float], list[float]]:
    grid = shift_time(torch.linspace(0, 1 - last_step, num_steps + 1, dtype=torch.float32), time_shift)
    return grid[:-1].tolist(), (grid[1:] - grid[:-1]).tolist()


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
    if cfg_scale == 1.0:
        uncond = None
    device = cond.device
    shape = (cond.shape[0], cond.shape[1], ch_target)
    x = randn_rows(shape, device, generator)
    for t, dt in zip(*_time_grid(num_steps, time_shift, last_step), strict=True):
        v = _guided_velocity(net, x, t, cond, uncond, cfg_scale, batched_cfg)
        eps = randn_rows(shape, device, generator)
        x = _em_update(x, v, t, 1 - t, dt, (2 * (1 - t) * dt) ** 0.5, eps)
    v = _guided_velocity(net, x, 1 - last_step, cond, uncond, cfg_scale, batched_cfg)
    return x + v * last_step


# ---- the same sampler at fixed shapes, for torch.compile (models.core.compiled_sampling) ---------------------------


def em_coefficients(num_steps: int, time_shift: float = 1.0, last_step: float = 0.05) -> torch.Tensor:
    """fp32 [N + 1, 4]: per step (t, 1 - t, dt, sqrt(2 (1 - t) dt)) as `euler_maruyama` rounds them (the scalars are
    computed in double, then cast), and a last row (1 - last_step, last_step, last_step, 0) for the final step."""
    ts, dts = _time_grid(num_steps, time_shift, last_step)
    rows = [[t, 1 - t, dt, (2 * (1 - t) * dt) ** 0.5] for t, dt in zip(ts, dts, strict=True)]
    rows.append([1 - last_step, last_step, last_step, 0.0])
    return torch.tensor(rows, dtype=torch.float32)


def em_noise(
    shape: tuple[int, ...], device, generator: Generators, num_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x at t = 0 [*shape], the step noises [N, *shape]): the draws `euler_maruyama` makes, in its order."""
    x0 = randn_rows(shape, device, generator)
    return x0, torch.stack([randn_rows(shape, device, generator) for _ in range(num_steps)])


def _split(conds: torch.Tensor, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return conds.chunk(2) if guided else (conds, None)


def em_step(net: NetFn, x, coef, eps, conds, guided: bool, cfg_scale, batched_cfg: bool = True) -> torch.Tensor:
    """One stochastic step from `em_coefficients` row `coef` [4] with noise eps [N, P, C]; conds [N, P, D] or, when
    `guided`, the conditional then the unconditional rows [2N, P, D] (one tensor: compiled inputs may not alias);
    cfg_scale a 0-d tensor."""
    t, one_minus_t, dt, noise_scale = coef.unbind()
    v = _guided_velocity(net, x, t, *_split(conds, guided), cfg_scale, batched_cfg)
    return _em_update(x, v, t, one_minus_t, dt, noise_scale, eps)


def em_last(net: NetFn, x, coef, conds, guided: bool, cfg_scale, batched_cfg: bool = True) -> torch.Tensor:
    """The last deterministic Euler step, from the last `em_coefficients` row."""
    t, _, dt, _ = coef.unbind()
    return x + _guided_velocity(net, x, t, *_split(conds, guided), cfg_scale, batched_cfg) * dt


def euler_maruyama_loop(
    net: NetFn, x0, eps, coef, conds, guided: bool, cfg_scale, batched_cfg: bool = True
) -> torch.Tensor:
    """`euler_maruyama` over pre-drawn noise (`em_noise`: x0 [N, P, C], eps [S, N, P, C]) and `em_coefficients`
    [S + 1, 4]: the S stochastic steps run as one `torch.while_loop`, so a compiled graph has one copy of the step
    whatever S is, then the last step. No random draws, no host syncs. Arguments as in `em_step`."""

    def go_on(i, x):
        return i < eps.shape[0]

    def step(i, x):
        at = i.view(1)  # index_select, not [i]: indexing by a tensor would read it on the host
        c, e = coef.index_select(0, at)[0], eps.index_select(0, at)[0]
        return i + 1, em_step(net, x, c, e, conds, guided, cfg_scale, batched_cfg)

    start = torch.zeros((), dtype=torch.long, device=x0.device)
    _, x = torch.while_loop(go_on, step, (start, x0.clone()))  # a carried input may not alias a captured one
    return em_last(net, x, coef[-1], conds, guided, cfg_scale, batched_cfg)
