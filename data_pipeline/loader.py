"""The training data loader: an endless, deterministic, resumable stream of batches over a tokenized dataset.

A dataset directory holds webdataset shards `*.tar` and `manifest.json` (format: `data_pipeline.shard_format`).
Each (data-parallel rank, DataLoader worker) pair is one *slot* among S = world_size * max(1, num_workers).
Per epoch the shard list is shuffled with a generator seeded by (seed, epoch); with at least S shards slot s
reads shards s, s + S, ...; otherwise every slot reads all shards and keeps the samples whose running index i
has i % S == s. Either way the slots see disjoint samples whose union is the dataset. A seeded shuffle buffer
per (seed, epoch, slot) follows, then batching inside the worker: T2I samples are packed greedily into rows of
at most `token_budget` tokens (`pack_rows` -> `PackedT2IBatch`); ImageNet samples form fixed-size
(bits [B, C, h, w], labels [B]) batches. Streams never end: each slot moves on to the next epoch.

Resumption is by deterministic replay. With endless streams the DataLoader hands out batches round-robin over
its workers, so from the number of batches consumed n every worker knows how many batches it had produced; a
fresh iterator fast-forwards each worker's pipeline by that many batches (without building their tensors) and
rotates the worker roles so that its first batch is batch n of the uninterrupted run.

Resizing (another world size or worker count, `load_state_dict(state, all_rank_states)`): the previous layout's
slots are replayed to find the samples their consumed batches held; what they had not consumed, up to the last
epoch any of them had reached, is dealt to the new slots (previous slot p goes to new slot p % S when there are
fewer new slots, or is split by stride among the new slots s with s % P == p when there are more), and then every
new slot goes on with the next epoch in the new layout. So no sample of an epoch is lost or seen twice. The
previous layout is kept in the state (`origin`), so a resized run resumes exactly, and resizes again.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.shard_format import TokenRecord, load_manifest, record_from_members
from models.t2i.packing import PackedT2IBatch, T2ISample, pack_rows, sample_length

log = logging.getLogger(__name__)

KINDS = ("t2i", "imagenet")
MAX_EMPTY_EPOCHS = 100  # consecutive epochs without a sample for one slot before giving up
T = TypeVar("T")

ImageNetBatch = tuple[torch.Tensor, torch.Tensor]  # bits float32 ±1 [B, C, h, w], labels int64 [B]
Batch = PackedT2IBatch | ImageNetBatch
SampleKey = tuple[int, str]  # (epoch, sample key)


class LoaderError(ValueError):
    """The dataset cannot feed this loader as configured (one-line message naming the fix)."""


class ShardMismatch(LoaderError):
    """A shard holds another number of samples than the manifest lists."""


MAX_SKIPPED_IN_A_ROW = 10_000  # consecutive samples over the token budget before giving up (nothing fits)


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


@dataclass
class LoaderConfig:
    """What to read and how to batch it; everything that changes the batch stream is part of the resume check."""

    data_dir: str | Path
    kind: str = "t2i"  # "t2i" (packed PackedT2IBatch) or "imagenet" ((bits, labels) batches)
    seed: int = 0
    shuffle_buffer: int = 256  # samples; 0 or 1 disables shuffling
    token_budget: int = 4096  # T2I: max tokens per packed row
    rows_per_batch: int = 1  # T2I: packed rows per batch
    batch_size: int = 64  # ImageNet: samples per batch
    parallel_num: int = 16  # T2I: P tokens per AR step (must match the manifest's query tokens)
    caption_dropout: float = 0.1  # T2I: probability of replacing the prompt by the unconditional one
    num_workers: int = 2
    lookahead: int = 64  # T2I: pending samples the packer chooses from
    subset: SubsetConfig = field(default_factory=SubsetConfig)  # only the samples it keeps are read
    debug_keys: bool = False  # yield (batch, [(epoch, key), ...]) instead of batch (tests, debugging)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("token_budget", "rows_per_batch", "batch_size", "parallel_num", "lookahead"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shuffle_buffer < 0 or self.num_workers < 0:
            raise ValueError("shuffle_buffer and num_workers must be >= 0")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")

    def stream_settings(self) -> dict[str, Any]:
        """The settings the batch stream depends on (besides seed, workers, ranks and data)."""
        keys = ["kind", "shuffle_buffer"]
        keys += ["token_budget", "rows_per_batch", "parallel_num", "caption_dropout", "lookahead"]
        keys += ["batch_size"] if self.kind == "imagenet" else []
        out = {k: getattr(self, k) for k in keys}
        if self.subset.active:  # (absent otherwise, so the states of runs without a subset stay as they were)
            out["subset"] = asdict(self.subset)
        return out


@dataclass
class ManifestTokenIds:
    """`ImageTokenIds` from the special-token ids the tokenize job stored in the manifest (captions are already
    tokenized, so `prompt_ids` is not available)."""

    pad_id: int
    vision_start_id: int
    res_ids: list[int]  # ids of <|res_1|> .. <|res_N|>
    query_ids: list[int]  # P - 1 query token ids
    uncond: list[int]  # ids of the templated unconditional prompt
    parallel_num: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> ManifestTokenIds:
        t = manifest.get("text_tokens")
        if t is None:
            raise ValueError("the manifest has no `text_tokens`; was the dataset tokenized for T2I?")
        ids = cls(
            int(t["pad_id"]),
            int(t["vision_start_id"]),
            list(t["res_ids"]),
            list(t["query_ids"]),
            list(t["uncond_ids"]),
            int(t["parallel_num"]),
        )
        if len(ids.query_ids) != ids.parallel_num - 1:
            raise ValueError(f"manifest has {len(ids.query_ids)} query ids for parallel_num {ids.parallel_num}")
        return ids

    def image_prefix_ids(self, grid_h: int, grid_w: int) -> list[int]:
        for side in (grid_h, grid_w):
            if not 1 <= side <= len(self.res_ids):
                raise ValueError(f"grid side {side} has no <|res_k|> token (k in 1..{len(self.res_ids)})")
        return [self.vision_start_id, self.res_ids[grid_h - 1], self.res_ids[grid_w - 1], *self.query_ids]

    def uncond_ids(self) -> list[int]:
        return list(self.uncond)

    def prompt_ids(self, caption: str) -> list[int]:
        raise NotImplementedError("captions are pre-tokenized in the shards; use the records' text_ids")


def dataset_fingerprint(manifest: dict) -> str:
    """A short hash of what the dataset holds: kind, bits per token and the shard list."""
    shards = sorted((s["name"], s["samples"], s.get("tokens")) for s in manifest["shards"])
    desc = {"kind": manifest.get("kind"), "bits_per_token": manifest.get("bits_per_token"), "shards": shards}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def _seed_of(*parts: Any) -> int:
    """A 63-bit seed from a tuple of ints / strings (stable across processes, unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def epoch_assignment(shards: list[str], seed: int, epoch: int, slot: int, slots: int) -> tuple[list[str], bool]:
    """(shards slot `slot` reads in `epoch`, whether it keeps only running indices i with i % slots == slot)."""
    order = sorted(shards)
    random.Random(_seed_of("shards", seed, epoch)).shuffle(order)
    if len(order) >= slots:
        return order[slot::slots], False
    return order, True


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Seeded buffer shuffle: keep `size` items, emit a random one per new item, drain shuffled at the end."""
    if size <= 1:
        yield from items
        return
    buf: list[T] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def best_subset(sizes: list[int], room: int) -> list[int]:
    """Indices (ascending) of the items whose total is the largest one not above `room`: an exact subset sum,
    one Python-int bitset of reachable totals per prefix of the items."""
    if room < 0:
        return []
    mask = (1 << (room + 1)) - 1
    reach = [1]  # reach[i]: totals reachable with the first i items
    for s in sizes:
        r = reach[-1]
        reach.append(r | ((r << s) & mask) if s <= room else r)
    total = reach[-1].bit_length() - 1
    picks = []
    for i in range(len(sizes), 0, -1):
        if not (reach[i - 1] >> total) & 1:  # `total` needs item i - 1
            picks.append(i - 1)
            total -= sizes[i - 1]
    return picks[::-1]


def greedy_rows(items: Iterable[T], length: Callable[[T], int], budget: int, lookahead: int) -> Iterator[list[T]]:
    """Packing of a stream into rows of at most `budget` tokens, BAGEL-style: each row starts with the oldest of
    `lookahead` pending items (so none waits more than `lookahead` rows) and is completed with the subset of the
    other pending items that fills it best (`best_subset`). Items longer than `budget` must be filtered out."""
    source = iter(items)
    pending: list[T] = []
    while True:
        pending.extend(itertools.islice(source, lookahead - len(pending)))
        if not pending:
            return
        row = [pending.pop(0)]
        pending.extend(itertools.islice(source, lookahead - len(pending)))
        picks = best_subset([length(x) for x in pending], budget - length(row[0]))
        row += [pending[i] for i in picks]
        for i in reversed(picks):
            pending.pop(i)
        yield row


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    source = iter(items)
    while chunk := list(itertools.islice(source, n)):
        yield chunk


@dataclass
class _Item:
    """A sample on its way to a batch; bits stay packed until the batch is built."""

    epoch: int
    record: TokenRecord
    text_ids: list[int] = field(default_factory=list)
    text_loss: bool = True
    length: int = 0


@dataclass
class _Counters:
    samples: int = 0  # samples placed in batches
    skipped_too_long: int = 0
    filtered_out: int = 0  # samples outside the configured subset
    rows: int = 0  # T2I rows emitted
    row_tokens: int = 0  # tokens in them

    def add(self, other: dict[str, int]) -> None:
        for k, v in other.items():
            setattr(self, k, getattr(self, k) + v)

    def take(self) -> dict[str, int]:
        out = asdict(self)
        for k in out:
            setattr(self, k, 0)
        return out


@dataclass
class _BatchInfo:
    counters: dict[str, int]
    keys: list[SampleKey] | None
    epoch: int  # the latest epoch of a sample in the batch


@dataclass
class StreamOrigin:
    """The layout a resized run's streams continue from, and how far its slots had read."""

    world_size: int
    num_workers: int
    batches_consumed: int  # per rank, in that layout
    max_epoch: int  # the latest epoch any of its slots had placed a sample from
    parent: StreamOrigin | None = None  # the layout before it, when it was itself a resized run

    @property
    def slots(self) -> int:
        return self.world_size * max(1, self.num_workers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> StreamOrigin | None:
        if d is None:
            return None
        return cls(**{**d, "parent": cls.from_dict(d.get("parent"))})


def _identity(x: T) -> T:
    return x


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
        self.bits_per_token = int(manifest["bits_per_token"])
        self.shards = [str(Path(cfg.data_dir) / s["name"]) for s in manifest["shards"]]
        self.listed = {str(Path(cfg.data_dir) / s["name"]): int(s["samples"]) for s in manifest["shards"]}
        self._check_shards(manifest)
        self.token_ids = self._t2i_token_ids(manifest) if cfg.kind == "t2i" else None
        if cfg.kind == "t2i":
            self._check_token_budget(manifest)
        self.start_batch = 0
        self.origin: StreamOrigin | None = None  # set when the run was resized from another layout

    def _in_layout(self, origin: StreamOrigin, slot: int) -> tuple[BinaryTokenDataset, int]:
        """This dataset as it was in `origin`'s layout (for replay), and the logical worker of its slot `slot`."""
        old = copy.copy(self)
        workers = max(1, origin.num_workers)
        old.rank, logical = divmod(slot, workers)
        old.world_size, old.workers, old.slots, old.origin = origin.world_size, workers, origin.slots, origin.parent
        return old, logical

    def _check_shards(self, manifest: dict) -> None:
        missing = [p for p in self.shards if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}")
        total = sum(int(s["samples"]) for s in manifest["shards"])
        if total < self.slots:
            raise ValueError(f"{total} samples cannot feed {self.slots} slots (world_size x num_workers)")

    def _check_token_budget(self, manifest: dict) -> None:
        """Refuse a token budget below the shortest sample the dataset can hold: its smallest image (from the
        manifest's size histogram) with the unconditional prompt. (A budget above that but below every real sample
        is caught while reading: MAX_SKIPPED_IN_A_ROW.)"""
        sizes = [tuple(int(x) for x in k.split("x")) for k in manifest.get("size_histogram", {})]
        if not sizes or "downsample" not in manifest:
            return
        down = int(manifest["downsample"])
        shortest = min(sample_length(len(self.token_ids.uncond_ids()), h // down, w // down) for h, w in sizes)
        if self.cfg.token_budget < shortest:
            raise LoaderError(
                f"data.token_budget={self.cfg.token_budget} is smaller than every sample of {self.cfg.data_dir} (the "
                f"shortest possible takes {shortest} tokens); raise data.token_budget to at least {shortest}"
            )

    def _t2i_token_ids(self, manifest: dict) -> ManifestTokenIds:
        ids = ManifestTokenIds.from_manifest(manifest)
        if ids.parallel_num != self.cfg.parallel_num:
            raise ValueError(
                f"the dataset's query tokens were made for P={ids.parallel_num} (manifest text_tokens.parallel_num) "
                f"but the loader packs for parallel_num={self.cfg.parallel_num}; re-tokenize or change P"
            )
        return ids

    # ---- per-slot sample stream ----

    def _read(self, urls: list[str], stride: bool, epoch: int, slot: int) -> Iterator[_Item]:
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
                yield _Item(epoch, record_from_members(s["__key__"], bits, s["json"]))
            if n != self.listed[url]:
                raise ShardMismatch(
                    f"shard {url} holds {n} samples but {Path(self.cfg.data_dir) / 'manifest.json'} lists "
                    f"{self.listed[url]}: the shard is damaged or was replaced; re-tokenize it (delete it and its "
                    ".stats.json, rerun data_pipeline.tokenize)"
                )

    def items(self, slot: int) -> Iterator[_Item]:
        """The endless, shuffled sample stream of one slot, epoch after epoch (after its share of what the previous
        layout had not consumed, when the run was resized)."""
        empty, start = 0, 0
        if self.origin is not None:
            yield from self._inherited(slot)
            start = self.origin.max_epoch + 1
        for epoch in itertools.count(start):
            urls, stride = epoch_assignment(self.shards, self.cfg.seed, epoch, slot, self.slots)
            rng = random.Random(_seed_of("buffer", self.cfg.seed, epoch, slot))
            n = 0
            for item in shuffle_buffer(self._read(urls, stride, epoch, slot), self.cfg.shuffle_buffer, rng):
                n += 1
                yield item
            empty = 0 if n else empty + 1
            if empty >= MAX_EMPTY_EPOCHS:
                raise RuntimeError(f"slot {slot} read no sample in {empty} consecutive epochs; are the shards empty?")

    def _inherited(self, slot: int) -> Iterator[_Item]:
        """This slot's share of the samples the previous layout's slots had not consumed."""
        old_slots = self.origin.slots
        for p in range(old_slots):
            if self.slots > old_slots:
                owners = [s for s in range(self.slots) if s % old_slots == p]
            else:
                owners = [p % self.slots]
            if slot in owners:
                share, part = len(owners), owners.index(slot)
                for i, item in enumerate(self._unconsumed(p)):
                    if i % share == part:
                        yield item

    def _unconsumed(self, old_slot: int) -> Iterator[_Item]:
        """Samples of the previous layout's slot `old_slot`, up to `origin.max_epoch`, that its consumed batches did
        not hold: its plans are replayed (no tensors) to find those, then its stream is read again without them."""
        o = self.origin
        old, logical = self._in_layout(o, old_slot)
        n, workers = o.batches_consumed, old.workers
        consumed = n // workers + (1 if logical < n % workers else 0)
        placed: set[SampleKey] = set()
        if consumed:
            for i, rows in enumerate(old.plans(old_slot, _Counters())):
                placed.update((x.epoch, x.record.key) for row in rows for x in row)
                if i + 1 == consumed:
                    break
        for item in old.items(old_slot):
            if item.epoch > o.max_epoch:
                return
            if (item.epoch, item.record.key) not in placed:
                yield item

    # ---- batch plans (cheap: no tensors) ----

    def plans(self, slot: int, counters: _Counters) -> Iterator[list[list[_Item]]]:
        """The batches of a slot as rows of items (no tensors)."""
        return self._imagenet_plans(slot, counters) if self.cfg.kind == "imagenet" else self._t2i_plans(slot, counters)

    def _selected(self, items: Iterator[_Item], counters: _Counters) -> Iterator[_Item]:
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

    def _t2i_items(self, items: Iterator[_Item], slot: int, counters: _Counters) -> Iterator[_Item]:
        """Caption dropout, sample lengths, and the too-long filter."""
        cfg, ids = self.cfg, self.token_ids
        rng = random.Random(_seed_of("caption_dropout", cfg.seed, slot))
        warned, in_a_row, shortest = False, 0, None
        for item in items:
            drop = cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout
            item.text_ids = ids.uncond_ids() if drop else item.record.text_ids
            item.text_loss = not drop and bool(item.record.caption)  # an empty caption is an unconditional sample
            item.length = sample_length(len(item.text_ids), item.record.h, item.record.w)
            if item.length > cfg.token_budget:
                counters.skipped_too_long += 1
                in_a_row += 1
                shortest = min(shortest or item.length, item.length)
                if in_a_row >= MAX_SKIPPED_IN_A_ROW:  # nothing fits: stop instead of reading the data forever
                    raise LoaderError(
                        f"{in_a_row} samples in a row exceed data.token_budget={cfg.token_budget} (the shortest took "
                        f"{shortest} tokens); raise data.token_budget"
                    )
                if not warned:
                    log.warning(
                        "skipping sample %s: %d tokens > token_budget %d (counted in stats; warned once)",
                        item.record.key,
                        item.length,
                        cfg.token_budget,
                    )
                    warned = True
                continue
            in_a_row, shortest = 0, None
            yield item

    def _t2i_plans(self, slot: int, counters: _Counters) -> Iterator[list[list[_Item]]]:
        cfg = self.cfg
        items = self._t2i_items(self._selected(self.items(slot), counters), slot, counters)
        rows_stream = greedy_rows(items, lambda x: x.length, cfg.token_budget, cfg.lookahead)
        for rows in batched(rows_stream, cfg.rows_per_batch):
            counters.rows += len(rows)
            counters.row_tokens += sum(x.length for row in rows for x in row)
            counters.samples += sum(len(row) for row in rows)
            yield rows

    def _imagenet_plans(self, slot: int, counters: _Counters) -> Iterator[list[list[_Item]]]:
        first: TokenRecord | None = None
        for chunk in batched(self._selected(self.items(slot), counters), self.cfg.batch_size):
            for item in chunk:
                r = item.record
                first = first or r
                if (r.h, r.w, r.bits_per_token) != (first.h, first.w, first.bits_per_token):
                    raise ValueError(
                        f"ImageNet batches need one grid size: sample {r.key} is {r.h}x{r.w}x{r.bits_per_token} "
                        f"but {first.key} is {first.h}x{first.w}x{first.bits_per_token} (h x w x bits)"
                    )
                if r.label is None:
                    raise ValueError(f"ImageNet sample {r.key} has no class label")
            counters.samples += len(chunk)
            yield [chunk]

    # ---- tensors ----

    def build(self, rows: list[list[_Item]]) -> Batch:
        if self.cfg.kind == "imagenet":
            items = rows[0]
            bits = torch.stack([x.record.grid() for x in items])
            return bits, torch.tensor([x.record.label for x in items], dtype=torch.long)
        samples = [[T2ISample(x.text_ids, x.record.grid(), x.text_loss) for x in row] for row in rows]
        return pack_rows(samples, self.token_ids, self.cfg.parallel_num)

    def slot_batches(self, logical_worker: int, skip: int = 0) -> Iterator[tuple[Batch, _BatchInfo]]:
        """Batches of (this rank, `logical_worker`), after silently replaying the first `skip` of them."""
        slot = self.rank * self.workers + logical_worker
        counters = _Counters()
        for i, rows in enumerate(self.plans(slot, counters)):
            delta = counters.take()
            if i < skip:
                continue
            keys = [(x.epoch, x.record.key) for row in rows for x in row] if self.cfg.debug_keys else None
            epoch = max(x.epoch for row in rows for x in row)
            yield self.build(rows), _BatchInfo(delta, keys, epoch)

    def __iter__(self) -> Iterator[tuple[Batch, _BatchInfo]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"dataset built for {self.workers} workers runs under {info.num_workers}")
        n = self.start_batch
        logical = (worker + n) % self.workers  # this iterator's first batch is global batch n
        skip = n // self.workers + (1 if logical < n % self.workers else 0)
        return self.slot_batches(logical, skip)


class BinaryTokenLoader:
    """Iterate to get batches (`PackedT2IBatch` or (bits, labels)); `state_dict` / `load_state_dict` resume exactly.

    Every `iter()` continues after the last batch handed out (replaying the workers' pipelines), so break out of
    a loop and iterate again, or save the state and load it into a fresh loader: the batches are the same.
    """

    def __init__(self, cfg: LoaderConfig, rank: int | None = None, world_size: int | None = None):
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither (then torch.distributed decides)")
        if rank is None:
            rank, world_size = default_rank_world()
        self.cfg = cfg
        self.dataset = BinaryTokenDataset(cfg, rank, world_size)
        self.batches_consumed = 0
        self.max_epoch = 0  # the latest epoch of a sample handed out
        self._counters = _Counters()

    def __iter__(self) -> Iterator[Batch | tuple[Batch, list[SampleKey]]]:
        self.dataset.start_batch = self.batches_consumed
        # its own generator: creating the iterator must not draw from the global RNG (exact training resume)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_identity, generator=gen
        )
        for batch, info in loader:
            self.batches_consumed += 1
            self.max_epoch = max(self.max_epoch, info.epoch)
            self._counters.add(info.counters)
            yield (batch, info.keys) if self.cfg.debug_keys else batch

    def stats(self) -> dict[str, float]:
        c = self._counters
        fill = c.row_tokens / (c.rows * self.cfg.token_budget) if c.rows else 0.0
        return {
            "batches": self.batches_consumed,
            "samples_seen": c.samples,
            "skipped_too_long": c.skipped_too_long,
            "filtered_out": c.filtered_out,
            "rows": c.rows,
            "fill_ratio": fill,
        }

    def state_dict(self) -> dict[str, Any]:
        d = self.dataset
        return {
            "batches_consumed": self.batches_consumed,
            "max_epoch": self.max_epoch,
            "seed": self.cfg.seed,
            "num_workers": self.cfg.num_workers,
            "world_size": d.world_size,
            "rank": d.rank,
            "dataset": d.fingerprint,
            "settings": self.cfg.stream_settings(),
            "origin": d.origin.to_dict() if d.origin else None,
            "counters": asdict(self._counters),
        }

    def load_state_dict(self, sd: dict[str, Any], all_ranks: list[dict[str, Any]] | None = None) -> None:
        """Continue after `sd["batches_consumed"]` batches. The rank may differ (all ranks consume the same number
        of batches, so one rank's state serves every rank). With another world size or worker count the states of
        all the previous ranks (`all_ranks`) resize the streams (module docstring); anything else that shapes the
        stream must match."""
        mine = self.state_dict()
        for key in ("dataset", "seed", "settings"):
            if sd.get(key) != mine[key]:
                raise ValueError(
                    f"loader state is incompatible: {key} was {sd.get(key)!r}, this loader has {mine[key]!r}; "
                    "resuming needs the same data, seed and batching settings"
                )
        self._counters = _Counters(**sd.get("counters", {}))
        if (sd["world_size"], sd["num_workers"]) == (mine["world_size"], mine["num_workers"]):
            self.batches_consumed = int(sd["batches_consumed"])
            self.max_epoch = int(sd.get("max_epoch", 0))
            self.dataset.origin = StreamOrigin.from_dict(sd.get("origin"))
            return
        if all_ranks is None or sorted(s["rank"] for s in all_ranks) != list(range(sd["world_size"])):
            raise ValueError(
                f"resizing the data stream from {sd['world_size']} ranks x {sd['num_workers']} workers needs the "
                f"loader states of all {sd['world_size']} previous ranks"
            )
        if len({int(s["batches_consumed"]) for s in all_ranks}) != 1:
            raise ValueError("the previous ranks' loader states were taken at different batch counts")
        self.dataset.origin = StreamOrigin(
            world_size=int(sd["world_size"]),
            num_workers=int(sd["num_workers"]),
            batches_consumed=int(sd["batches_consumed"]),
            max_epoch=max(int(s.get("max_epoch", 0)) for s in all_ranks),
            parent=StreamOrigin.from_dict(sd.get("origin")),
        )
        self.batches_consumed = 0
        self.max_epoch = self.dataset.origin.max_epoch
