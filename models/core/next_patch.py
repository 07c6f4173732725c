"""The next-patch sampling loop both model families share: prefill, then per AR step guided head sampling, sign to
bits, and the bits fed back; a family only supplies a decoder (its KV-cache prefill and step).

Rows: the n conditional rows come first, then (when guidance is on) n unconditional rows. `cfg_row_sets` splits
them into the row sets a family decodes in one forward each (one set when `batched_cfg`, else two; both give the
same numbers) and `RowSetDecoder` stacks those sets into one decoder.

Guidance as in the official samplers: at a step whose guidance weight is exactly 1 (step 0 of the linear
schedule) there is no guidance at all - every one of the 2n rows draws its own noise and samples its own patch,
and each unconditional row keeps its own patch as context. At every other step the conditional and
unconditional rows share one noise draw and one guided sample, which both rows are fed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from models.core.bits import sign_quantize
from models.core.head_sampler import Generators, NetFn, euler_maruyama
from models.core.sampling import SamplingConfig, cfg_at_step

Row = TypeVar("Row")


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


@torch.no_grad()
def sample_next_patch(
    decoder: NextPatchDecoder,
    n_images: int,
    sampling: SamplingConfig,
    generator: Generators = None,
) -> torch.Tensor:
    """±1 bits [n_images, num_ar_steps * P, C] in patch-raster order (patch k is columns k*P .. k*P + P - 1)."""
    cfg_at_step(sampling.cfg_scale, sampling.cfg_schedule, 0, 1)  # a bad schedule fails before any forward
    rows = 2 * n_images if sampling.guided else n_images
    conds = decoder.prefill()
    if conds.shape[0] != rows:
        raise ValueError(f"decoder gave {conds.shape[0]} condition rows for {n_images} images; expected {rows}")
    n_steps, patches = decoder.num_ar_steps, []
    for step in range(n_steps):
        w = cfg_at_step(sampling.cfg_scale, sampling.cfg_schedule, step, n_steps)
        if sampling.guided and w == 1.0:  # unguided step: all 2n rows sample independently
            g = generator + generator if isinstance(generator, list) else generator  # row n + i: image i's stream
            x = euler_maruyama(
                decoder.head_net, conds, decoder.latent_dim, sampling.steps, 1.0, None, decoder.time_shift, g
            )
        else:
            cond, uncond = (conds[:n_images], conds[n_images:]) if sampling.guided else (conds, None)
            x = euler_maruyama(
                decoder.head_net,
                cond,
                decoder.latent_dim,
                sampling.steps,
                w,
                uncond,
                decoder.time_shift,
                generator,
                sampling.batched_cfg,
            )
        bits = sign_quantize(x).to(conds.dtype)
        patches.append(bits[:n_images])
        if step + 1 < n_steps:
            conds = decoder.step(bits)
    return torch.cat(patches, dim=1)
