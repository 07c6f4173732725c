"""The text-to-image model's adapter to the shared next-patch loop: padded prompt prefill and patch steps.

Every prompt row (conditional prompts, and the unconditional prompt when CFG is on) is left-padded to one
length and prefilled once, together with `<|vision_start|> <|res_h|> <|res_w|>` and the P - 1 queries; the
last P of those form the first bidirectional block and predict patch 0. Each later step feeds one patch
(projector + 2D embedding) and predicts the next. The official code runs the conditional and unconditional rows
as separate passes; `SamplingConfig.batched_cfg` runs them in one batched forward (same numbers).
Under `SamplingConfig.compile` the prompt rows are left-padded to a multiple of `PROMPT_BUCKET` and each step is one
compiled graph at fixed shapes (`fixed_shape_step`).
"""

from __future__ import annotations

import torch

from models.core.attention import dense_block_causal_mask
from models.core.compiled_sampling import compiled
from models.core.head_sampler import Generators
from models.core.kv_cache import KVCache
from models.core.next_patch import RowSetDecoder, cfg_row_sets, pad_conditions, sample_next_patch
from models.core.patch_order import from_patch_raster
from models.core.sampling import SamplingConfig
from models.t2i.model import TextToImageBitDance
from models.t2i.packing import grid_coords

PROMPT_BUCKET = 64  # under compile, prompt rows are left-padded to a multiple of this: one graph per bucket


def fixed_shape_step(
    model: TextToImageBitDance,
    bits: torch.Tensor,
    idx: torch.Tensor,
    prompt_len: int,
    cache: KVCache,
    coords: torch.Tensor,
    lens: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """`T2IDecoder.step` at fixed shapes: feed bits [R, P, C] of image tokens idx [P] (a tensor) at cache columns
    prompt_len + idx of the full-length cache, every column past the patch masked; conditions [R, P, D] of the next
    patch."""
    P = idx.shape[0]
    x = model.embed_image_tokens(bits, coords[idx])
    cols = prompt_len + idx
    visible = key_valid & (torch.arange(key_valid.shape[1], device=idx.device) <= cols[-1])
    mask = visible[:, None, None, :].expand(-1, 1, P, -1)
    hidden = model.llm.model(x, lens[:, None] + idx, mask, cache, cols)
    return hidden + model.pos_embed(coords[idx + P]).to(hidden.dtype)


class T2IDecoder:
    """KV-cache state of a set of rows that all generate an image of the same grid size; `fixed_shapes`: compiled
    steps over a full-length cache, prompts padded to a multiple of PROMPT_BUCKET."""

    def __init__(
        self,
        model: TextToImageBitDance,
        rows: list[list[int]],
        grid: tuple[int, int],
        pad_id: int,
        fixed_shapes: bool = False,
    ):
        self.model, self.grid, self.fixed_shapes = model, grid, fixed_shapes
        self.P = P = model.cfg.parallel_num
        device = model.llm.lm_head.weight.device
        self.coords = grid_coords(*grid, P).to(device)
        lens = torch.tensor([len(r) for r in rows], device=device)
        self.rows = R = len(rows)
        L = max(len(r) for r in rows)
        if fixed_shapes:
            L = -(-L // PROMPT_BUCKET) * PROMPT_BUCKET
        self.prompt_len, self.lens = L, lens
        ids = torch.full((R, L), pad_id, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            ids[i, L - len(r) :] = torch.tensor(r, device=device)
        col = torch.arange(L, device=device)
        real = col[None] >= (L - lens)[:, None]
        self.position_ids = (col[None] - (L - lens)[:, None]).clamp_min(0)
        doc = torch.where(real, 0, -1)
        blk = torch.minimum(col, torch.tensor(L - P, device=device)).expand(R, -1)  # last P share one block
        blk = torch.where(real, blk, col - L)  # padding: its own causal chain, never seen by real tokens
        self.key_valid = torch.ones(R, L + grid[0] * grid[1] - P, dtype=torch.bool, device=device)
        self.key_valid[:, :L] = real
        self.cache = model.llm.new_cache(R, self.key_valid.shape[1])
        self.ids, self.mask0 = ids, dense_block_causal_mask(doc, blk)
        self.fed = 0  # patches fed so far

    def _conditions(self, hidden: torch.Tensor, patch: int) -> torch.Tensor:
        pos = self.model.pos_embed(self.coords[patch * self.P : (patch + 1) * self.P]).to(hidden.dtype)
        return hidden[:, -self.P :] + pos

    def prefill(self) -> torch.Tensor:
        """Run the prompts and the first block once; conditions [R, P, D] for patch 0."""
        llm = self.model.llm.model
        hidden = llm(llm.embed_tokens(self.ids), self.position_ids, self.mask0, self.cache, 0)
        return self._conditions(hidden, 0)

    def step(self, bits: torch.Tensor) -> torch.Tensor:
        """Feed the bits of the next patch: [R, P, C] one per row, or [n, P, C] (row i gets image i % n; R a
        multiple of n); conditions [R, P, D] for the patch after it."""
        if self.rows % bits.shape[0]:
            raise ValueError(f"bits for {bits.shape[0]} images do not tile {self.rows} rows")
        bits = bits.repeat(self.rows // bits.shape[0], 1, 1)
        P, k = self.P, self.fed
        if self.fixed_shapes:
            self.fed += 1
            idx = torch.arange(k * P, (k + 1) * P, device=bits.device)
            args = (self.cache, self.coords, self.lens, self.key_valid)
            return compiled(fixed_shape_step, bits.device.type)(self.model, bits, idx, self.prompt_len, *args)
        coords = self.coords[k * P : (k + 1) * P]
        x = self.model.embed_image_tokens(bits, coords)
        start = self.prompt_len + k * P
        pos = self.lens[:, None] + k * P + torch.arange(P, device=bits.device)
        mask = self.key_valid[:, None, None, : start + P].expand(-1, 1, P, -1)
        hidden = self.model.llm.model(x, pos, mask, self.cache, start)
        self.fed += 1
        return self._conditions(hidden, k + 1)


@torch.no_grad()
def sample_t2i(
    model: TextToImageBitDance,
    tokenizer,
    prompts: list[str],
    height: int,
    width: int,
    sampling: SamplingConfig,
    generator: Generators = None,
    images_per_prompt: int = 1,
) -> torch.Tensor:
    """±1 latent grids [len(prompts) * images_per_prompt, C, h, w]; decode them with the image tokenizer."""
    grid = model.cfg.grid(height, width)
    model.eval()
    P = model.cfg.parallel_num
    prefix = tokenizer.image_prefix_ids(*grid)
    cond_rows = [tokenizer.prompt_ids(p) + prefix for p in prompts for _ in range(images_per_prompt)]
    sets = cfg_row_sets(pad_conditions(cond_rows, sampling), tokenizer.uncond_ids() + prefix, sampling)
    rows = [T2IDecoder(model, s, grid, tokenizer.pad_id, sampling.compile) for s in sets]
    c = model.cfg
    decoder = RowSetDecoder(rows, model.vision_head.net, c.latent_dim, c.head.time_shift, grid[0] * grid[1] // P)
    patches = sample_next_patch(decoder, len(cond_rows), sampling, generator)
    return from_patch_raster(patches, P, *grid)
