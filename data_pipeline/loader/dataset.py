"""`BinaryTokenDataset`: the batches of one (rank, DataLoader worker) slot over a tokenized dataset, endless and
replayable. Per epoch the shard list is shuffled with (seed, epoch); with at least S slots slot s reads shards
s, s + S, ...; otherwise every slot reads all shards and keeps the samples whose running index i has i % S == s.
A seeded shuffle buffer per (seed, epoch, slot) and the configured subset follow, then the kind's batching."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.loader.batching import MAX_SKIPPED_IN_A_ROW, Batch, Counters, Item, Plan
from data_pipeline.loader.packing import seed_of, shuffle_buffer
from data_pipeline.loader.resize import SampleKey, StreamOrigin, inherited
from data_pipeline.loader.settings import BATCHINGS, LoaderConfig, LoaderError
from data_pipeline.shard_format import load_manifest, record_from_members

MAX_EMPTY_EPOCHS = 100  # consecutive epochs without a sample for one slot before giving up


class ShardMismatch(LoaderError):
    """A shard holds another number of samples than the manifest lists."""


@dataclass
class BatchInfo:
    counters: dict[str, int]
    keys: list[SampleKey] | None
    epoch: int  # the latest epoch of a sample in the batch


def dataset_fingerprint(manifest: dict) -> str:
    """A short hash of what the dataset holds: kind, bits per token and the shard list."""
    shards = sorted((s["name"], s["samples"], s.get("tokens")) for s in manifest["shards"])
    desc = {"kind": manifest.get("kind"), "bits_per_token": manifest.get("bits_per_token"), "shards": shards}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def epoch_assignment(shards: list[str], seed: int, epoch: int, slot: int, slots: int) -> tuple[list[str], bool]:
    """(shards slot `slot` reads in `epoch`, whether it keeps only running indices i with i % slots == slot)."""
    order = sorted(shards)
    random.Random(seed_of("shards", seed, epoch)).shuffle(order)
    if len(order) >= slots:
        return order[slot::slots], False
    return order, True


class BinaryTokenDataset(IterableDataset):
    """Endless batches of one slot per DataLoader worker; `start_batch` (set by `BinaryTokenLoader`) is the number
    of batches of the whole loader already consumed, which this dataset replays silently. Yields (batch, info)."""

    def __init__(self, cfg: LoaderConfig, rank: int, world_size: int):
        super().__init__()
        manifest = load_manifest(Path(cfg.data_dir))
        if manifest.get("kind") != cfg.kind:
            raise ValueError(f"{cfg.data_dir} holds {manifest.get('kind')!r} data but the loader is for {cfg.kind!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.workers = max(1, cfg.num_workers)
        self.slots = world_size * self.workers
        self.fingerprint = dataset_fingerprint(manifest)
        self.shards = [str(Path(cfg.data_dir) / s["name"]) for s in manifest["shards"]]
        self.listed = {str(Path(cfg.data_dir) / s["name"]): int(s["samples"]) for s in manifest["shards"]}
        self._check_shards(manifest)
        self.batching = BATCHINGS.get(cfg.kind)(cfg, manifest)
        self.start_batch = 0
        self.origin: StreamOrigin | None = None  # set when the run was resized from another layout

    def _check_shards(self, manifest: dict) -> None:
        missing = [p for p in self.shards if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}")
        total = sum(int(s["samples"]) for s in manifest["shards"])
        if total < self.slots:
            raise ValueError(f"{total} samples cannot feed {self.slots} slots (world_size x num_workers)")

    # ---- per-slot sample stream ----

    def _read(self, urls: list[str], stride: bool, epoch: int, slot: int) -> Iterator[Item]:
        """The samples of `urls` in order (every `slots`-th one with `stride`); each shard must hold the number of
        samples its manifest lists (ShardMismatch otherwise, once the shard is read)."""
        i = 0
        for url in urls:
            n = 0
            for s in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
                n += 1
                i += 1
                if stride and (i - 1) % self.slots != slot:
                    continue
                bits = bytearray(s["bits"])  # writable, so torch.from_numpy in TokenRecord.grid() does not warn
                yield Item(epoch, record_from_members(s["__key__"], bits, s["json"]))
            if n != self.listed[url]:
                raise ShardMismatch(
                    f"shard {url} holds {n} samples but {Path(self.cfg.data_dir) / 'manifest.json'} lists "
                    f"{self.listed[url]}: the shard is damaged or was replaced; re-tokenize it (delete it and its "
                    ".stats.json, rerun data_pipeline.tokenize)"
                )

    def items(self, slot: int) -> Iterator[Item]:
        """The endless, shuffled sample stream of one slot, epoch after epoch (after its share of what the previous
        layout had not consumed, when the run was resized)."""
        empty, start = 0, 0
        if self.origin is not None:
            yield from inherited(self, slot)
            start = self.origin.max_epoch + 1
        for epoch in itertools.count(start):
            urls, stride = epoch_assignment(self.shards, self.cfg.seed, epoch, slot, self.slots)
            rng = random.Random(seed_of("buffer", self.cfg.seed, epoch, slot))
            n = 0
            for item in shuffle_buffer(self._read(urls, stride, epoch, slot), self.cfg.shuffle_buffer, rng):
                n += 1
                yield item
            empty = 0 if n else empty + 1
            if empty >= MAX_EMPTY_EPOCHS:
                raise RuntimeError(f"slot {slot} read no sample in {empty} consecutive epochs; are the shards empty?")

    def _selected(self, items: Iterator[Item], counters: Counters) -> Iterator[Item]:
        """The items the configured subset keeps; the others are counted. A subset that keeps nothing is an error."""
        subset = self.cfg.subset
        if not subset.active:
            yield from items
            return
        in_a_row = 0
        for item in items:
            if subset.keeps(item.record):
                in_a_row = 0
                yield item
                continue
            counters.filtered_out += 1
            in_a_row += 1
            if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise LoaderError(
                    f"data.subset ({asdict(subset)}) kept none of the last {in_a_row} samples of {self.cfg.data_dir}; "
                    "loosen it"
                )

    def held_out_plans(self, limit: int, counters: Counters) -> list[Plan]:
        """Every sample once, in manifest order, unshuffled (the first `limit` the subset keeps; 0: all), planned into
        batches by the kind's batching: the fixed set a validation reads (`training.validation`)."""
        items = self._selected(self._read(self.shards, False, 0, 0), counters)
        return list(self.batching.plans(itertools.islice(items, limit or None), 0, counters))

    # ---- batches ----

    def plans(self, slot: int, counters: Counters) -> Iterator[Plan]:
        """The batches of a slot as rows of items (no tensors)."""
        return self.batching.plans(self._selected(self.items(slot), counters), slot, counters)

    def slot_batches(self, logical_worker: int, skip: int = 0) -> Iterator[tuple[Batch, BatchInfo]]:
        """Batches of (this rank, `logical_worker`), after silently replaying the first `skip` of them."""
        slot = self.rank * self.workers + logical_worker
        counters = Counters()
        for i, rows in enumerate(self.plans(slot, counters)):
            delta = counters.take()
            if i < skip:
                continue
            keys = [(x.epoch, x.record.key) for row in rows for x in row] if self.cfg.debug_keys else None
            epoch = max(x.epoch for row in rows for x in row)
            yield self.batching.build(rows), BatchInfo(delta, keys, epoch)

    def __iter__(self) -> Iterator[tuple[Batch, BatchInfo]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"dataset built for {self.workers} workers runs under {info.num_workers}")
        n = self.start_batch
        logical = (worker + n) % self.workers  # this iterator's first batch is global batch n
        skip = n // self.workers + (1 if logical < n % self.workers else 0)
        return self.slot_batches(logical, skip)
