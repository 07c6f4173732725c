"""`BinaryTokenDataset`: the batches of one (rank, DataLoader worker) slot over a tokenized dataset, or a weighted
mixture of them (`data_pipeline.loader.mixture`), endless and replayable.

Each dataset (`TokenSource`: a local folder or a URL, read through `data_pipeline.loader.shard_store`) has its own
per-slot stream: per epoch its shard list is shuffled with (seed, epoch); with at least S slots slot s reads shards
s, s + S, ...; otherwise every slot reads all shards and keeps the samples whose running index i has i % S == s. A
seeded shuffle buffer per (seed, epoch, slot) and the configured subset follow. A mixture draws the source of each of
the slot's samples and takes that source's next sample; then the kind's batching plans and builds the batches."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipeline.loader.batching import MAX_SKIPPED_IN_A_ROW, Batch, Counters, Item, Plan
from data_pipeline.loader.mixture import (
    check_compatible,
    draw,
    merged_manifest,
    mixture_fingerprint,
    mixture_offset,
    normalized,
    slot_stages,
)
from data_pipeline.loader.packing import seed_of, shuffle_buffer
from data_pipeline.loader.resize import SampleKey, StreamOrigin, inherited
from data_pipeline.loader.settings import BATCHINGS, LoaderConfig, LoaderError, MixtureSource
from data_pipeline.loader.shard_store import ShardStore
from data_pipeline.shard_format import MANIFEST, record_from_members

MAX_EMPTY_EPOCHS = 100  # consecutive epochs without a sample for one slot before giving up


class ShardMismatch(LoaderError):
    """A shard holds another number of samples than the manifest lists."""


@dataclass
class BatchInfo:
    counters: dict[str, int]
    keys: list[SampleKey] | None
    epoch: int  # the latest epoch of a sample in the batch
    sources: list[tuple[int, int, int]] = field(default_factory=list)  # per source: (samples, tokens, latest epoch)
    draws: list[int] | None = None  # a mixture's samples drawn per source by the slot so far (lookahead included)
    cache: dict[str, int] = field(default_factory=dict)  # the process's shard cache counts since the last batch


def dataset_fingerprint(manifest: dict) -> str:
    """A short hash of what the dataset holds: kind, bits per token and the shard list (not where it is stored)."""
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


class TokenSource:
    """One tokenized dataset the loader reads: its store, manifest and shard list (shard names, in manifest order)."""

    def __init__(self, spec: MixtureSource, cfg: LoaderConfig):
        self.name, self.dir = spec.label, str(spec.dir)
        self.store = ShardStore(spec.dir, cfg)
        self.manifest = self.store.manifest()
        self.shards = [s["name"] for s in self.manifest["shards"]]
        self.listed = {s["name"]: int(s["samples"]) for s in self.manifest["shards"]}
        self.samples = sum(self.listed.values())
        self.fingerprint = dataset_fingerprint(self.manifest)
        missing = self.store.missing(self.shards)
        if missing:
            where = self.store.describe(missing[0])
            raise FileNotFoundError(f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {where}")

    def read(
        self, index: int, names: list[str], stride: bool, epoch: int, slot: int, slots: int, upcoming: list[str] = ()
    ) -> Iterator[Item]:
        """The samples of shards `names` in order (every `slots`-th one with `stride`), the next shards (then
        `upcoming`) fetched ahead; each shard must hold the number of samples its manifest lists (ShardMismatch
        otherwise, once the shard is read)."""
        i, ahead = 0, self.store.prefetch_n
        for k, name in enumerate(names):
            self.store.prefetch([*names[k : k + 1 + ahead], *upcoming[:ahead]])
            n = 0
            with self.store.open(name) as f:
                for s in group_by_keys(tar_file_expander([{"url": self.store.describe(name), "stream": f}])):
                    n += 1
                    i += 1
                    if stride and (i - 1) % slots != slot:
                        continue
                    bits = bytearray(s["bits"])  # writable, so torch.from_numpy in TokenRecord.grid() does not warn
                    yield Item(epoch, record_from_members(s["__key__"], bits, s["json"]), source=index)
            if n != self.listed[name]:
                raise ShardMismatch(
                    f"shard {self.store.describe(name)} holds {n} samples but {self.store.describe(MANIFEST)} lists "
                    f"{self.listed[name]}: the shard is damaged or was replaced; re-tokenize it (delete it and its "
                    ".stats.json, rerun data_pipeline.tokenize)"
                )


class BinaryTokenDataset(IterableDataset):
    """Endless batches of one slot per DataLoader worker; `start_batch` (set by `BinaryTokenLoader`) is the number
    of batches of the whole loader already consumed, which this dataset replays silently. Yields (batch, info)."""

    def __init__(self, cfg: LoaderConfig, rank: int, world_size: int):
        super().__init__()
        specs = cfg.datasets()
        self.sources = [TokenSource(spec, cfg) for spec in specs]
        manifests = [s.manifest for s in self.sources]
        if manifests[0].get("kind") != cfg.kind:
            got = manifests[0].get("kind")
            raise ValueError(f"{specs[0].dir} holds {got!r} data but the loader is for {cfg.kind!r}")
        check_compatible(manifests, [s.name for s in self.sources])
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.workers = max(1, cfg.num_workers)
        self.slots = world_size * self.workers
        self.fingerprint = mixture_fingerprint([s.fingerprint for s in self.sources])
        for spec, source in zip(specs, self.sources, strict=True):
            if spec.weight > 0 and source.samples < self.slots:
                raise ValueError(
                    f"{source.samples} samples of {source.dir} cannot feed {self.slots} slots "
                    "(world_size x num_workers)"
                )
        self.batching = BATCHINGS.get(cfg.kind)(cfg, merged_manifest(manifests))
        self.weights = normalized([s.weight for s in specs])
        self.stages: list[tuple[int, list[float]]] = [(0, self.weights)]  # mixture weight stages (the loader's state)
        self.start_batch = 0
        self.origin: StreamOrigin | None = None  # set when the run was resized from another layout
        self.expected_draws: dict[int, list[int]] | None = None  # a resumed mixture's draws, checked by the replay
        self.placed: dict = {}  # resize: what each previous slot had placed, per source, until every source took it

    @property
    def mixture(self) -> bool:
        return len(self.sources) > 1

    def sample_key(self, item: Item) -> SampleKey:
        """(epoch, key), the key prefixed with its source's name in a mixture (keys may repeat across datasets)."""
        return (item.epoch, f"{self.sources[item.source].name}/{item.record.key}" if self.mixture else item.record.key)

    # ---- per-slot sample streams ----

    def source_items(self, index: int, slot: int) -> Iterator[Item]:
        """The endless, shuffled sample stream of one source for one slot, epoch after epoch (after its share of what
        the previous layout had not consumed, when the run was resized)."""
        source, seed = self.sources[index], self.cfg.seed
        empty, start = 0, 0
        if self.origin is not None:
            yield from inherited(self, index, slot)
            start = self.origin.max_epoch_of(index) + 1
        for epoch in itertools.count(start):
            names, stride = epoch_assignment(source.shards, seed, epoch, slot, self.slots)
            upcoming, _ = epoch_assignment(source.shards, seed, epoch + 1, slot, self.slots)
            rng = random.Random(seed_of("buffer", seed, epoch, slot))
            n = 0
            read = source.read(index, names, stride, epoch, slot, self.slots, upcoming)
            for item in shuffle_buffer(read, self.cfg.shuffle_buffer, rng):
                n += 1
                yield item
            empty = 0 if n else empty + 1
            if empty >= MAX_EMPTY_EPOCHS:
                raise RuntimeError(f"slot {slot} read no sample in {empty} consecutive epochs; are the shards empty?")

    def _selected(self, items: Iterator[Item], counters: Counters, index: int = 0) -> Iterator[Item]:
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
                    f"data.subset ({asdict(subset)}) kept none of the last {in_a_row} samples of "
                    f"{self.sources[index].dir}; loosen it"
                )

    def mixed_items(
        self, slot: int, counters: Counters, planned: Callable[[], int], drawn: list[int]
    ) -> Iterator[Item]:
        """The slot's samples: its one source's stream, or per sample the source a mixture draws (with the weights of
        the stage of the batch being planned, `planned()` batches of the slot before it); `drawn` counts per source."""
        streams = [self._selected(self.source_items(i, slot), counters, i) for i in range(len(self.sources))]
        if not self.mixture:
            for item in streams[0]:
                drawn[0] += 1
                yield item
            return
        stages = slot_stages(self.stages, slot % self.workers, self.workers)
        generation = self.origin.generation if self.origin is not None else 0
        offset = mixture_offset(self.cfg.seed, generation, slot)
        for j in itertools.count():
            k = planned()
            edges = next(e for start, e in reversed(stages) if start <= k)
            i = draw(offset, j, edges)
            drawn[i] += 1
            yield next(streams[i])

    def held_out_plans(self, limit: int, counters: Counters) -> list[Plan]:
        """Every sample of the (first) dataset once, in manifest order, unshuffled (the first `limit` the subset
        keeps; 0: all), planned into batches by the kind's batching: the fixed set a validation reads
        (`training.validation`)."""
        source = self.sources[0]
        items = self._selected(source.read(0, source.shards, False, 0, 0, 1), counters)
        return list(self.batching.plans(itertools.islice(items, limit or None), 0, counters))

    # ---- batches ----

    def plans(self, slot: int, counters: Counters, drawn: list[int] | None = None) -> Iterator[Plan]:
        """The batches of a slot as rows of items (no tensors)."""
        planned = [0]
        drawn = [0] * len(self.sources) if drawn is None else drawn
        items = self.mixed_items(slot, counters, lambda: planned[0], drawn)
        for rows in self.batching.plans(items, slot, counters):
            yield rows
            planned[0] += 1

    def _per_source(self, rows: Plan) -> list[tuple[int, int, int]]:
        out = [[0, 0, -1] for _ in self.sources]
        for x in (x for row in rows for x in row):
            c = out[x.source]
            c[0], c[1], c[2] = c[0] + 1, c[1] + self.batching.tokens(x), max(c[2], x.epoch)
        return [tuple(c) for c in out]

    def _check_replay(self, logical_worker: int, drawn: list[int], batches: int) -> None:
        want = (self.expected_draws or {}).get(logical_worker)
        if want is not None and list(want) != drawn:
            raise LoaderError(
                f"replaying worker {logical_worker}'s {batches} batches drew {drawn} samples per source but the "
                f"checkpoint recorded {list(want)}; the data or the loader changed: resume with the code and data the "
                "checkpoint was written with"
            )

    def slot_batches(self, logical_worker: int, skip: int = 0) -> Iterator[tuple[Batch, BatchInfo]]:
        """Batches of (this rank, `logical_worker`), after silently replaying the first `skip` of them."""
        slot = self.rank * self.workers + logical_worker
        counters, drawn = Counters(), [0] * len(self.sources)
        remote = next((s.store for s in self.sources if s.store.remote), None)
        for i, rows in enumerate(self.plans(slot, counters, drawn)):
            delta = counters.take()
            if i < skip:
                if i == skip - 1 and self.mixture:
                    self._check_replay(logical_worker, drawn, skip)
                continue
            keys = [self.sample_key(x) for row in rows for x in row] if self.cfg.debug_keys else None
            epoch = max(x.epoch for row in rows for x in row)
            cache = remote.take_counts() if remote is not None else {}
            info = BatchInfo(delta, keys, epoch, self._per_source(rows), list(drawn) if self.mixture else None, cache)
            yield self.batching.build(rows), info

    def __iter__(self) -> Iterator[tuple[Batch, BatchInfo]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"dataset built for {self.workers} workers runs under {info.num_workers}")
        n = self.start_batch
        logical = (worker + n) % self.workers  # this iterator's first batch is global batch n
        skip = n // self.workers + (1 if logical < n % self.workers else 0)
        return self.slot_batches(logical, skip)
