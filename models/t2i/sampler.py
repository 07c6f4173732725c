"""Next-patch sampling of the text-to-image model with a KV cache and batched conditional/unconditional rows.

Every prompt row (conditional prompts, and the unconditional prompt when CFG is on) is left-padded to one
length and prefilled once, together with `<|vision_start|> <|res_h|> <|res_w|>` and the P - 1 queries; the
last P of those form the first bidirectional block and predict patch 0. Each later step feeds one patch
(projector + 2D embedding) and predicts the next. The official code runs the two row sets as separate passes;
`batched_cfg=True` runs them in one batched forward, `False` in two (same numbers).
"""

from __future__ import annotations

import torch

from models.c2i.sampler import cfg_at_step, to_bits
from models.core.attention import dense_block_causal_mask
from models.core.head_sampler import euler_maruyama
from models.core.patch_order import from_patch_raster
from models.t2i.model import TextToImageBitDance
from models.t2i.packing import grid_coords


class T2IDecoder:
    """KV-cache state of a set of rows that all generate an image of the same grid size."""

    def __init__(self, model: TextToImageBitDance, rows: list[list[int]], grid: tuple[int, int], pad_id: int):
        self.model, self.grid = model, grid
        self.P = P = model.cfg.parallel_num
        device = model.llm.lm_head.weight.device
        self.coords = grid_coords(*grid, P).to(device)
        lens = torch.tensor([len(r) for r in rows], device=device)
        R, L = len(rows), int(lens.max())
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
        """Feed the bits [R, P, C] of the next patch; conditions [R, P, D] for the patch after it."""
        P, k = self.P, self.fed
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
    num_steps: int = 50,
    cfg_scale: float = 7.5,
    cfg_schedule: str = "constant",
    generator: torch.Generator | list[torch.Generator] | None = None,
    batched_cfg: bool = True,
    images_per_prompt: int = 1,
) -> torch.Tensor:
    """±1 latent grids [len(prompts) * images_per_prompt, C, h, w]; decode them with the image tokenizer."""
    cfg_at_step(cfg_scale, cfg_schedule, 0, 1)
    grid = model.cfg.grid(height, width)
    model.eval()
    P, C = model.cfg.parallel_num, model.cfg.latent_dim
    prefix = tokenizer.image_prefix_ids(*grid)
    cond_rows = [tokenizer.prompt_ids(p) + prefix for p in prompts for _ in range(images_per_prompt)]
    n, guided = len(cond_rows), cfg_scale > 1.0
    row_sets = [cond_rows] + ([[tokenizer.uncond_ids() + prefix] * n] if guided else [])
    if batched_cfg and guided:
        row_sets = [row_sets[0] + row_sets[1]]
    decoders = [T2IDecoder(model, rows, grid, tokenizer.pad_id) for rows in row_sets]
    conds = torch.cat([d.prefill() for d in decoders])
    n_steps = grid[0] * grid[1] // P
    patches = []
    for step in range(n_steps):
        cond, uncond = (conds[:n], conds[n:]) if guided else (conds, None)
        w = cfg_at_step(cfg_scale, cfg_schedule, step, n_steps)
        x = euler_maruyama(
            model.vision_head.net, cond, C, num_steps, w, uncond, model.cfg.head.time_shift, generator, batched_cfg
        )
        bits = to_bits(x).to(cond.dtype)
        patches.append(bits)
        if step + 1 < n_steps:
            conds = torch.cat([d.step(bits.repeat(len(d.key_valid) // n, 1, 1)) for d in decoders])
    return from_patch_raster(torch.cat(patches, dim=1), P, *grid)
