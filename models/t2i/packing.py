"""Packed text-to-image sequences: the token layout of each sample and the tensors one training batch holds.

A sample is: its text ids, then `<|vision_start|>`, `<|res_h|>`, `<|res_w|>`, the P - 1 query tokens and the
image tokens of every patch but the last, in patch-raster order. Text, `<|vision_start|>` and `<|res_h|>` are
causal; from `<|res_w|>` on, blocks of P positions see each other fully. Samples are packed into rows with
document masking between them; position ids restart at 0 per sample. The hidden state at block k's j-th
position conditions token j of patch k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from models.core.patch_order import patch_raster_index, patch_side, to_patch_raster

IGNORE_INDEX = -100


class ImageTokenIds(Protocol):
    """What packing needs from the text tokenizer (see `models.t2i.text_tokenizer.T2ITextTokenizer`)."""

    pad_id: int

    def image_prefix_ids(self, grid_h: int, grid_w: int) -> list[int]: ...

    def prompt_ids(self, caption: str) -> list[int]: ...

    def uncond_ids(self) -> list[int]: ...


class SyntheticPrefixIds:
    """Image-prefix ids (vision_start, res_h, res_w, P - 1 queries) for packing synthetic batches without a trained
    text tokenizer (benchmarks, GPU checks)."""

    pad_id = 0

    def __init__(self, parallel_num: int):
        self.parallel_num = parallel_num

    def image_prefix_ids(self, grid_h: int, grid_w: int) -> list[int]:
        return [1, 2, 3] + [4 + i for i in range(self.parallel_num - 1)]


@dataclass
class T2ISample:
    text_ids: list[int]  # templated prompt ids (or the unconditional prompt's ids)
    bits: torch.Tensor  # ±1 latent grid [C, h, w]
    text_loss: bool = True  # next-token cross-entropy on the text tokens

    @property
    def grid(self) -> tuple[int, int]:
        return self.bits.shape[1], self.bits.shape[2]


def sample_length(text_len: int, grid_h: int, grid_w: int) -> int:
    """Sequence positions one sample takes: text + vision_start + res_h + res_w + (P-1) queries + (h*w - P)."""
    return text_len + 2 + grid_h * grid_w


def grid_coords(grid_h: int, grid_w: int, parallel_num: int) -> torch.Tensor:
    """(row, col) [h*w, 2] of the image tokens in patch-raster order."""
    raster = patch_raster_index(grid_h, grid_w, parallel_num)
    return torch.stack([raster // grid_w, raster % grid_w], dim=1)


@dataclass
class PackedT2IBatch:
    """One training batch: B rows of packed samples, right-padded to a common length L."""

    input_ids: torch.Tensor  # [B, L] text/special ids; image-input and padding positions hold pad ids
    position_ids: torch.Tensor  # [B, L], restart at 0 per sample
    doc_ids: torch.Tensor  # [B, L] sample index (unique in the batch), -1 on padding
    block_ids: torch.Tensor  # [B, L] non-decreasing; equal ids inside one document see each other fully
    text_labels: torch.Tensor  # [B, L] next-token label per position, IGNORE_INDEX where unlabelled
    image_in_index: torch.Tensor  # [N_in] flat positions (row * L + col) of image input tokens
    image_in_bits: torch.Tensor  # [N_in, C] their bits (unperturbed)
    image_in_coords: torch.Tensor  # [N_in, 2] their (row, col) in the latent grid
    target_index: torch.Tensor  # [N_t] flat positions whose hidden states condition targets, P per patch
    target_bits: torch.Tensor  # [N_t, C]
    target_coords: torch.Tensor  # [N_t, 2]
    parallel_num: int

    def to(self, device) -> PackedT2IBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return PackedT2IBatch(**moved)

    @property
    def num_samples(self) -> int:
        return int(self.doc_ids.max().item()) + 1


def pack_rows(rows: list[list[T2ISample]], tokens: ImageTokenIds, parallel_num: int) -> PackedT2IBatch:
    """Lay out `rows` (each a list of samples packed into one sequence) as one batch."""
    if not rows or any(not row for row in rows):
        raise ValueError("pack_rows needs at least one row and no empty rows")
    P = parallel_num
    lengths = [sum(sample_length(len(s.text_ids), *s.grid) for s in row) for row in rows]
    B, L = len(rows), max(lengths)
    input_ids = torch.full((B, L), tokens.pad_id, dtype=torch.long)
    position_ids = torch.zeros(B, L, dtype=torch.long)
    doc_ids = torch.full((B, L), -1, dtype=torch.long)
    block_ids = torch.zeros(B, L, dtype=torch.long)
    text_labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    img_idx, img_bits, img_rc, tgt_idx, tgt_bits, tgt_rc = [], [], [], [], [], []
    doc = 0
    for r, row in enumerate(rows):
        col, blk = 0, 0
        for s in row:
            h, w = s.grid
            patch_side(P, h, w)
            text = list(s.text_ids)
            prefix = tokens.image_prefix_ids(h, w)
            if len(prefix) != 2 + P:
                raise ValueError(f"image prefix has {len(prefix)} ids, expected 3 + (P - 1) = {2 + P}")
            n = sample_length(len(text), h, w)
            n_causal = len(text) + 2  # text, vision_start, res_h
            sl = slice(col, col + n)
            ids = torch.tensor(text + prefix, dtype=torch.long)
            input_ids[r, col : col + len(ids)] = ids
            position_ids[r, sl] = torch.arange(n)
            doc_ids[r, sl] = doc
            local = torch.arange(n)
            block_ids[r, sl] = blk + torch.where(local < n_causal, local, n_causal + (local - n_causal) // P)
            blk = int(block_ids[r, col + n - 1]) + 1
            if s.text_loss and len(text) > 1:
                text_labels[r, col : col + len(text) - 1] = ids[1 : len(text)]
            tokens_pr = to_patch_raster(s.bits[None].float(), P)[0]  # [h*w, C]
            coords = grid_coords(h, w, P)
            first_img = col + len(text) + 2 + P
            img_idx.append(r * L + torch.arange(first_img, col + n))
            img_bits.append(tokens_pr[: h * w - P])
            img_rc.append(coords[: h * w - P])
            tgt_idx.append(r * L + torch.arange(col + n_causal, col + n))
            tgt_bits.append(tokens_pr)
            tgt_rc.append(coords)
            col += n
            doc += 1
        pads = L - col
        block_ids[r, col:] = blk + torch.arange(pads)
    return PackedT2IBatch(
        input_ids,
        position_ids,
        doc_ids,
        block_ids,
        text_labels,
        torch.cat(img_idx),
        torch.cat(img_bits),
        torch.cat(img_rc),
        torch.cat(tgt_idx),
        torch.cat(tgt_bits),
        torch.cat(tgt_rc),
        P,
    )
