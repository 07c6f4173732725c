"""How each kind of data becomes batches, chosen once per loader (`BATCHINGS[kind]`): T2I samples are packed greedily
into rows of at most `token_budget` tokens (`PackedT2IBatch`), ImageNet samples form fixed-size (bits [B, C, h, w],
labels [B]) batches. A batching plans batches as rows of items (cheap: no tensors, so resumption replays plans) and
builds the tensors of a plan."""

from __future__ import annotations

import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from data_pipeline.loader.packing import batched, greedy_rows, seed_of
from data_pipeline.loader.settings import LoaderError
from data_pipeline.loader.token_ids import ManifestTokenIds
from data_pipeline.shard_format import TokenRecord
from models.t2i.packing import PackedT2IBatch, T2ISample, pack_rows, sample_length

if TYPE_CHECKING:
    from data_pipeline.loader.settings import LoaderConfig

log = logging.getLogger(__name__)

MAX_SKIPPED_IN_A_ROW = 10_000  # consecutive samples dropped (over the budget, outside the subset) before giving up

ImageNetBatch = tuple[torch.Tensor, torch.Tensor]  # bits float32 ±1 [B, C, h, w], labels int64 [B]
Batch = PackedT2IBatch | ImageNetBatch
Plan = list[list["Item"]]  # the rows of one batch


@dataclass
class Item:
    """A sample on its way to a batch; bits stay packed until the batch is built."""

    epoch: int  # of its source's stream
    record: TokenRecord
    source: int = 0  # index of its dataset in the loader's sources
    text_ids: list[int] = field(default_factory=list)
    text_loss: bool = True
    length: int = 0


@dataclass
class Counters:
    samples: int = 0  # samples placed in batches
    skipped_too_long: int = 0
    filtered_out: int = 0  # samples outside the configured subset
    rows: int = 0  # T2I rows emitted
    row_tokens: int = 0  # tokens in them

    def add(self, other: dict[str, int]) -> None:
        for k, v in other.items():
            setattr(self, k, getattr(self, k) + v)

    def take(self) -> dict[str, int]:
        out = asdict(self)
        for k in out:
            setattr(self, k, 0)
        return out


class Batching(ABC):
    """One kind's batches; built once per dataset, after the manifest's own checks."""

    stream_settings: tuple[str, ...]  # the LoaderConfig fields its batch stream depends on (checked on resume)

    def __init__(self, cfg: LoaderConfig, manifest: dict):
        self.cfg = cfg

    @abstractmethod
    def plans(self, items: Iterator[Item], slot: int, counters: Counters) -> Iterator[Plan]:
        """The batches of slot `slot`'s sample stream, as rows of items; what was placed or dropped is counted."""

    @abstractmethod
    def build(self, rows: Plan) -> Batch:
        """The tensors of one planned batch."""

    @abstractmethod
    def tokens(self, item: Item) -> int:
        """The tokens a placed item puts in its batch (the per-source token counts)."""


class T2IBatching(Batching):
    # P is not a setting of the loader: rows are packed for the P the dataset's query tokens were made for (the
    # manifest's, part of the dataset fingerprint); the T2I task checks it against the model's once
    stream_settings = ("token_budget", "rows_per_batch", "caption_dropout", "lookahead")

    def __init__(self, cfg: LoaderConfig, manifest: dict):
        super().__init__(cfg, manifest)
        self.token_ids = ManifestTokenIds.from_manifest(manifest)
        self._check_token_budget(manifest)

    def _check_token_budget(self, manifest: dict) -> None:
        """Refuse a token budget below the shortest sample the dataset can hold: its smallest image (from the
        manifest's size histogram) with the unconditional prompt. (A budget above that but below every real sample
        is caught while reading: MAX_SKIPPED_IN_A_ROW.)"""
        sizes = [tuple(int(x) for x in k.split("x")) for k in manifest.get("size_histogram", {})]
        if not sizes or "downsample" not in manifest:
            return
        down = int(manifest["downsample"])
        shortest = min(sample_length(len(self.token_ids.uncond_ids()), h // down, w // down) for h, w in sizes)
        if self.cfg.token_budget < shortest:
            raise LoaderError(
                f"data.token_budget={self.cfg.token_budget} is smaller than every sample of {self.cfg.describe()} "
                f"(the shortest possible takes {shortest} tokens); raise data.token_budget to at least {shortest}"
            )

    def _items(self, items: Iterator[Item], slot: int, counters: Counters) -> Iterator[Item]:
        """Caption dropout, sample lengths, and the too-long filter."""
        cfg, ids = self.cfg, self.token_ids
        rng = random.Random(seed_of("caption_dropout", cfg.seed, slot))
        warned, in_a_row, shortest = False, 0, None
        for item in items:
            drop = cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout
            item.text_ids = ids.uncond_ids() if drop else item.record.text_ids
            item.text_loss = not drop and bool(item.record.caption)  # an empty caption is an unconditional sample
            item.length = sample_length(len(item.text_ids), item.record.h, item.record.w)
            if item.length > cfg.token_budget:
                counters.skipped_too_long += 1
                in_a_row += 1
                shortest = min(shortest or item.length, item.length)
                if in_a_row >= MAX_SKIPPED_IN_A_ROW:  # nothing fits: stop instead of reading the data forever
                    raise LoaderError(
                        f"{in_a_row} samples in a row exceed data.token_budget={cfg.token_budget} (the shortest took "
                        f"{shortest} tokens); raise data.token_budget"
                    )
                if not warned:
                    log.warning(
                        "skipping sample %s: %d tokens > token_budget %d (counted in stats; warned once)",
                        item.record.key,
                        item.length,
                        cfg.token_budget,
                    )
                    warned = True
                continue
            in_a_row, shortest = 0, None
            yield item

    def plans(self, items: Iterator[Item], slot: int, counters: Counters) -> Iterator[Plan]:
        cfg = self.cfg
        packed = greedy_rows(self._items(items, slot, counters), lambda x: x.length, cfg.token_budget, cfg.lookahead)
        for rows in batched(packed, cfg.rows_per_batch):
            counters.rows += len(rows)
            counters.row_tokens += sum(x.length for row in rows for x in row)
            counters.samples += sum(len(row) for row in rows)
            yield rows

    def tokens(self, item: Item) -> int:
        return item.length  # prompt and image tokens in its row

    def build(self, rows: Plan) -> PackedT2IBatch:
        samples = [[T2ISample(x.text_ids, x.record.grid(), x.text_loss) for x in row] for row in rows]
        return pack_rows(samples, self.token_ids, self.token_ids.parallel_num)


class ImageNetBatching(Batching):
    stream_settings = ("batch_size",)  # (older states also recorded the T2I settings: ignored on resume)

    def plans(self, items: Iterator[Item], slot: int, counters: Counters) -> Iterator[Plan]:
        first: TokenRecord | None = None
        for chunk in batched(items, self.cfg.batch_size):
            for item in chunk:
                r = item.record
                first = first or r
                if (r.h, r.w, r.bits_per_token) != (first.h, first.w, first.bits_per_token):
                    raise ValueError(
                        f"ImageNet batches need one grid size: sample {r.key} is {r.h}x{r.w}x{r.bits_per_token} "
                        f"but {first.key} is {first.h}x{first.w}x{first.bits_per_token} (h x w x bits)"
                    )
                if r.label is None:
                    raise ValueError(f"ImageNet sample {r.key} has no class label")
            counters.samples += len(chunk)
            yield [chunk]

    def tokens(self, item: Item) -> int:
        return item.record.h * item.record.w  # image tokens

    def build(self, rows: Plan) -> ImageNetBatch:
        items = rows[0]
        bits = torch.stack([x.record.grid() for x in items])
        return bits, torch.tensor([x.record.label for x in items], dtype=torch.long)
