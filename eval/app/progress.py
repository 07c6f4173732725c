"""A per-patch callback for one generation: `patch_progress(report)` sets the next-patch loop's progress hook
(`models.core.next_patch.PATCH_DONE`, a context variable, so concurrent generations in other threads keep their own),
and `report(done, total)` hears 0 after the prefill and k after the k-th patch of each sampler call."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from models.core.next_patch import PATCH_DONE

Report = Callable[[int, int], None]


@contextmanager
def patch_progress(report: Report) -> Iterator[None]:
    """Inside: the next-patch loop reports (patches done, patches per image) to `report`."""
    token = PATCH_DONE.set(report)
    try:
        yield
    finally:
        PATCH_DONE.reset(token)
