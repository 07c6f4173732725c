"""The loader's settings, each declared once: `LoaderSettings` (what a training config exposes as `data.*`, with one
default and one range check each; training's `DataConfig` inherits it), `SubsetConfig`, and `LoaderConfig` (those
settings plus what the task fixes: data, kind, seed, batch shape). `BATCHINGS` maps a kind to its batching."""

from __future__ import annotations

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


@dataclass(kw_only=True)  # keyword-only: LoaderConfig's required data_dir stays its first positional field
class LoaderSettings:
    """The loader settings a training run chooses (its `data.*` keys). Range errors: `range_checks`."""

    token_budget: int = 4096  # t2i: max tokens per packed row
    num_workers: int = 1  # DataLoader worker processes per rank (0: read in the training process)
    shuffle_buffer: int = 256  # samples; 0 or 1 disables shuffling
    caption_dropout: float = 0.1  # t2i: probability of replacing the prompt by the unconditional one
    subset: SubsetConfig = field(default_factory=SubsetConfig)  # only the samples it keeps are read

    def range_checks(self, prefix: str = "") -> list[tuple[bool, str]]:
        """(ok, one-line message) per setting; `prefix` is where the settings live (training: "data.")."""
        rules = [
            ("token_budget", self.token_budget >= 1, ">= 1"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
            ("shuffle_buffer", self.shuffle_buffer >= 0, ">= 0"),
            ("caption_dropout", 0 <= self.caption_dropout <= 1, "in [0, 1]"),
        ]
        return [(ok, f"{prefix}{name} must be {rule}, got {getattr(self, name)}") for name, ok, rule in rules]


@dataclass
class LoaderConfig(LoaderSettings):
    """What to read and how to batch it; everything that changes the batch stream is part of the resume check."""

    data_dir: str | Path
    kind: str = "t2i"  # a BATCHINGS name: "t2i" (packed PackedT2IBatch) or "imagenet" ((bits, labels) batches)
    seed: int = 0
    rows_per_batch: int = 1  # t2i: packed rows per batch
    batch_size: int = 64  # imagenet: samples per batch
    lookahead: int = 64  # t2i: pending samples the packer chooses from
    debug_keys: bool = False  # yield (batch, [(epoch, key), ...]) instead of batch (tests, debugging)

    def __post_init__(self) -> None:
        BATCHINGS.get(self.kind)
        shape = [(n, getattr(self, n)) for n in ("rows_per_batch", "batch_size", "lookahead")]
        for ok, message in self.range_checks() + [(v >= 1, f"{n} must be >= 1, got {v}") for n, v in shape]:
            if not ok:
                raise ValueError(message)

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
