"""Input sources for tokenization: webdataset tars, parquet files, image folders with sidecar captions, and
ImageNet-style class folders. Each source is cut into input shards; each input shard becomes one output shard.

Reading never raises for bad data: a sample that cannot be read comes out with an `error` reason
(unsafe_path, missing_image, missing_caption, multiple_images, duplicate_key, member_too_large, unreadable_shard,
truncated_shard, ...), to be counted. Memory per sample is bounded: compressed tars are decompressed as a stream,
and a member, parquet cell or file over `max_member_bytes` is never read (its sample: member_too_large). Tar members
are read in memory and never extracted, and a member name that is absolute or contains `..` is rejected as
unsafe_path. In a tar, a key seen before (a member whose extension the current sample
already has starts a new sample with the same key) is a duplicate_key; a sample with two images (`.jpg` and `.png`)
is multiple_images; a tar that ends without its end-of-archive marker (cut, possibly at a member boundary) adds one
truncated_shard for the members it lost. An empty caption (an empty `.txt`, `""` in the json or parquet column) is
a valid unconditional sample: kept, with the note empty_caption; missing_caption means no caption at all.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import lzma
import math
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

SOURCE_KINDS = ("wds", "parquet", "folder", "imagenet")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
USED_EXTS = (*IMAGE_EXTS, "txt", "json", "cls")  # tar members of other kinds are listed, never read
CAPTION_KEYS = ("caption", "text", "prompt", "txt")
DEFAULT_MAX_MEMBER_BYTES = 128 * 2**20  # one image file (tar member, parquet cell, file) larger than this is skipped


@dataclass(frozen=True)
class InputShard:
    kind: str
    path: str  # tar / parquet file, or the folder root
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
    kind: str
    path: str
    samples_per_shard: int = 1000  # folder / imagenet sources
    image_column: str = "image"  # parquet
    caption_column: str = "caption"  # parquet
    score_columns: tuple[str, ...] = ()  # parquet: numeric columns carried as scores (json sources: every number)
    class_index: str | None = None  # imagenet: json {"0": ["n01440764", "tench"], ...} or one wnid per line
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # larger members / cells / files: member_too_large, never read

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"unknown source kind {self.kind!r}; choose one of {SOURCE_KINDS}")
        if not Path(self.path).exists():
            raise FileNotFoundError(f"input {self.path} does not exist")


def _chunks(kind: str, root: Path, files: list[str], per_shard: int) -> list[InputShard]:
    return [
        InputShard(kind, str(root), f"{kind}-{i // per_shard:06d}", tuple(files[i : i + per_shard]))
        for i in range(0, len(files), per_shard)
    ]


def list_shards(cfg: SourceConfig) -> list[InputShard]:
    """The input shards of a source, in a deterministic order."""
    root = Path(cfg.path)
    if cfg.kind in ("wds", "parquet"):
        ext = ".tar" if cfg.kind == "wds" else ".parquet"
        files = [root] if root.is_file() else sorted(root.rglob(f"*{ext}"))
        stems = [str(f.relative_to(root if root.is_dir() else root.parent).with_suffix("")) for f in files]
        shards = [InputShard(cfg.kind, str(f), s.replace("/", "__")) for f, s in zip(files, stems, strict=True)]
    elif cfg.kind == "folder":
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if _ext(p.name) in IMAGE_EXTS)
        shards = _chunks("folder", root, files, cfg.samples_per_shard)
    else:
        files = sorted(str(p.relative_to(root)) for p in root.glob("*/*") if _ext(p.name) in IMAGE_EXTS)
        shards = _chunks("imagenet", root, files, cfg.samples_per_shard)
    if not shards:
        raise ValueError(f"no input found for source {cfg.kind} at {cfg.path}")
    return shards


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def class_index(cfg: SourceConfig) -> dict[str, tuple[int, str]]:
    """wnid -> (label, class name). Without an index file: sorted folder names, named by themselves."""
    if cfg.class_index is None:
        names = sorted(p.name for p in Path(cfg.path).iterdir() if p.is_dir())
        return {n: (i, n) for i, n in enumerate(names)}
    text = Path(cfg.class_index).read_text()
    if cfg.class_index.endswith(".json"):
        return {v[0]: (int(k), v[1]) for k, v in json.loads(text).items()}
    return {line.split()[0]: (i, line.split()[0]) for i, line in enumerate(l for l in text.splitlines() if l.strip())}


def _caption_from_json(raw: bytes) -> tuple[str | None, int | None, dict[str, float]]:
    """(caption, class label, scores: the json's other top-level numbers, e.g. an aesthetic or CLIP score)."""
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, None, {}
    if not isinstance(meta, dict):
        return None, None, {}
    caption = next((meta[k] for k in CAPTION_KEYS if isinstance(meta.get(k), str)), None)
    label = meta.get("label", meta.get("cls"))
    scores = {
        k: float(v)
        for k, v in meta.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("label", "cls") and math.isfinite(v)
    }
    return caption, label if isinstance(label, int) else None, scores


@dataclass(frozen=True)
class Oversize:
    """A member too large to read (`max_member_bytes`): its sample is skipped as member_too_large."""

    detail: str


def _finish(key: str, parts: dict[str, bytes | Oversize], need_caption: bool, duplicate: bool = False) -> RawSample:
    big = [v.detail for v in parts.values() if isinstance(v, Oversize)]
    if big:
        return RawSample(key, error="member_too_large", detail=big[0])
    if duplicate:
        return RawSample(key, error="duplicate_key", detail=f"key seen before in this shard; members: {sorted(parts)}")
    images = [e for e in IMAGE_EXTS if e in parts]
    if len(images) > 1:
        return RawSample(key, error="multiple_images", detail=f"members: {sorted(parts)}; keep one image per key")
    image = parts[images[0]] if images else None
    caption, label, scores = (None, None, {})
    if "json" in parts:
        caption, label, scores = _caption_from_json(parts["json"])
    if "txt" in parts:
        caption = parts["txt"].decode("utf-8", errors="replace").strip()
    if "cls" in parts:
        try:
            label = int(parts["cls"].decode().strip())
        except ValueError:
            pass
    if image is None:
        return RawSample(key, error="missing_image", detail=f"members: {sorted(parts)}")
    if need_caption and caption is None:
        return RawSample(key, error="missing_caption", detail=f"members: {sorted(parts)}")
    return _captioned(key, image, caption, label, need_caption, scores)


def _captioned(
    key: str, image: bytes, caption: str | None, label: int | None, need_caption: bool, scores: dict | None = None
) -> RawSample:
    """A usable sample; an empty caption is kept (an unconditional sample) and noted as empty_caption."""
    caption = (caption or "").strip()
    note = "empty_caption" if need_caption and not caption else None
    return RawSample(key, image=image, caption=caption, label=label, note=note, scores=scores or {})


def _unsafe(name: str) -> bool:
    """Absolute, parent-relative, Windows-drive or empty member names."""
    p = PurePosixPath(name)
    if not p.parts or p.is_absolute() or name.startswith("\\"):
        return True
    return ".." in p.parts or ":" in p.parts[0]


class _EndAwareTarInfo(tarfile.TarInfo):
    """Marks its TarFile when the archive ends with the end-of-archive (zero) block: a tar cut at a member boundary
    otherwise reads as a shorter, complete one."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.bitdance_clean_end = True
            raise


COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}
STREAM_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


@contextlib.contextmanager
def _tar_stream(path: str):
    """The tar of `path` read as a stream, decompressed (gzip, bz2, xz: by magic bytes, whatever the name) by the
    standard library's file readers, which bound each read's output: skipping a huge member costs time linear in its
    size and no memory (tarfile's own "r|*" decompression re-slices a growing buffer: quadratic on a gzip bomb)."""
    with open(path, "rb") as raw:
        head = raw.read(6)
    opener = next((fn for magic, fn in COMPRESSED.items() if head.startswith(magic)), None)
    with opener(path, "rb") if opener else open(path, "rb") as f:
        with tarfile.open(fileobj=f, mode="r|", tarinfo=_EndAwareTarInfo, bufsize=1 << 20) as tar:
            yield tar


def iter_wds(
    shard: InputShard, need_caption: bool, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[RawSample]:
    """Samples of one webdataset tar: members grouped by key (the name up to the basename's first dot). Decompression
    streams; only members of USED_EXTS up to `max_member_bytes` are read into memory."""
    key, parts, seen, duplicate = None, {}, set(), False
    try:
        with _tar_stream(shard.path) as tar:
            for info in tar:
                if _unsafe(info.name):
                    yield RawSample(f"{shard.name}/{info.name}", error="unsafe_path", detail=info.name)
                    continue
                if not info.isfile():
                    continue
                folder, _, base = info.name.rpartition("/")
                stem, _, ext = base.partition(".")
                k, ext = (f"{folder}/{stem}" if folder else stem), ext.lower()
                if key is not None and (k != key or ext in parts):  # a new sample (maybe with the same key)
                    yield _finish(key, parts, need_caption, duplicate)
                    parts = {}
                if not parts:
                    duplicate = k in seen
                    seen.add(k)
                key = k
                if ext in USED_EXTS and info.size > max_member_bytes:  # skipped over in the stream, never read
                    parts[ext] = Oversize(f"{info.name}: {info.size} bytes > {max_member_bytes}")
                else:
                    parts[ext] = tar.extractfile(info).read() if ext in USED_EXTS else b""
            clean = getattr(tar, "bitdance_clean_end", False)
    except STREAM_ERRORS as e:
        if key is None:
            yield RawSample(shard.name, error="unreadable_shard", detail=f"{type(e).__name__}: {e}")
            return
        yield RawSample(f"{key}#rest", error="truncated_shard", detail=f"{type(e).__name__}: {e}")
        return  # the partially read sample is dropped with the rest of the shard
    if key is not None:
        yield _finish(key, parts, need_caption, duplicate)
    if not clean:
        detail = "no end-of-archive marker: the tar was cut, members after the last one read are lost"
        yield RawSample(f"{shard.name}#end", error="truncated_shard", detail=detail)


def iter_parquet(shard: InputShard, cfg: SourceConfig) -> Iterator[RawSample]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(shard.path)
        columns = [cfg.image_column, cfg.caption_column, *cfg.score_columns]
        missing = set(columns) - set(pf.schema_arrow.names)
        if missing:
            have = pf.schema_arrow.names
            raise ValueError(
                f"columns {sorted(missing)} not in {have}; set --image-column/--caption-column/--score-columns"
            )
        row = 0
        for batch in pf.iter_batches(columns=columns, batch_size=256):
            cells = [batch.column(i).to_pylist() for i in range(len(columns))]
            for image, caption, *numbers in zip(*cells, strict=True):
                if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
                    image = image.get("bytes")
                key = f"{shard.name}/{row:08d}"
                row += 1
                if not image:
                    yield RawSample(key, error="missing_image")
                elif len(image) > cfg.max_member_bytes:
                    yield RawSample(
                        key, error="member_too_large", detail=f"{len(image)} bytes > {cfg.max_member_bytes}"
                    )
                elif caption is None:
                    yield RawSample(key, error="missing_caption")
                else:
                    scores = {c: float(v) for c, v in zip(cfg.score_columns, numbers, strict=True) if v is not None}
                    yield _captioned(key, image, str(caption), None, True, scores)
    except (OSError, ValueError) as e:
        yield RawSample(shard.name, error="unreadable_shard", detail=f"{type(e).__name__}: {e}")


def _sidecar_caption(image_path: Path) -> tuple[str | None, dict[str, float]]:
    """(caption, scores) from the .txt or .json beside an image (scores: the json's numbers)."""
    js = image_path.with_suffix(".json")
    caption, _, scores = _caption_from_json(js.read_bytes()) if js.is_file() else (None, None, {})
    txt = image_path.with_suffix(".txt")
    if txt.is_file():
        caption = txt.read_text(errors="replace").strip()
    return caption, scores


def iter_files(
    shard: InputShard, classes: dict[str, tuple[int, str]] | None, max_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[RawSample]:
    root = Path(shard.path)
    for rel in shard.files:
        path = root / rel
        try:
            if path.stat().st_size > max_bytes:
                detail = f"{path.stat().st_size} bytes > {max_bytes}"
                yield RawSample(rel, error="member_too_large", detail=detail)
                continue
            data = path.read_bytes()
        except OSError as e:
            yield RawSample(rel, error="unreadable_file", detail=str(e))
            continue
        if classes is None:
            caption, scores = _sidecar_caption(path)
            if caption is None:
                yield RawSample(rel, error="missing_caption", detail="no .txt or .json caption beside the image")
            else:
                yield _captioned(rel, data, caption, None, True, scores)
            continue
        wnid = Path(rel).parts[0]
        if wnid not in classes:
            yield RawSample(rel, error="unknown_class", detail=wnid)
            continue
        label, name = classes[wnid]
        yield RawSample(rel, image=data, caption=name, label=label)


def iter_samples(shard: InputShard, cfg: SourceConfig, need_caption: bool = True) -> Iterator[RawSample]:
    """Every sample of one input shard, in order, with an `error` for the unusable ones."""
    if shard.kind == "wds":
        yield from iter_wds(shard, need_caption, cfg.max_member_bytes)
    elif shard.kind == "parquet":
        yield from iter_parquet(shard, cfg)
    elif shard.kind == "folder":
        yield from iter_files(shard, None, cfg.max_member_bytes)
    else:
        yield from iter_files(shard, class_index(cfg), cfg.max_member_bytes)
