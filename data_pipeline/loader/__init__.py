"""The training data loader: an endless, deterministic, resumable stream of batches over a tokenized dataset, or over a
weighted mixture of them.

A dataset folder (local, or at an fsspec URL such as s3://bucket/tokens) holds webdataset shards `*.tar` and
`manifest.json` (format: `data_pipeline.shard_format`). Each (data-parallel rank, DataLoader worker) pair is one *slot*
among S = world_size * max(1, num_workers); the slots see disjoint samples whose union is the dataset, and streams
never end: each slot moves on to the next epoch.

    settings.py     LoaderSettings (training's data.*), SubsetConfig, MixtureSource, LoaderConfig, BATCHINGS registry
    dataset.py      the per-slot sample streams: epochs, shard assignment, shuffle buffer, subset, mixing
    shard_store.py  where the bytes come from: a local folder in place, or a URL through a bounded node-local cache
    mixture.py      weighted mixtures: the per-sample source draw, weight stages, the sources' compatibility
    batching.py     one batching per kind: T2I packed rows, ImageNet fixed-size batches
    packing.py      the stream algorithms: shuffle buffer, best-fit subset sums, greedy rows, batches
    token_ids.py    the manifest's special-token ids (T2I)
    loader.py       BinaryTokenLoader: DataLoader iteration, stats, exact resumption by replay
    resize.py       resuming at another world size or worker count: no sample of an epoch lost or seen twice
"""

from data_pipeline.loader.dataset import ShardMismatch
from data_pipeline.loader.loader import BinaryTokenLoader
from data_pipeline.loader.mixture import data_manifest
from data_pipeline.loader.settings import LoaderConfig, LoaderError, LoaderSettings, MixtureSource, SubsetConfig

__all__ = [
    "BinaryTokenLoader",
    "LoaderConfig",
    "LoaderError",
    "LoaderSettings",
    "MixtureSource",
    "ShardMismatch",
    "SubsetConfig",
    "data_manifest",
]
