"""Training runs launched as a user launches them (`torchrun --standalone`, or plain python for one process) and the
loss curve they log, shared by the end-to-end training tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def launch(
    args: list[str],
    nproc: int = 2,
    program: tuple[str, ...] | list[str] = ("-m", "training.train"),
    env: dict | None = None,
    check: bool = True,
    timeout: float = 600,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess:
    """`program args` on `nproc` processes (torchrun when more than one), `env` added to this environment; with
    `check`, a non-zero exit raises with the tail of its output."""
    launcher = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    proc = subprocess.run(
        [*launcher, *program, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-5000:])
    return proc


def losses(run_dir: Path | str) -> dict[int, float]:
    """Step -> loss of a run's metrics.jsonl (a resumed run logs replayed steps again: the last one is kept)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out
