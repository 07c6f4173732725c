"""Fault injection for the robustness tests: BITDANCE_FAULT_KILL=<point>:<step> SIGKILLs rank 0 there;
BITDANCE_FAULT_SIGTERM=<rank>:<step> sends SIGTERM to that rank alone after that step (a preemption notice that
reaches one rank only); BITDANCE_FAULT_KILL_RANK=<rank>:<step> SIGKILLs that rank after that step in a run that started
from scratch only, so a job that torchrun restarts (and that resumes from a checkpoint) does not die there again;
BITDANCE_FAULT_HANG=<rank>:<step> stops that rank forever before it starts that step (outside any collective), in the
first attempt of a torchrun job only; BITDANCE_FAULT_SLOW=<rank>:<factor> makes that rank's forwards take `factor`
times as long (a slow GPU: `training.step_monitor.ForwardClock` calls `maybe_slow_down`).

Kill points: `step` (after an optimizer step is logged), `after_model` and `before_latest` (inside a checkpoint
write). Unset in normal runs, where every function here does nothing.
"""

from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist


def maybe_kill(point: str, step: int) -> None:
    if os.environ.get("BITDANCE_FAULT_KILL") != f"{point}:{step}":
        return
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_sigterm(step: int) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if os.environ.get("BITDANCE_FAULT_SIGTERM") == f"{rank}:{step}":
        os.kill(os.getpid(), signal.SIGTERM)


def maybe_kill_rank(step: int, resumed: bool) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not resumed and os.environ.get("BITDANCE_FAULT_KILL_RANK") == f"{rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_hang(step: int) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and os.environ.get("BITDANCE_FAULT_HANG") == f"{rank}:{step}":
        while True:
            time.sleep(1)


def maybe_slow_down(elapsed: float) -> float:
    """Under BITDANCE_FAULT_SLOW=<rank>:<factor>, on that rank: sleep (factor - 1) x `elapsed`; the seconds slept."""
    fault = os.environ.get("BITDANCE_FAULT_SLOW")
    if not fault:
        return 0.0
    rank, factor = fault.split(":")
    if int(rank) != (dist.get_rank() if dist.is_initialized() else 0):
        return 0.0
    extra = (float(factor) - 1) * elapsed
    time.sleep(extra)
    return extra
