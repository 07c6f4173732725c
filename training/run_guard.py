"""One writer per run folder: the exclusive lock rank 0 holds on `<run_dir>/.lock` for the life of a run, and
workers that die with their launcher.

- Lock: `fcntl.flock(LOCK_EX | LOCK_NB)` on `<run_dir>/.lock`, taken by rank 0 before anything is written and held
  until the run ends (the kernel drops it when the process dies, however it dies). A second run on the same folder
  fails at once with one line naming the pid that holds it. flock needs a filesystem that implements it across the
  machines that share the folder (local disks and most cluster filesystems do; some NFS setups do not).
- Launcher death: under torchrun each worker asks the kernel for SIGKILL when its parent (the torchrun agent) dies,
  `prctl(PR_SET_PDEATHSIG, SIGKILL)` through ctypes (Linux). Without it, SIGKILL on torchrun leaves its workers
  training and writing checkpoints while a restarted launcher starts new ones on the same folder. torchrun starts
  its workers from its main thread, which lives as long as torchrun (the death signal follows the thread that forked).
  Not on other systems (no prctl). A parent that dies before the call is caught when the worker was re-parented to
  pid 1 or the parent pid changed during the call (a subreaper that adopts the worker earlier goes unnoticed).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
from pathlib import Path

LOCK_FILE = ".lock"
PR_SET_PDEATHSIG = 1


class RunDirError(ValueError):
    """The run folder cannot be used as asked: in use, or holding checkpoints the run would mix with (one line
    naming the problem and the fix)."""


class RunLock:
    """The exclusive lock on a run folder; `release()` (or process exit) gives it back."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"run folder {self.path.parent} is in use by another training run (pid {holder} holds {self.path}); "
                "stop that run or choose another run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def exit_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux); False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent or parent == 1:  # the parent died before the call: no signal will come
        os.kill(os.getpid(), sig)
    return True


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ
