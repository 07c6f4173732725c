"""Image files in a folder tree: `--source folder` (captions from a `.txt` or `.json` beside each image) and
`--source imagenet` (class folders `<wnid>/<image>`, labelled by a class index). Shards are runs of
`samples_per_shard` images in sorted order."""

from __future__ import annotations

import functools
import json
import posixpath
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import PurePosixPath

import fsspec

from data_pipeline.sources.base import InputShard, RawSample, Source
from data_pipeline.sources.samples import caption_from_json, captioned, is_image


class ImageFiles(Source):
    """Reads a shard's image files (bounded by `max_member_bytes`); `sample` makes the sample of one file."""

    looks_for = "images"
    prefix: str  # output shard names: <prefix>-000000, ...

    @abstractmethod
    def sample(self, rel: str, path: str, image: bytes) -> RawSample:
        """The sample of the image file `path` (`rel`: its path relative to the shard's folder, the sample key)."""

    def chunked(self, files: list[str]) -> list[InputShard]:
        n = self.cfg.samples_per_shard
        chunks = [tuple(files[i : i + n]) for i in range(0, len(files), n)]
        return [InputShard(self.root, f"{self.prefix}-{i:06d}", chunk) for i, chunk in enumerate(chunks)]

    def iter_samples(self, shard: InputShard, need_caption: bool) -> Iterator[RawSample]:
        max_bytes = self.cfg.max_member_bytes
        for rel in shard.files:
            path = posixpath.join(shard.path, rel)
            try:
                size = self.fs.size(path)
                if size > max_bytes:
                    yield RawSample(rel, error="member_too_large", detail=f"{size} bytes > {max_bytes}")
                    continue
                data = self.fs.cat_file(path)
            except OSError as e:
                yield RawSample(rel, error="unreadable_file", detail=str(e))
                continue
            yield self.sample(rel, path, data)


class FolderSource(ImageFiles):
    prefix = "folder"

    def list_shards(self) -> list[InputShard]:
        return self.chunked(sorted(r for r in self.walk() if is_image(posixpath.basename(r))))

    def sample(self, rel: str, path: str, image: bytes) -> RawSample:
        caption, scores = self._sidecar_caption(path)
        if caption is None:
            return RawSample(rel, error="missing_caption", detail="no .txt or .json caption beside the image")
        return captioned(rel, image, caption, None, True, scores)

    def _sidecar_caption(self, image_path: str) -> tuple[str | None, dict[str, float]]:
        """(caption, scores) from the .txt or .json beside an image (scores: the json's numbers)."""
        js = str(PurePosixPath(image_path).with_suffix(".json"))
        caption, _, scores = caption_from_json(self.fs.cat_file(js)) if self.fs.isfile(js) else (None, None, {})
        txt = str(PurePosixPath(image_path).with_suffix(".txt"))
        if self.fs.isfile(txt):
            with self.fs.open(txt, "r", errors="replace") as f:
                caption = f.read().strip()
        return caption, scores


class ImageNetSource(ImageFiles):
    prefix = "imagenet"

    def _class_dirs(self) -> list[str]:
        return [d for d in self.fs.ls(self.root, detail=False) if self.fs.isdir(d)]

    def list_shards(self) -> list[InputShard]:
        files = [f for d in self._class_dirs() for f in self.fs.ls(d, detail=False)]
        images = [f for f in files if is_image(posixpath.basename(f))]
        return self.chunked(sorted(posixpath.relpath(f, self.root) for f in images))

    @functools.cached_property
    def classes(self) -> dict[str, tuple[int, str]]:
        """wnid -> (label, class name). Without an index file: sorted folder names, named by themselves."""
        if self.cfg.class_index is None:
            names = sorted(posixpath.basename(d.rstrip("/")) for d in self._class_dirs())
            return {n: (i, n) for i, n in enumerate(names)}
        fs, path = fsspec.core.url_to_fs(self.cfg.class_index)
        with fs.open(path, "r") as f:
            text = f.read()
        if self.cfg.class_index.endswith(".json"):
            return {v[0]: (int(k), v[1]) for k, v in json.loads(text).items()}
        lines = [line for line in text.splitlines() if line.strip()]
        return {line.split()[0]: (i, line.split()[0]) for i, line in enumerate(lines)}

    def sample(self, rel: str, path: str, image: bytes) -> RawSample:
        wnid = PurePosixPath(rel).parts[0]
        if wnid not in self.classes:
            return RawSample(rel, error="unknown_class", detail=wnid)
        label, name = self.classes[wnid]
        return RawSample(rel, image=image, caption=name, label=label)
