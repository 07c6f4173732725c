"""Resizing a run's data stream to another world size or worker count: the previous layout (`StreamOrigin`, kept in
the loader state) is replayed to find what its slots had not consumed, and that is dealt to the new slots (previous
slot p goes to new slot p % S when there are fewer new slots, or is split by stride among the new slots s with
s % P == p when there are more). A mixture is resized source by source: each source's unconsumed samples (up to the
latest epoch of it the previous layout had placed) go to the new slots' streams of that source, found by one replay
of the previous layout's mixture (its own weight stages) per previous slot."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from data_pipeline.loader.batching import Counters, Item

if TYPE_CHECKING:
    from data_pipeline.loader.dataset import BinaryTokenDataset

SampleKey = tuple[int, str]  # (epoch, sample key)


@dataclass
class StreamOrigin:
    """The layout a resized run's streams continue from, and how far its slots had read."""

    world_size: int
    num_workers: int
    batches_consumed: int  # per rank, in that layout
    max_epoch: int  # the latest epoch any of its slots had placed a sample from
    parent: StreamOrigin | None = None  # the layout before it, when it was itself a resized run
    stages: list | None = None  # a mixture's weight stages in that layout: [[batch, weights], ...]
    max_epochs: list[int] | None = None  # a mixture's max_epoch per source

    @property
    def slots(self) -> int:
        return self.world_size * max(1, self.num_workers)

    @property
    def generation(self) -> int:
        """How many layouts came before the one that continues from this origin."""
        return 1 + (self.parent.generation if self.parent is not None else 0)

    def max_epoch_of(self, source: int) -> int:
        return self.max_epochs[source] if self.max_epochs is not None else self.max_epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> StreamOrigin | None:
        if d is None:
            return None
        return cls(**{**d, "parent": cls.from_dict(d.get("parent"))})


def in_layout(ds: BinaryTokenDataset, origin: StreamOrigin, slot: int) -> tuple[BinaryTokenDataset, int]:
    """`ds` as it was in `origin`'s layout (for replay), and the logical worker of its slot `slot`."""
    old = copy.copy(ds)
    workers = max(1, origin.num_workers)
    old.rank, logical = divmod(slot, workers)
    old.world_size, old.workers, old.slots, old.origin = origin.world_size, workers, origin.slots, origin.parent
    if origin.stages is not None:
        old.stages = [(int(n), list(w)) for n, w in origin.stages]
    return old, logical


def inherited(ds: BinaryTokenDataset, source: int, slot: int) -> Iterator[Item]:
    """Slot `slot`'s share of the samples of source `source` the previous layout's slots had not consumed."""
    old_slots = ds.origin.slots
    for p in range(old_slots):
        if ds.slots > old_slots:
            owners = [s for s in range(ds.slots) if s % old_slots == p]
        else:
            owners = [p % ds.slots]
        if slot in owners:
            share, part = len(owners), owners.index(slot)
            for i, item in enumerate(unconsumed(ds, source, p)):
                if i % share == part:
                    yield item


def placed_by_source(ds: BinaryTokenDataset, old_slot: int) -> list[set[SampleKey]]:
    """Per source, the samples the previous layout's slot `old_slot` had placed in its consumed batches: its plans
    are replayed (no tensors)."""
    o = ds.origin
    old, logical = in_layout(ds, o, old_slot)
    n, workers = o.batches_consumed, old.workers
    consumed = n // workers + (1 if logical < n % workers else 0)
    placed: list[set[SampleKey]] = [set() for _ in ds.sources]
    if consumed:
        for i, rows in enumerate(old.plans(old_slot, Counters())):
            for x in (x for row in rows for x in row):
                placed[x.source].add((x.epoch, x.record.key))
            if i + 1 == consumed:
                break
    return placed


def unconsumed(ds: BinaryTokenDataset, source: int, old_slot: int) -> Iterator[Item]:
    """Samples of source `source` in the previous layout's slot `old_slot`, up to its max epoch there, that the
    consumed batches did not hold: the slot's placed samples (one replay for all sources, kept until each source has
    taken its part), then its stream of that source read again without them."""
    o = ds.origin
    key = (id(o), old_slot)
    if key not in ds.placed:
        ds.placed[key] = dict(enumerate(placed_by_source(ds, old_slot)))
    placed = ds.placed[key].pop(source)
    if not ds.placed[key]:
        del ds.placed[key]
    old, _ = in_layout(ds, o, old_slot)
    for item in old.source_items(source, old_slot):
        if item.epoch > o.max_epoch_of(source):
            return
        if (item.epoch, item.record.key) not in placed:
            yield item
