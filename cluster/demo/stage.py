"""A demo stage (what it runs, what its output depends on, the folders it owns) and how a stage runs a command: a
subprocess from the repository root, its output teed to a log (`sh`), or a second one beside it (`beside`), torchrun
with the demo's process count."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

from cluster.demo.config import REPO, DemoConfig


@dataclass
class Stage:
    name: str
    what: str
    settings: Callable[[DemoConfig], dict]  # what the stage's output depends on (besides upstream stages)
    upstream: tuple[str, ...]
    run: Callable[[DemoConfig, Path], dict]
    owns: tuple[str, ...] = ()  # folders under <out> it writes, deleted when it starts over
    resumable: tuple[str, ...] = ()  # settings that may change without starting over (training step counts)


def pick(*keys: str) -> Callable[[DemoConfig], dict]:
    """A `settings` function: these DemoConfig fields (nested dataclasses as dicts)."""
    return lambda c: {k: asdict(v) if is_dataclass(v := getattr(c, k)) else v for k in keys}


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def torchrun(cfg: DemoConfig) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc}"]


def sh(cmd: list[str], log: Path) -> None:
    """Run one stage command, its output teed to <log>; a failure names the command and the log."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("WANDB_SILENT", "true")
    print("$ " + " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if not line.lstrip().startswith(("[W", "[20")) and "Warning" not in line:
                sys.stdout.write(line)
        rc = proc.wait()
    if rc:
        raise SystemExit(f"demo stage command failed (exit {rc}): {' '.join(cmd)}; see {log}")


@contextlib.contextmanager
def beside(cmd: list[str], log: Path, timeout_s: float = 900.0):
    """Run `cmd` in the background (at the lowest CPU priority, one thread: it takes what the foreground leaves; its
    output to `log`) while the block runs, then wait for it to finish on its own; a failure names the command and the
    log."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.setdefault("WANDB_SILENT", "true")
    print("$ " + " ".join(cmd) + " &", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(19)
        )
        try:
            yield proc
            rc = proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if rc:
        raise SystemExit(f"demo background command failed (exit {rc}): {' '.join(cmd)}; see {log}")
