"""The next-patch sampling loop both model families share: prefill, then per AR step guided head sampling, sign to
bits, and the bits fed back; a family only supplies a decoder (its KV-cache prefill and step).

Rows: the n conditional rows come first, then (when guidance is on) n unconditional rows. `cfg_row_sets` splits
them into the row sets a family decodes in one forward each (one set when `batched_cfg`, else two; both give the
same numbers) and `RowSetDecoder` stacks those sets into one decoder.

Guidance as in the official samplers: at a step whose guidance weight is exactly 1 (step 0 of the linear
schedule) there is no guidance at all - every one of the 2n rows draws its own noise and samples its own patch,
and each unconditional row keeps its own patch as context. At every other step the conditional and
unconditional rows share one noise draw and one guided sample, which both rows are fed.

With `SamplingConfig.compile` the family pads its conditions to a row bucket (`pad_conditions`) and decodes at
fixed shapes; the head runs as `models.core.compiled_sampling.FixedShapeHead`, drawing the same noise.

Progress: while `PATCH_DONE` holds a callback (a context variable: per thread and task), the loop calls it with
(patches done, patches per image) after the prefill (0) and after every patch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from models.core.bits import sign_quantize
from models.core.compiled_sampling import FixedShapeHead, row_bucket
from models.core.head_sampler import Generators, NetFn, euler_maruyama
from models.core.sampling import SamplingConfig, cfg_at_step

Row = TypeVar("Row")
PATCH_DONE: ContextVar[Callable[[int, int], None] | None] = ContextVar("next_patch_progress", default=None)


class RowDecoder(Protocol):
    """KV-cache state of R rows that go through the backbone together; R is a multiple of the image count n."""

    def prefill(self) -> torch.Tensor:
        """Run the prefix once; head conditions [R, P, D] of patch 0."""
        ...

    def step(self, bits: torch.Tensor) -> torch.Tensor:
        """Feed the ±1 bits of the last patch: [R, P, C] (one per row), or [n, P, C] given to every row of each
        image (row i gets image i % n); conditions [R, P, D] of the next patch."""
        ...


class NextPatchDecoder(RowDecoder, Protocol):
    """A RowDecoder over all rows of one sampling call, with the head that turns conditions into bits."""

    head_net: NetFn  # the diffusion head's x-prediction network
    latent_dim: int  # bits per token C
    time_shift: float  # the head's time-grid shift
    num_ar_steps: int  # next-patch steps: tokens per image // P


def cfg_row_sets(cond_rows: Sequence[Row], uncond_row: Row, sampling: SamplingConfig) -> list[list[Row]]:
    """The row sets to decode: the conditional rows, plus one unconditional row per image when guided, as one
    set (`batched_cfg`) or two."""
    rows = list(cond_rows)
    if not sampling.guided:
        return [rows]
    uncond = [uncond_row] * len(rows)
    return [rows + uncond] if sampling.batched_cfg else [rows, uncond]


def pad_conditions(conds: Sequence[Row], sampling: SamplingConfig) -> list[Row]:
    """The image conditions a family decodes: under `compile`, padded to `row_bucket` images by repeating the last
    (the padded images are dropped); else as given."""
    conds = list(conds)
    return conds + conds[-1:] * (row_bucket(len(conds)) - len(conds)) if sampling.compile else conds


@dataclass
class RowSetDecoder:
    """Row sets decoded one forward each, stacked in order into one NextPatchDecoder."""

    row_sets: list[RowDecoder]
    head_net: NetFn
    latent_dim: int
    time_shift: float
    num_ar_steps: int

    def __post_init__(self) -> None:
        self.set_rows: list[int] = []  # rows of each set, known after prefill

    def prefill(self) -> torch.Tensor:
        conds = [d.prefill() for d in self.row_sets]
        self.set_rows = [c.shape[0] for c in conds]
        return torch.cat(conds)

    def step(self, bits: torch.Tensor) -> torch.Tensor:
        if bits.shape[0] == sum(self.set_rows):  # one patch per row: each set gets its own rows
            return torch.cat([d.step(b) for d, b in zip(self.row_sets, bits.split(self.set_rows), strict=True)])
        return torch.cat([d.step(bits) for d in self.row_sets])


HeadFn = Callable[[torch.Tensor, torch.Tensor | None, float, Generators], torch.Tensor]


def _head_sampler(decoder: NextPatchDecoder, sampling: SamplingConfig, n_images: int, n_pad: int, device) -> HeadFn:
    """head(cond, uncond, w, generator) -> x: the eager `euler_maruyama`, or the fixed-shape one under `compile`."""
    if sampling.compile:
        return FixedShapeHead(
            decoder.head_net,
            decoder.latent_dim,
            sampling.steps,
            decoder.time_shift,
            sampling.batched_cfg,
            n_images,
            n_pad,
            device,
        )

    def eager(cond: torch.Tensor, uncond: torch.Tensor | None, w: float, generator: Generators) -> torch.Tensor:
        net, c, steps, shift = decoder.head_net, decoder.latent_dim, sampling.steps, decoder.time_shift
        return euler_maruyama(net, cond, c, steps, w, uncond, shift, generator, sampling.batched_cfg)

    return eager


@torch.no_grad()
def sample_next_patch(
    decoder: NextPatchDecoder,
    n_images: int,
    sampling: SamplingConfig,
    generator: Generators = None,
) -> torch.Tensor:
    """±1 bits [n_images, num_ar_steps * P, C] in patch-raster order (patch k is columns k*P .. k*P + P - 1). Under
    `sampling.compile` the decoder holds the rows of `pad_conditions` (row_bucket(n_images) images)."""
    cfg_at_step(sampling.cfg_scale, sampling.cfg_schedule, 0, 1)  # a bad schedule fails before any forward
    n_pad = row_bucket(n_images) if sampling.compile else n_images
    rows = 2 * n_pad if sampling.guided else n_pad
    conds = decoder.prefill()
    if conds.shape[0] != rows:
        raise ValueError(f"decoder gave {conds.shape[0]} condition rows for {n_images} images; expected {rows}")
    head = _head_sampler(decoder, sampling, n_images, n_pad, conds.device)
    n_steps, patches = decoder.num_ar_steps, []
    report = PATCH_DONE.get() or (lambda done, total: None)
    report(0, n_steps)
    for step in range(n_steps):
        w = cfg_at_step(sampling.cfg_scale, sampling.cfg_schedule, step, n_steps)
        if sampling.guided and w == 1.0:  # unguided step: all 2n rows sample independently
            g = generator + generator if isinstance(generator, list) else generator  # row n + i: image i's stream
            x = head(conds, None, 1.0, g)
        else:
            cond, uncond = (conds[:n_pad], conds[n_pad:]) if sampling.guided else (conds, None)
            x = head(cond, uncond, w, generator)
        bits = sign_quantize(x).to(conds.dtype)
        patches.append(bits[:n_images])
        report(step + 1, n_steps)
        if step + 1 < n_steps:
            conds = decoder.step(bits)
    return torch.cat(patches, dim=1)
