"""Input sources for tokenization: webdataset tars, parquet files, image folders with sidecar captions, and
ImageNet-style class folders, each a `Source` class registered in `SOURCES` (`--source`; a new source is one module
plus one `SOURCES.register` line). Each source is cut into input shards; each input shard becomes one output shard.
Every file access goes through fsspec, so inputs may be local paths or URLs of any filesystem fsspec knows.

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

from data_pipeline.sources.base import (
    DEFAULT_MAX_MEMBER_BYTES,
    SOURCES,
    InputShard,
    RawSample,
    Source,
    SourceConfig,
    iter_samples,
    list_shards,
    open_source,
)

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
    "SOURCES",
    "InputShard",
    "RawSample",
    "Source",
    "SourceConfig",
    "iter_samples",
    "list_shards",
    "open_source",
]
