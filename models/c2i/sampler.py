"""The class-conditional model's adapter to the shared next-patch loop: class-prefix prefill and patch steps.

Prefill runs the class prefix and the P - 1 query tokens and predicts patch 0; each step feeds patch i - 1
(through `proj_in`) and predicts patch i. The unconditional rows (the null class) see the same image tokens.
Under `SamplingConfig.compile` the step is one compiled graph at fixed shapes (`fixed_shape_step`).
"""

from __future__ import annotations

import torch

from models.c2i.model import ClassConditionalBitDance
from models.core.compiled_sampling import compiled
from models.core.head_sampler import Generators
from models.core.kv_cache import KVCache
from models.core.next_patch import RowSetDecoder, cfg_row_sets, pad_conditions, sample_next_patch
from models.core.patch_order import from_patch_raster
from models.core.sampling import SamplingConfig


def fixed_shape_step(
    model: ClassConditionalBitDance, bits: torch.Tensor, pos: torch.Tensor, cache: KVCache
) -> torch.Tensor:
    """Feed bits [R, P, C] at backbone positions pos [P] (a tensor) over the full-length cache: conditions [R, P, D]
    of the next patch. `run_backbone` with the rows of the rotary tables and the mask picked by `pos`, so every step
    has the same shapes (columns past the patch are masked by the block-causal mask)."""
    cos, sin, mask = model.rope_cos[pos], model.rope_sin[pos], model.attn_mask[pos]
    x = model.emb_norm(model.proj_in(bits))
    for i, layer in enumerate(model.layers):
        x = layer(x, cos, sin, mask, cache, i, pos)
    return model.norm(x) + model.pos_for_diff.weight[pos - (model.cfg.cls_token_num - 1)]


class C2IRows:
    """KV-cache state of one set of class rows (conditional, null-class, or both stacked); `fixed_shapes`: the steps
    run as the compiled `fixed_shape_step`."""

    def __init__(self, model: ClassConditionalBitDance, labels: torch.Tensor, fixed_shapes: bool = False):
        self.model, self.labels, self.fixed_shapes = model, labels, fixed_shapes
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
        self.fed += 1
        if not self.fixed_shapes:
            emb = self.model.proj_in(bits)
            return self._conditions(emb.repeat(self.labels.shape[0] // bits.shape[0], 1, 1))
        P = bits.shape[1]
        pos = torch.arange(self.start, self.start + P, device=bits.device)
        self.start += P
        bits = bits.repeat(self.labels.shape[0] // bits.shape[0], 1, 1)
        return compiled(fixed_shape_step, bits.device.type)(self.model, bits, pos, self.cache)


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
    sets = cfg_row_sets(pad_conditions(labels.tolist(), sampling), c.num_classes, sampling)
    rows = [C2IRows(model, torch.tensor(s, dtype=labels.dtype, device=labels.device), sampling.compile) for s in sets]
    n_steps = c.grid * c.grid // c.parallel_num
    decoder = RowSetDecoder(rows, model.head.net, c.latent_dim, c.time_shift, n_steps)
    patches = sample_next_patch(decoder, labels.shape[0], sampling, generator)
    return from_patch_raster(patches, c.parallel_num, c.grid, c.grid)
