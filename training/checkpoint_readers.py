"""Checkpoint readers: processes beside the trainer (`eval.watch`) that read its checkpoints, and what keep-last-N owes
them. Both sides meet in `<run_dir>/watch/readers/` on the shared filesystem only (a reader may run on another node).

    <run_dir>/watch/readers/<name>.json   one reader: stale_after_s, needs_after, until_step, reading; its mtime is
                                          the heartbeat, refreshed every few seconds by a background thread
    <run_dir>/watch/readers/.clock        touched by the trainer: "now" on the filesystem's clock, not this node's

- A reader is live while its heartbeat is younger than its own `stale_after_s` (default 600 s; a test passes less).
  A live reader wants the checkpoint it is `reading` (its claim) and every checkpoint after `needs_after` (it is done
  with all up to there) up to `until_step` (None: all): `retention` in training/checkpoint.py keeps those, saying so
  in one line, so no checkpoint is deleted before the reader has read it. A stale reader is ignored (one line), so a
  dead reader never fills the disk; `latest` is never deleted either way.
- Deleting is race-free with a reader that is just starting (`delete_checkpoint`): the trainer moves the checkpoint
  aside (`.step_X.deleting`), reads the claims again, then deletes it, or puts it back for a reader that claimed it
  meanwhile. The reader claims first, then checks that the checkpoint is still complete, retrying briefly
  (`Registration.claim`), so it reads only a checkpoint that no trainer deletes from under it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

READERS = Path("watch") / "readers"
CLOCK = ".clock"
ASIDE = ".deleting"
STALE_AFTER_S = 600.0


def readers_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / READERS


def step_of(name: str) -> int:
    """The step of a checkpoint folder name (`step_00000100` -> 100)."""
    return int(name.removeprefix(".").removesuffix(ASIDE).split("_", 1)[1])


@dataclass
class Reader:
    """One registered reader as the trainer sees it."""

    name: str
    stale_after_s: float
    needs_after: int  # done with every checkpoint up to this step
    until_step: int | None  # wants none after this step (None: every one)
    reading: str | None  # the checkpoint it claims now
    age_s: float  # since its last heartbeat

    @property
    def live(self) -> bool:
        return self.age_s <= self.stale_after_s

    def wants(self, checkpoint: str) -> bool:
        """Whether it still needs checkpoint folder `checkpoint` (a name like step_00000100)."""
        step = step_of(checkpoint)
        ahead = step > self.needs_after and (self.until_step is None or step <= self.until_step)
        return checkpoint == self.reading or ahead


def _fs_now(folder: Path) -> float:
    """The current time on the clock that stamps heartbeats in `folder` (its filesystem's, e.g. an NFS server's), or
    this machine's where the folder cannot be written."""
    clock = folder / CLOCK
    try:
        clock.touch()
        return clock.stat().st_mtime
    except OSError:
        return time.time()


def registered_readers(run_dir: str | Path) -> list[Reader]:
    """Every reader registered for the run (none when no reader ever registered; nothing is created then)."""
    folder = readers_dir(run_dir)
    if not folder.is_dir():
        return []
    now, found = _fs_now(folder), []
    for path in sorted(folder.glob("*.json")):
        try:
            d, mtime = json.loads(path.read_text()), path.stat().st_mtime
            stale, needs = float(d.get("stale_after_s", STALE_AFTER_S)), int(d["needs_after"])
            until = None if d.get("until_step") is None else int(d["until_step"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError):  # removed, or not a registration: no reader
            continue
        found.append(Reader(path.stem, stale, needs, until, d.get("reading"), now - mtime))
    return found


def wanted(run_dir: str | Path, names: list[str]) -> tuple[dict[str, list[str]], list[Reader]]:
    """({checkpoint name: the live readers that want it}, the stale readers) for checkpoint folder `names`."""
    everyone = registered_readers(run_dir)
    live = [r for r in everyone if r.live]
    by_name = {n: [r.name for r in live if r.wants(n)] for n in names}
    return {n: who for n, who in by_name.items() if who}, [r for r in everyone if not r.live]


def keep_for_readers(run_dir: str | Path, candidates: list[Path]) -> list[Path]:
    """The checkpoints of `candidates` (chosen by keep-last-N) that no live reader wants, with one line naming those
    kept for a reader and one naming every stale reader ignored."""
    if not candidates:
        return []
    kept, stale = wanted(run_dir, [p.name for p in candidates])
    for r in stale:
        print(
            f"keep-last: ignoring checkpoint reader {r.name} (no heartbeat for {r.age_s:.0f} s, stale after "
            f"{r.stale_after_s:.0f} s)",
            flush=True,
        )
    if kept:
        who = sorted({name for names in kept.values() for name in names})
        print(
            f"keep-last: keeping {', '.join(sorted(kept))} for checkpoint reader {', '.join(who)} (not read yet)",
            flush=True,
        )
    return [p for p in candidates if p.name not in kept]


def interrupted_deletions(root: Path) -> list[Path]:
    """Checkpoints a deletion moved aside and did not finish with (the trainer died in between)."""
    return sorted(p for p in root.glob(f".step_*{ASIDE}") if p.is_dir())


def delete_checkpoint(path: Path) -> bool:
    """Delete checkpoint folder `path` (or finish an interrupted deletion of one moved aside): moved aside first, so a
    reader claiming it from now on finds it gone, then the claims read again; deleted, or put back when a live reader
    wants it after all (one line). Returns whether it was deleted."""
    root = path.parent
    name = path.name.removeprefix(".").removesuffix(ASIDE)
    aside, original = root / f".{name}{ASIDE}", root / name
    if path == original:
        if aside.exists():  # a leftover of the same name: it goes first
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(original, aside)
        except FileNotFoundError:
            return False
    kept, _ = wanted(root.parent, [name])
    if kept and not original.exists():
        os.rename(aside, original)
        who = ", ".join(kept[name])
        print(f"keep-last: put {name} back for checkpoint reader {who} (claimed meanwhile)", flush=True)
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


class Registration:
    """A reader's side: its registration file, the heartbeat thread and its claims. Use as a context manager; the
    registration is removed on a clean exit (a killed reader's goes stale)."""

    def __init__(
        self, run_dir: str | Path, name: str, stale_after_s: float = STALE_AFTER_S, until_step: int | None = None
    ):
        self.path = readers_dir(run_dir) / f"{name}.json"
        self.heartbeat_s = min(5.0, stale_after_s / 4)
        self.state = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "stale_after_s": stale_after_s,
            "needs_after": -1,
            "until_step": until_step,
            "reading": None,
        }
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{name}", daemon=True)

    def __enter__(self) -> Registration:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.update()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)

    def update(self, **changes) -> None:
        """Change fields (needs_after, until_step, reading) and rewrite the file atomically (a heartbeat too)."""
        with self._lock:
            self.state.update(changes)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(self.state) + "\n")
            os.replace(tmp, self.path)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:  # removed by hand: register again
                self.update()

    def claim(self, checkpoint: Path, attempts: int = 20, wait_s: float = 0.25) -> bool:
        """Claim `checkpoint`, then check it is (still) complete, retrying briefly while a trainer that is deleting
        it puts it back. False (claim dropped) when it is gone."""
        self.update(reading=checkpoint.name)
        for _ in range(attempts):
            if (checkpoint / "trainer.json").is_file():
                return True
            time.sleep(wait_s)
        self.update(reading=None)
        return False

    def done_through(self, step: int) -> None:
        """Finished with every checkpoint up to `step` (its claim dropped): keep-last-N may delete them."""
        self.update(needs_after=max(step, self.state["needs_after"]), reading=None)
