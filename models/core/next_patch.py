"""The next-patch sampling loop both model families share: prefill, then per AR step guided head sampling, sign to
bits, and the bits fed back; a family only supplies a decoder (its KV-cache prefill and step).

Rows: the n conditional rows come first, then (when guidance is on) n unconditional rows that see the same image
tokens. `cfg_row_sets` splits them into the row sets a family decodes in one forward each (one set when
`batched_cfg`, else two; both give the same numbers) and `RowSetDecoder` stacks those sets into one decoder.
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
        """Feed the ±1 bits [n, P, C] of the last patch (to every row of its image); conditions [R, P, D] of the
        next patch."""
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

    def prefill(self) -> torch.Tensor:
        return torch.cat([d.prefill() for d in self.row_sets])

    def step(self, bits: torch.Tensor) -> torch.Tensor:
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
        cond, uncond = (conds[:n_images], conds[n_images:]) if sampling.guided else (conds, None)
        x = euler_maruyama(
            decoder.head_net,
            cond,
            decoder.latent_dim,
            sampling.steps,
            cfg_at_step(sampling.cfg_scale, sampling.cfg_schedule, step, n_steps),
            uncond,
            decoder.time_shift,
            generator,
            sampling.batched_cfg,
        )
        bits = sign_quantize(x).to(cond.dtype)
        patches.append(bits)
        if step + 1 < n_steps:
            conds = decoder.step(bits)
    return torch.cat(patches, dim=1)
