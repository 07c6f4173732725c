"""The loader's settings, each declared once: `LoaderSettings` (what a training config exposes as `data.*`, with one
default and one range check each; training's `DataConfig` inherits it), `SubsetConfig`, `MixtureSource` (one dataset
of a weighted mixture) and `LoaderConfig` (those settings plus what the task fixes: data, kind, seed, batch shape).
`BATCHINGS` maps a kind to its batching."""

from __future__ import annotations

import math
import posixpath
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.core.registry import Registry

if TYPE_CHECKING:
    from data_pipeline.loader.batching import Batching
    from data_pipeline.shard_format import TokenRecord

BATCHINGS: Registry[type[Batching]] = Registry("loader kind")
BATCHINGS.register("t2i", "data_pipeline.loader.batching:T2IBatching")  # packed rows: PackedT2IBatch
BATCHINGS.register("imagenet", "data_pipeline.loader.batching:ImageNetBatching")  # (bits, labels)


class LoaderError(ValueError):
    """The dataset cannot feed this loader as configured (one-line message naming the fix)."""


@dataclass
class SubsetConfig:
    """A curated subset of a tokenized dataset (e.g. the "small amount of high-quality data" a distillation runs on):
    only samples meeting every set bound are read; the rest are counted (`filtered_out` in the loader stats)."""

    min_side: int = 0  # pixels: the shorter side of the image as tokenized
    min_caption_tokens: int = 0  # templated prompt ids
    max_caption_tokens: int = 0  # 0: no upper bound
    score: str | None = None  # a score column the tokenize job carried from the source (record `scores`)
    min_score: float = 0.0  # with `score`: keep samples whose score is >= this

    def __post_init__(self) -> None:
        if min(self.min_side, self.min_caption_tokens, self.max_caption_tokens) < 0:
            raise ValueError("data.subset bounds must be >= 0")
        if self.max_caption_tokens and self.max_caption_tokens < self.min_caption_tokens:
            raise ValueError(
                f"data.subset.max_caption_tokens={self.max_caption_tokens} < min_caption_tokens="
                f"{self.min_caption_tokens}: no caption fits"
            )

    @property
    def active(self) -> bool:
        return bool(self.min_side or self.min_caption_tokens or self.max_caption_tokens or self.score)

    def keeps(self, r: TokenRecord) -> bool:
        if min(r.image_hw) < self.min_side or len(r.text_ids) < self.min_caption_tokens:
            return False
        if self.max_caption_tokens and len(r.text_ids) > self.max_caption_tokens:
            return False
        if self.score is None:
            return True
        if self.score not in r.scores:
            have = ", ".join(sorted(r.scores)) or "none"
            raise LoaderError(
                f"sample {r.key} has no score {self.score!r} (its scores: {have}); tokenize from a source whose "
                f"json (or --score-columns) carries it, or unset data.subset.score"
            )
        return r.scores[self.score] >= self.min_score


@dataclass
class MixtureSource:
    """One dataset of a weighted mixture (`data.sources`): a local folder or an fsspec URL, drawn from with probability
    weight / (sum of the weights); `name` (default: the folder's last path component) names its logged counts."""

    dir: str
    weight: float = 1.0  # >= 0; 0 pauses the source (its stream stays where it stopped)
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or posixpath.basename(str(self.dir).rstrip("/")) or str(self.dir)


def mixture_checks(sources: list[MixtureSource], prefix: str = "") -> list[tuple[bool, str]]:
    """(ok, one-line message) per rule of a `sources` list; `prefix` is where it lives (training: "data.")."""
    if not sources:
        return []
    weights = [s.weight for s in sources]
    labels = [s.label for s in sources]
    repeated = sorted({n for n in labels if labels.count(n) > 1})
    return [
        (all(str(s.dir) for s in sources), f"{prefix}sources: every source needs a dir (a local folder or a URL)"),
        (
            all(math.isfinite(w) and w >= 0 for w in weights),
            f"{prefix}sources weights must be finite and >= 0, got {weights}",
        ),
        (sum(weights) > 0, f"{prefix}sources weights must not all be 0, got {weights}"),
        (
            not repeated,
            f"{prefix}sources names repeat ({', '.join(repeated)}); give each source its own name: "
            "{dir: ..., weight: ..., name: ...}",
        ),
    ]


@dataclass(kw_only=True)  # keyword-only: LoaderConfig's required data_dir stays its first positional field
class LoaderSettings:
    """The loader settings a training run chooses (its `data.*` keys). Range errors: `range_checks`."""

    token_budget: int = 4096  # t2i: max tokens per packed row
    num_workers: int = 1  # DataLoader worker processes per rank (0: read in the training process)
    shuffle_buffer: int = 256  # samples; 0 or 1 disables shuffling
    caption_dropout: float = 0.1  # t2i: probability of replacing the prompt by the unconditional one
    subset: SubsetConfig = field(default_factory=SubsetConfig)  # only the samples it keeps are read
    # data at a URL (s3://, gs://, ...): whole shards are cached on the node (`data_pipeline.loader.shard_store`)
    cache_dir: str | None = None  # None: <system temp dir (TMPDIR)>/bitdance-shards-<uid>; a node's processes share it
    cache_gb: float = 20.0  # bound of the cache folder; least recently used shards are evicted first
    prefetch_shards: int = 2  # next shards of a slot's order fetched in the background (0: fetch when needed)

    def range_checks(self, prefix: str = "") -> list[tuple[bool, str]]:
        """(ok, one-line message) per setting; `prefix` is where the settings live (training: "data.")."""
        rules = [
            ("token_budget", self.token_budget >= 1, ">= 1"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
            ("shuffle_buffer", self.shuffle_buffer >= 0, ">= 0"),
            ("caption_dropout", 0 <= self.caption_dropout <= 1, "in [0, 1]"),
            ("cache_gb", self.cache_gb > 0, "> 0"),
            ("prefetch_shards", self.prefetch_shards >= 0, ">= 0 (0: no prefetch)"),
        ]
        return [(ok, f"{prefix}{name} must be {rule}, got {getattr(self, name)}") for name, ok, rule in rules]


@dataclass
class LoaderConfig(LoaderSettings):
    """What to read and how to batch it; everything that changes the batch stream is part of the resume check."""

    data_dir: str | Path  # a local folder or an fsspec URL (ignored when `sources` is set)
    kind: str = "t2i"  # a BATCHINGS name: "t2i" (packed PackedT2IBatch) or "imagenet" ((bits, labels) batches)
    seed: int = 0
    rows_per_batch: int = 1  # t2i: packed rows per batch
    batch_size: int = 64  # imagenet: samples per batch
    lookahead: int = 64  # t2i: pending samples the packer chooses from
    debug_keys: bool = False  # yield (batch, [(epoch, key), ...]) instead of batch (tests, debugging)
    sources: list[MixtureSource] = field(default_factory=list)  # a weighted mixture of datasets instead of data_dir

    def __post_init__(self) -> None:
        BATCHINGS.get(self.kind)
        self.sources = [s if isinstance(s, MixtureSource) else MixtureSource(**s) for s in self.sources]
        shape = [(n, getattr(self, n)) for n in ("rows_per_batch", "batch_size", "lookahead")]
        checks = self.range_checks() + mixture_checks(self.sources, "data.")
        for ok, message in checks + [(v >= 1, f"{n} must be >= 1, got {v}") for n, v in shape]:
            if not ok:
                raise ValueError(message)

    def datasets(self) -> list[MixtureSource]:
        """What to read: the mixture's sources, else `data_dir` as the one source."""
        return list(self.sources) or [MixtureSource(str(self.data_dir))]

    def describe(self) -> str:
        """The data for messages: data_dir, or the mixture's folders."""
        return " + ".join(str(s.dir) for s in self.datasets())

    @classmethod
    def from_settings(cls, settings: LoaderSettings, data_dir: str | Path, **task: Any) -> LoaderConfig:
        """The loader config of `settings` (e.g. a training config's `data` section) and what the task fixes."""
        return cls(data_dir, **{f.name: getattr(settings, f.name) for f in fields(LoaderSettings)}, **task)

    def stream_settings(self) -> dict[str, Any]:
        """The settings the batch stream depends on (besides seed, workers, ranks and data)."""
        out = {k: getattr(self, k) for k in ("kind", "shuffle_buffer", *BATCHINGS.get(self.kind).stream_settings)}
        if self.subset.active:  # (absent otherwise, so the states of runs without a subset stay as they were)
            out["subset"] = asdict(self.subset)
        return out
