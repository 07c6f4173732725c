"""Resizing a run's data stream to another world size or worker count: the previous layout (`StreamOrigin`, kept in
the loader state) is replayed to find what its slots had not consumed, and that is dealt to the new slots (previous
slot p goes to new slot p % S when there are fewer new slots, or is split by stride among the new slots s with
s % P == p when there are more)."""

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


def in_layout(ds: BinaryTokenDataset, origin: StreamOrigin, slot: int) -> tuple[BinaryTokenDataset, int]:
    """`ds` as it was in `origin`'s layout (for replay), and the logical worker of its slot `slot`."""
    old = copy.copy(ds)
    workers = max(1, origin.num_workers)
    old.rank, logical = divmod(slot, workers)
    old.world_size, old.workers, old.slots, old.origin = origin.world_size, workers, origin.slots, origin.parent
    return old, logical


def inherited(ds: BinaryTokenDataset, slot: int) -> Iterator[Item]:
    """Slot `slot`'s share of the samples the previous layout's slots had not consumed."""
    old_slots = ds.origin.slots
    for p in range(old_slots):
        if ds.slots > old_slots:
            owners = [s for s in range(ds.slots) if s % old_slots == p]
        else:
            owners = [p % ds.slots]
        if slot in owners:
            share, part = len(owners), owners.index(slot)
            for i, item in enumerate(unconsumed(ds, p)):
                if i % share == part:
                    yield item


def unconsumed(ds: BinaryTokenDataset, old_slot: int) -> Iterator[Item]:
    """Samples of the previous layout's slot `old_slot`, up to `origin.max_epoch`, that its consumed batches did
    not hold: its plans are replayed (no tensors) to find those, then its stream is read again without them."""
    o = ds.origin
    old, logical = in_layout(ds, o, old_slot)
    n, workers = o.batches_consumed, old.workers
    consumed = n // workers + (1 if logical < n % workers else 0)
    placed: set[SampleKey] = set()
    if consumed:
        for i, rows in enumerate(old.plans(old_slot, Counters())):
            placed.update((x.epoch, x.record.key) for row in rows for x in row)
            if i + 1 == consumed:
                break
    for item in old.items(old_slot):
        if item.epoch > o.max_epoch:
            return
        if (item.epoch, item.record.key) not in placed:
            yield item
