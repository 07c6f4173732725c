"""A toy data source, written the way a new source is added: one module with a `Source` subclass (what lists the input
shards, what reads a shard's samples, all through its fsspec filesystem `self.fs`); the test registers it with one
line, `SOURCES.register("toy", "helpers.toys.toy_source:CaptionListSource")`.

The format: `*.tsv` files, each line `<image path relative to the file>\\t<caption>`; one tsv file is one shard."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

from data_pipeline.sources import InputShard, RawSample, Source


class CaptionListSource(Source):
    looks_for = ".tsv caption lists"

    def list_shards(self) -> list[InputShard]:
        return self.shard_per_file(".tsv")

    def iter_samples(self, shard: InputShard, need_caption: bool) -> Iterator[RawSample]:
        folder = posixpath.dirname(shard.path)
        for line in self.fs.cat_file(shard.path).decode().splitlines():
            image, _, caption = line.partition("\t")
            try:
                data = self.fs.cat_file(posixpath.join(folder, image))
            except OSError as e:
                yield RawSample(image, error="unreadable_file", detail=str(e))
                continue
            yield RawSample(image, image=data, caption=caption)
