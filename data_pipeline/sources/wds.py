"""Webdataset tars (`--source wds`): one shard per `.tar` (plain, gzip, bz2 or xz), its members grouped into samples
by key, read as a stream in bounded memory and never extracted."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from data_pipeline.sources.base import InputShard, RawSample, Source
from data_pipeline.sources.samples import IMAGE_EXTS, caption_from_json, captioned

USED_EXTS = (*IMAGE_EXTS, "txt", "json", "cls")  # tar members of other kinds are listed, never read
COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}
STREAM_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


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
        caption, label, scores = caption_from_json(parts["json"])
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
    return captioned(key, image, caption, label, need_caption, scores)


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


class WebDatasetSource(Source):
    looks_for = ".tar files"

    def list_shards(self) -> list[InputShard]:
        return self.shard_per_file(".tar")

    @contextlib.contextmanager
    def _tar_stream(self, path: str):
        """The tar of `path` read as a stream, decompressed (gzip, bz2, xz: by magic bytes, whatever the name) by the
        standard library's file readers, which bound each read's output: skipping a huge member costs time linear in
        its size and no memory (tarfile's own "r|*" decompression re-slices a growing buffer: quadratic on a gzip
        bomb)."""
        with self.fs.open(path, "rb") as raw:
            head = raw.read(6)
            raw.seek(0)
            opener = next((fn for magic, fn in COMPRESSED.items() if head.startswith(magic)), None)
            with opener(raw, "rb") if opener else contextlib.nullcontext(raw) as f:
                with tarfile.open(fileobj=f, mode="r|", tarinfo=_EndAwareTarInfo, bufsize=1 << 20) as tar:
                    yield tar

    def iter_samples(self, shard: InputShard, need_caption: bool) -> Iterator[RawSample]:
        """Members grouped by key (the name up to the basename's first dot). Decompression streams; only members of
        USED_EXTS up to `max_member_bytes` are read into memory."""
        max_member_bytes = self.cfg.max_member_bytes
        key, parts, seen, duplicate = None, {}, set(), False
        try:
            with self._tar_stream(shard.path) as tar:
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
