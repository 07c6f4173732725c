"""Test-only harness for megatron-core on CPU: its CUDA device / RNG-tracker lookups redirected, gloo process groups.

megatron-core has no CPU path: tensor-parallel layers allocate on `torch.cuda.current_device()` and the RNG tracker
forks CUDA RNG state. Here the device lookup returns the CPU and the tracker fork is a no-op (the models under test
have no dropout), which is enough for forward and backward of the T2I model at any TP/PP layout over gloo.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def redirect_to_cpu(patch) -> None:
    """`patch(obj, name, value)`: `pytest.MonkeyPatch.setattr` in-process, plain `setattr` in a worker."""
    from megatron.core.tensor_parallel import random as megatron_random

    patch(torch.cuda, "current_device", lambda: torch.device("cpu"))
    patch(megatron_random.CudaRNGStatesTracker, "fork", lambda self, name="": contextlib.nullcontext())


def init_parallel(rank: int, world: int, port: int, tp: int = 1, pp: int = 1) -> None:
    from megatron.core import parallel_state

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def shutdown_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def megatron_in_process(tp: int = 1, pp: int = 1):
    """megatron on CPU inside the pytest process (world size 1), undone on exit."""
    with pytest.MonkeyPatch.context() as mp_:
        redirect_to_cpu(mp_.setattr)
        init_parallel(0, 1, free_port(), tp, pp)
        try:
            yield
        finally:
            shutdown_parallel()


def _entry(rank: int, fn, world: int, port: int, tp: int, pp: int, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    redirect_to_cpu(setattr)
    init_parallel(rank, world, port, tp, pp)
    try:
        fn(rank, *args)
    finally:
        shutdown_parallel()


def spawn(fn, world: int, tp: int, pp: int, out_dir: Path, *args) -> list:
    """Run `fn(rank, out_dir, *args)` on `world` gloo ranks; returns what each rank saved with `save_result`."""
    mp.spawn(_entry, args=(fn, world, free_port(), tp, pp, (out_dir, *args)), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def save_result(out_dir: Path, rank: int, result) -> None:
    torch.save(result, out_dir / f"rank{rank}.pt")
