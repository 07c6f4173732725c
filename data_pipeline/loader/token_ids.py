"""`ManifestTokenIds`: the special-token ids a T2I dataset's manifest stores, in the shape packing needs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ManifestTokenIds:
    """`ImageTokenIds` from the special-token ids the tokenize job stored in the manifest (captions are already
    tokenized, so `prompt_ids` is not available)."""

    pad_id: int
    vision_start_id: int
    res_ids: list[int]  # ids of <|res_1|> .. <|res_N|>
    query_ids: list[int]  # P - 1 query token ids
    uncond: list[int]  # ids of the templated unconditional prompt
    parallel_num: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> ManifestTokenIds:
        t = manifest.get("text_tokens")
        if t is None:
            raise ValueError("the manifest has no `text_tokens`; was the dataset tokenized for T2I?")
        ids = cls(
            int(t["pad_id"]),
            int(t["vision_start_id"]),
            list(t["res_ids"]),
            list(t["query_ids"]),
            list(t["uncond_ids"]),
            int(t["parallel_num"]),
        )
        if len(ids.query_ids) != ids.parallel_num - 1:
            raise ValueError(f"manifest has {len(ids.query_ids)} query ids for parallel_num {ids.parallel_num}")
        return ids

    def image_prefix_ids(self, grid_h: int, grid_w: int) -> list[int]:
        for side in (grid_h, grid_w):
            if not 1 <= side <= len(self.res_ids):
                raise ValueError(f"grid side {side} has no <|res_k|> token (k in 1..{len(self.res_ids)})")
        return [self.vision_start_id, self.res_ids[grid_h - 1], self.res_ids[grid_w - 1], *self.query_ids]

    def uncond_ids(self) -> list[int]:
        return list(self.uncond)

    def prompt_ids(self, caption: str) -> list[int]:
        raise NotImplementedError("captions are pre-tokenized in the shards; use the records' text_ids")
