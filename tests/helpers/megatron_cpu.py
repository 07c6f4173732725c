"""Test-only harness for megatron-core on CPU: its CUDA device / RNG-tracker lookups redirected, gloo process groups.

megatron-core has no CPU path: tensor-parallel layers allocate on `torch.cuda.current_device()`, the RNG tracker
forks CUDA RNG state, activation recompute saves and restores the CUDA RNG state, the pipeline schedules fence their
p2p transfers with `torch.cuda.synchronize()`, and the optimizer, gradient clipping and schedules allocate small
tensors with `device="cuda"` and check parameters by their CUDA type names. Here the device lookup returns the CPU,
the tracker fork, the CUDA RNG state and the synchronize are no-ops (the models under test have no dropout) and a
torch function mode (`CudaAsCpu`) puts `device="cuda"` allocations on the CPU, which is enough for forward, backward
(with recompute), megatron's DDP and distributed optimizer and all of megatron's schedules (none, 1F1B, interleaved
1F1B) of the T2I model at any TP/PP/virtual-PP layout over gloo.
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
from torch.overrides import TorchFunctionMode

from training.engines import shutdown_distributed  # (importing it first imports what must precede the group)


class CudaAsCpu(TorchFunctionMode):
    """`device="cuda"` allocations land on the CPU, `.cuda()` is a no-op, `Tensor.type()` names a CUDA type."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def redirect_to_cpu(patch) -> None:
    """`patch(obj, name, value)`: `pytest.MonkeyPatch.setattr` in-process, plain `setattr` in a worker."""
    from megatron.core.tensor_parallel import random as megatron_random

    patch(torch.cuda, "current_device", lambda: torch.device("cpu"))
    patch(torch.cuda, "synchronize", lambda device=None: None)  # the pipeline schedules' p2p fences
    patch(megatron_random.CudaRNGStatesTracker, "fork", lambda self, name="": contextlib.nullcontext())
    # activation recompute saves and restores the CUDA RNG state next to the CPU one: there is none here
    patch(megatron_random, "_get_cuda_rng_state", lambda *a, **k: torch.empty(0, dtype=torch.uint8))
    patch(megatron_random, "_set_cuda_rng_state", lambda *a, **k: None)


def init_parallel(rank: int, world: int, port: int, tp: int = 1, pp: int = 1) -> None:
    from megatron.core import parallel_state

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def megatron_in_process(tp: int = 1, pp: int = 1, init_model_parallel: bool = True):
    """megatron on CPU inside the pytest process (world size 1), undone on exit. `init_model_parallel=False` leaves
    `parallel_state` to the code under test (e.g. an engine that initialises it)."""
    with pytest.MonkeyPatch.context() as mp_, CudaAsCpu():
        redirect_to_cpu(mp_.setattr)
        if init_model_parallel:
            init_parallel(0, 1, free_port(), tp, pp)
        else:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            yield
        finally:
            shutdown_distributed()


def _entry(rank: int, fn, world: int, port: int, tp: int, pp: int, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    redirect_to_cpu(setattr)
    CudaAsCpu().__enter__()  # for the life of this worker process
    if tp:
        init_parallel(rank, world, port, tp, pp)
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        shutdown_distributed()


def spawn(fn, world: int, tp: int, pp: int, out_dir: Path, *args) -> list:
    """Run `fn(rank, out_dir, *args)` on `world` gloo ranks; returns what each rank saved with `save_result`.
    `tp=0` leaves `parallel_state` uninitialised (for code that initialises it itself)."""
    mp.spawn(_entry, args=(fn, world, free_port(), tp, pp, (out_dir, *args)), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def save_result(out_dir: Path, rank: int, result) -> None:
    torch.save(result, out_dir / f"rank{rank}.pt")
