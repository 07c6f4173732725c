"""The stream algorithms of the loader, on plain items: stable seeds, a seeded shuffle buffer, exact best-fit subset
sums, greedy row packing from a lookahead, and fixed-size batching."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from a tuple of ints / strings (stable across processes, unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


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
