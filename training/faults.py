"""Fault injection for the robustness tests: BITDANCE_FAULT_KILL=<point>:<step> SIGKILLs rank 0 there.

Points: `step` (after an optimizer step is logged), `after_model` and `before_latest` (inside a checkpoint
write). Unset in normal runs, where `maybe_kill` does nothing.
"""

from __future__ import annotations

import os
import signal

import torch.distributed as dist


def maybe_kill(point: str, step: int) -> None:
    if os.environ.get("BITDANCE_FAULT_KILL") != f"{point}:{step}":
        return
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
