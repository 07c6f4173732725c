"""What every input source shares: the records (`InputShard`, `RawSample`), `SourceConfig`, the `Source` protocol and
the `SOURCES` registry (`--source`), with `list_shards` / `iter_samples` over whichever source a config names."""

from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import fsspec

from models.core.registry import Registry

DEFAULT_MAX_MEMBER_BYTES = 128 * 2**20  # one image file (tar member, parquet cell, file) larger than this is skipped


@dataclass(frozen=True)
class InputShard:
    path: str  # tar / parquet file, or the folder root, in the source's filesystem
    name: str  # output stem: deterministic and unique in the dataset
    files: tuple[str, ...] = ()  # folder / imagenet: image paths relative to `path`


@dataclass
class RawSample:
    key: str
    image: bytes | None = None
    caption: str = ""
    label: int | None = None
    error: str | None = None
    detail: str = ""
    note: str | None = None  # a usable sample counted under a reason: empty_caption (an unconditional sample)
    scores: dict[str, float] = field(default_factory=dict)  # score columns (curated subsets: loader data.subset)


@dataclass(frozen=True)
class SourceConfig:
    kind: str  # a name registered in SOURCES, or a "package.module:Class" plugin
    path: str  # a local path, or a URL of any filesystem fsspec knows
    samples_per_shard: int = 1000  # folder / imagenet sources
    image_column: str = "image"  # parquet
    caption_column: str = "caption"  # parquet
    score_columns: tuple[str, ...] = ()  # parquet: numeric columns carried as scores (json sources: every number)
    class_index: str | None = None  # imagenet: json {"0": ["n01440764", "tench"], ...} or one wnid per line
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # larger members / cells / files: member_too_large, never read

    def __post_init__(self) -> None:
        SOURCES.get(self.kind)
        fs, root = fsspec.core.url_to_fs(self.path)
        if not fs.exists(root):
            raise FileNotFoundError(f"input {self.path} does not exist")


class Source(ABC):
    """One kind of input: it lists its inputs as shards and reads the samples of one shard. Every file access goes
    through `self.fs`, the fsspec filesystem of the configured path (local, or any URL fsspec knows)."""

    looks_for = "input files"  # what `list_shards` looks for (named when it finds none)
    scores_need_columns = False  # carries only the scores named in --score-columns (json sources: every number)

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.fs, self.root = fsspec.core.url_to_fs(cfg.path)

    @abstractmethod
    def list_shards(self) -> list[InputShard]:
        """The input shards, in a deterministic order; each becomes one output shard."""

    @abstractmethod
    def iter_samples(self, shard: InputShard, need_caption: bool) -> Iterator[RawSample]:
        """Every sample of one input shard, in order, with an `error` for the unusable ones (never raises for bad
        data)."""

    def walk(self) -> list[str]:
        """Every entry below the root (files, folders, links; links to folders are not followed), relative to it:
        what `pathlib.Path.rglob("*")` lists."""
        found = self.fs.find(self.root, withdirs=True) if self.fs.isdir(self.root) else []
        return [posixpath.relpath(p, self.root) for p in found if p.rstrip("/") != self.root.rstrip("/")]

    def shard_per_file(self, suffix: str) -> list[InputShard]:
        """One shard per file named `*<suffix>` below the root (sorted as paths, by their parts), or the root itself
        when it is a file; named by the path without its suffix, `/` written `__`."""
        if self.fs.isfile(self.root):
            return [InputShard(self.root, str(PurePosixPath(posixpath.basename(self.root)).with_suffix("")))]
        found = sorted((r for r in self.walk() if posixpath.basename(r).endswith(suffix)), key=lambda r: r.split("/"))
        stems = [str(PurePosixPath(r).with_suffix("")).replace("/", "__") for r in found]
        return [InputShard(posixpath.join(self.root, r), s) for r, s in zip(found, stems, strict=True)]


def open_source(cfg: SourceConfig) -> Source:
    return SOURCES.get(cfg.kind)(cfg)


def list_shards(cfg: SourceConfig) -> list[InputShard]:
    """The input shards of a source, in a deterministic order."""
    shards = open_source(cfg).list_shards()
    if not shards:
        raise ValueError(f"no input found for source {cfg.kind} at {cfg.path}")
    return shards


def iter_samples(shard: InputShard, cfg: SourceConfig, need_caption: bool = True) -> Iterator[RawSample]:
    """Every sample of one input shard, in order, with an `error` for the unusable ones."""
    return open_source(cfg).iter_samples(shard, need_caption)


SOURCES: Registry[type[Source]] = Registry("--source")
SOURCES.register("wds", "data_pipeline.sources.wds:WebDatasetSource")
SOURCES.register("parquet", "data_pipeline.sources.parquet:ParquetSource")
SOURCES.register("folder", "data_pipeline.sources.folders:FolderSource")
SOURCES.register("imagenet", "data_pipeline.sources.folders:ImageNetSource")
