"""Carrying a text-to-image model trained to predict P tokens per step over to P' tokens per step: the initialisation
of the 16x -> 64x distillation (a student that decodes 64 tokens a step, started from the 16x model).

What carries over unchanged: every weight. No weight of the backbone, projector or diffusion head has a P-shaped
dimension: the head attends over however many tokens a patch holds, and positions are RoPE over the sequence plus the
2D sin-cos embedding of each token's grid cell, so a 4x4 patch sees the same kind of inputs as a 2x2 one.

What depends on P: the P - 1 `<|query_k|>` tokens, i.e. rows of the text embedding (and of the LM head, whose query
rows are never a target). Their ids come from the text tokenizer, which adds the queries after the resolution tokens,
so the first P - 1 queries keep their ids and `<|query_P|>` .. `<|query_{P'-1}|>` are new rows. Each new row starts
at the mean of the source model's query rows: a query-like input whose block position (RoPE) and target grid cell
(added to the head condition) tell the tokens of a patch apart, as they do for the trained queries. With P = 1 there
is no query row to average, and new rows keep the vocabulary mean (`resized_rows`). A smaller P' keeps the first
P' - 1 query rows. The head config's `parallel_num` becomes P'.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from models.t2i.model import T2IConfig


@dataclass(frozen=True)
class QueryRows:
    """The query-token ids of the source model (P - 1) and of the new one (P' - 1)."""

    source: tuple[int, ...]
    target: tuple[int, ...]

    def __post_init__(self) -> None:
        shared = min(len(self.source), len(self.target))
        if self.source[:shared] != self.target[:shared]:
            raise ValueError(
                f"the source model's query tokens {list(self.source[:4])}... and the new ones "
                f"{list(self.target[:4])}... have other ids: tokenize the data with the source model's text tokenizer"
            )

    @property
    def new(self) -> tuple[int, ...]:
        return self.target[len(self.source) :]

    @torch.no_grad()
    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (rows = vocabulary, already sized for the new model) with the new query rows set in place."""
        if self.new and self.source:
            if max(self.target) >= weight.shape[0]:
                raise ValueError(f"query id {max(self.target)} is beyond the {weight.shape[0]}-row vocabulary")
            mean = weight[list(self.source)].float().mean(dim=0)
            weight[list(self.new)] = mean.to(weight.dtype)
        return weight


def query_rows(folder: str | Path, source_p: int, target_p: int) -> QueryRows:
    """The query ids of P = `source_p` and P' = `target_p` under the text tokenizer of an official-layout folder."""
    from models.t2i.text_tokenizer import T2ITextTokenizer

    source = T2ITextTokenizer.from_folder(folder, source_p).query_ids()
    target = T2ITextTokenizer.from_folder(folder, target_p).query_ids()
    return QueryRows(tuple(source), tuple(target))


def with_parallel_num(cfg: T2IConfig, parallel_num: int, image_sizes: tuple | None = None) -> T2IConfig:
    """`cfg` predicting `parallel_num` tokens per step, optionally for other image sizes (each must tile into the
    new patches: a one-line error otherwise)."""
    sizes = cfg.image_sizes if image_sizes is None else tuple(tuple(s) for s in image_sizes)
    return replace(cfg, head=replace(cfg.head, parallel_num=parallel_num), image_sizes=sizes)


def repatch_(model, parallel_num: int, rows: QueryRows, image_sizes: tuple | None = None) -> None:
    """Turn a loaded `TextToImageBitDance` into a `parallel_num`-token model in place (vocabulary already sized)."""
    if len(rows.target) != parallel_num - 1:
        raise ValueError(f"{len(rows.target)} query ids given for P'={parallel_num}; expected {parallel_num - 1}")
    model.cfg = with_parallel_num(model.cfg, parallel_num, image_sizes)
    model.vision_head.cfg = model.cfg.head
    rows.apply(model.llm.model.embed_tokens.weight.data)
    rows.apply(model.llm.lm_head.weight.data)
