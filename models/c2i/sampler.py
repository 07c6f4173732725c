"""The class-conditional model's adapter to the shared next-patch loop: class-prefix prefill and patch steps.

Prefill runs the class prefix and the P - 1 query tokens and predicts patch 0; each step feeds patch i - 1
(through `proj_in`) and predicts patch i. The unconditional rows (the null class) see the same image tokens.
"""

from __future__ import annotations

import torch

from models.c2i.model import ClassConditionalBitDance
from models.core.head_sampler import Generators
from models.core.next_patch import RowSetDecoder, cfg_row_sets, sample_next_patch
from models.core.patch_order import from_patch_raster
from models.core.sampling import SamplingConfig


class C2IRows:
    """KV-cache state of one set of class rows (conditional, null-class, or both stacked)."""

    def __init__(self, model: ClassConditionalBitDance, labels: torch.Tensor):
        self.model, self.labels = model, labels
        self.cache = model.new_cache(labels.shape[0])
        self.start = 0  # backbone positions run so far
        self.fed = 0  # patches fed so far

    def _conditions(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model.run_backbone(x, self.start, self.cache)
        self.start += x.shape[1]
        P, k = self.model.cfg.parallel_num, self.fed
        return hidden[:, -P:] + self.model.pos_for_diff.weight[k * P : (k + 1) * P]

    def prefill(self) -> torch.Tensor:
        return self._conditions(self.model.prefix_embeddings(self.labels))

    def step(self, bits: torch.Tensor) -> torch.Tensor:
        emb = self.model.proj_in(bits)
        self.fed += 1
        return self._conditions(emb.repeat(self.labels.shape[0] // bits.shape[0], 1, 1))


@torch.no_grad()
def sample_class_conditional(
    model: ClassConditionalBitDance,
    labels: torch.Tensor,
    sampling: SamplingConfig,
    generator: Generators = None,
) -> torch.Tensor:
    """Generate ±1 latent grids [B, C, h, w] for class ids `labels` [B]; decode them with the tokenizer."""
    c = model.cfg
    if labels.dim() != 1 or ((labels < 0) | (labels >= c.num_classes)).any():
        raise ValueError(f"labels must be a 1-D tensor of class ids in [0, {c.num_classes})")
    model.eval()
    sets = cfg_row_sets(labels.tolist(), c.num_classes, sampling)
    rows = [C2IRows(model, torch.tensor(s, dtype=labels.dtype, device=labels.device)) for s in sets]
    n_steps = c.grid * c.grid // c.parallel_num
    decoder = RowSetDecoder(rows, model.head.net, c.latent_dim, c.time_shift, n_steps)
    patches = sample_next_patch(decoder, labels.shape[0], sampling, generator)
    return from_patch_raster(patches, c.parallel_num, c.grid, c.grid)
