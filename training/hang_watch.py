"""Hang detection (`fault.hang_seconds`): every rank writes the step it is in to the rendezvous store (its heartbeat),
and a watchdog thread on every rank fires when no step completed within `fault.hang_seconds`. A firing rank writes
the Python stacks of all its threads to `<run_dir>/hangs/rank_<r>.txt` (appended: every hang of the run in order, each
under a line with its time and torchrun attempt), marks the hang in the store (so that every other rank's watchdog
fires at once and writes its stacks too), prints one line naming the ranks behind (their heartbeat step below the
furthest rank's), and exits with HANG_EXIT_CODE: torchrun then restarts the workers
(`--max-restarts`) and the run resumes exactly from its last checkpoint. A rank stuck outside a collective is found
this way; one stuck inside a collective is also caught by the collective's own timeout. The watchdog is armed from the
first step to the last: `fault.hang_seconds` must exceed the longest step with its evaluation and checkpoint."""

from __future__ import annotations

import faulthandler
import os
import threading
import time
from pathlib import Path

HANG_EXIT_CODE = 75
# store keys of this attempt of the job (a store torchrun keeps over restarts still holds the last attempt's)
_ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
_PREFIX = f"bitdance/attempt_{_ATTEMPT}"
_HANG = f"{_PREFIX}/hang"
_DUMPED = f"{_PREFIX}/hang_dumped"


def _heartbeat(rank: int) -> str:
    return f"{_PREFIX}/heartbeat/{rank}"


class HangWatchdog:
    """Off when `seconds` is 0 or there is no process group store (a single process without torchrun)."""

    def __init__(self, seconds: float, run_dir: str | Path, rank: int, world: int, store):
        self.seconds, self.rank, self.world, self.store = seconds, rank, world, store
        self.out = Path(run_dir) / "hangs"
        self.step, self.last = 0, time.monotonic()
        self._stop = threading.Event()
        self.on = seconds > 0 and store is not None
        if self.on:
            threading.Thread(target=self._watch, name="bitdance-hang-watchdog", daemon=True).start()

    def enter(self, step: int) -> None:
        """This rank starts step `step` (its heartbeat)."""
        self.step = step
        if self.on:
            self.store.set(_heartbeat(self.rank), str(step))

    def completed(self) -> None:
        self.last = time.monotonic()

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = min(1.0, self.seconds / 4)
        while not self._stop.wait(poll):
            quiet = time.monotonic() - self.last
            if quiet > self.seconds or self.store.check([_HANG]):
                self._report_and_exit(quiet)

    def _report_and_exit(self, quiet: float) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"rank_{self.rank:05d}.txt"
        with path.open("a") as f:  # a later hang (after a restart) must not hide this one
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            f.write(f"{stamp} attempt {_ATTEMPT}: rank {self.rank}, in step {self.step}, no step completed for "
                    f"{quiet:.1f} s\n")  # fmt: skip
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        if not self.store.check([_HANG]):
            self.store.set(_HANG, str(self.rank))
        steps = {
            r: int(self.store.get(_heartbeat(r))) if self.store.check([_heartbeat(r)]) else 0 for r in range(self.world)
        }
        furthest = max(steps.values())
        behind = {r: s for r, s in steps.items() if s < furthest}
        print(
            f"hang: rank {self.rank} completed no step for {quiet:.0f} s (fault.hang_seconds={self.seconds:g}) in step "
            f"{self.step}; ranks behind: {sorted(behind) or 'none'} (in steps {sorted(set(behind.values()))}, the "
            f"others in {furthest}); stacks in {path}",
            flush=True,
        )
        self.store.add(_DUMPED, 1)  # give the other ranks' watchdogs the time to write their stacks too
        deadline = time.monotonic() + 10
        while self.store.add(_DUMPED, 0) < self.world and time.monotonic() < deadline:
            time.sleep(0.2)
        os._exit(HANG_EXIT_CODE)
