"""A per-patch callback around the next-patch loop both families share (`models.core.next_patch`), without touching it.

Both samplers decode through a `RowSetDecoder`: `prefill` once, then `step` after every patch but the last. While
`patch_progress(report)` is active those two methods are wrapped so that `report(done, total)` hears 0 after the
prefill and k after the k-th patch (`total` is the decoder's `num_ar_steps`); the last patch is done when the
sampler returns. One generation at a time holds the wrapper (a lock); the methods are restored on exit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from models.core.next_patch import RowSetDecoder

Report = Callable[[int, int], None]
_LOCK = threading.Lock()


@contextmanager
def patch_progress(report: Report) -> Iterator[None]:
    """Inside: every RowSetDecoder reports (patches done, patches per image) to `report`."""
    with _LOCK:
        prefill, step = RowSetDecoder.prefill, RowSetDecoder.step

        def counted_prefill(self):
            conds = prefill(self)
            self.patches_done = 0
            report(0, self.num_ar_steps)
            return conds

        def counted_step(self, bits):
            conds = step(self, bits)
            self.patches_done += 1
            report(self.patches_done, self.num_ar_steps)
            return conds

        RowSetDecoder.prefill, RowSetDecoder.step = counted_prefill, counted_step
        try:
            yield
        finally:
            RowSetDecoder.prefill, RowSetDecoder.step = prefill, step
