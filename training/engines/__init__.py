"""Training engines: the interface every engine implements (`Engine`), what a step returns, process-group setup and
`build_engine`. The DeepSpeed engine (ZeRO 0-3) and the megatron-core engine (TP/PP) live beside this file; the loop
and the run-directory code (`training.checkpoint`) talk to them only through `Engine`."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (see below)
from torch import nn

# Modules whose functions default to `group=GroupMember.WORLD` capture the world group when they are imported. Imported
# after the group exists, they keep it alive past destroy_process_group; its gloo/TCPStore threads then run on into
# interpreter finalization, where a finished run may abort ("terminate called without an active exception", SIGABRT).
# So they are imported before init_distributed makes the group: torch.distributed.nn (which torch._dynamo imports) here,
# DeepSpeed (deepspeed.comm.torch: `barrier(group=GroupMember.WORLD)`) at the top of init_distributed.

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.ema import EMA
    from training.tasks import Task

Resume = Literal["all", "loader", "resized"]


@dataclass
class StepResult:
    applied: bool  # False at accumulation micro-steps and for skipped (non-finite) steps
    boundary: bool
    grad_norm: float


@dataclass
class StepStats:
    """One optimizer step as the training loop logs it: this rank's means over its micro-batches, and the samples /
    tokens / model FLOPs it counts (summed over all ranks by the loop)."""

    loss: float
    metrics: dict[str, float]
    samples: int
    tokens: int
    flops: float
    result: StepResult


class Engine(Protocol):
    """What the loop and the run-directory code need from an engine."""

    kind: str
    dp_rank: int  # this rank's data-parallel index and the data-parallel size (the loader splits over these)
    dp_size: int
    full_model_on_rank0: bool  # rank 0 can run the whole model (sample grids, export) as `module`

    @property
    def module(self) -> nn.Module:
        """This rank's trainable modules: the EMA tracks their parameters."""

    def set_lr(self, lr: float) -> None: ...

    def new_ema(self, decay: float) -> EMA:
        """The exponential moving average of the trained weights, laid out the way this engine shards them."""

    def ema_model(self, ema: EMA) -> nn.Module | None:
        """When `full_model_on_rank0` is False: a whole model holding the EMA weights on rank 0 (None elsewhere, or
        where it cannot be assembled, with a note); every rank calls it."""

    def train_step(self, batches, task: Task, grad_accum: int, poison: bool = False) -> StepStats:
        """Forward/backward over `grad_accum` micro-batches from `batches` and one optimizer step; `poison` makes the
        loss NaN (fault injection: the step must be skipped)."""

    def save_state(self, directory: Path, ema: EMA) -> tuple[dict, dict]:
        """Write model, EMA and optimizer state into the checkpoint `directory` (every rank calls this). Returns
        (this rank's extra tensors for its `rank_*.pt`, fields for `trainer.json`)."""

    def when_saved(self, finalize: Callable[[], None]) -> None:
        """Run `finalize` (every rank) once the state `save_state` started is on disk: at once when it was written
        synchronously, else when the background write completes (`poll_saves` / `wait_saves`)."""

    def poll_saves(self) -> None:
        """Finish background checkpoint writes that are done (every rank, at the same points; cheap otherwise)."""

    def wait_saves(self) -> None:
        """Block until every background checkpoint write is on disk and finalized (every rank)."""

    def load_state(self, directory: Path, ema: EMA, trainer: dict, per_rank: dict | None) -> Resume:
        """Restore model, EMA and optimizer state. Returns what else applies to this run: "all" (this rank's RNG and
        loader state), "loader" (same data-parallel size: rank 0's loader state; RNG starts fresh) or "resized"
        (another data-parallel size: the data stream is resized from every previous rank's loader state)."""


def init_distributed(engine_kind: str = "deepspeed") -> tuple[int, int, torch.device]:
    """Process group from the torchrun launcher env (a single process when absent). The megatron engine needs no
    DeepSpeed: its process group comes from torch.distributed directly."""
    if engine_kind == "deepspeed":
        import deepspeed  # before the process group exists (see the note at the imports)

    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # gloo next to NCCL on GPUs: the loop's small CPU collectives (metrics, flags) need it
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    if engine_kind == "deepspeed":
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")  # adopts the process group above
    return dist.get_rank(), dist.get_world_size(), device


def shutdown_distributed() -> None:
    """Free every process group this process made (megatron's model-parallel groups, DeepSpeed's, the world group),
    so that no gloo/NCCL thread outlives the run into interpreter finalization (see the note at the imports)."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        # megatron-core 0.16's destroy_model_parallel leaves these two set
        parallel_state._INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP = None
        parallel_state._INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_GLOO = None
    deepspeed_comm = sys.modules.get("deepspeed.comm.comm")
    if dist.is_initialized() and deepspeed_comm is not None and deepspeed_comm.cdb is not None:
        deepspeed_comm.destroy_process_group()  # torch's groups and DeepSpeed's references to them (its utils.groups)
    elif dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # groups held in reference cycles (a DeepSpeed engine's) are freed now, not during finalization


def precision(cfg: TrainConfig) -> str:
    if cfg.engine.precision != "auto":
        return cfg.engine.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def build_engine(cfg: TrainConfig, task: Task, grad_accum: int) -> Engine:
    """The engine of `engine.kind`, holding the task's model (the megatron engine builds its own chunks from it)."""
    if cfg.engine.kind == "megatron":
        from training.engines.megatron import MegatronEngine

        reference, task.model = task.model, None  # the engine takes the weights; its chunks replace the model
        return MegatronEngine(cfg, task.model_cfg, reference, task.init_checkpoint, task.init_folder)
    from training.engines.deepspeed import DeepSpeedEngine
    from training.optim import build_optimizer

    if precision(cfg) == "fp8":  # before the optimizer and the checkpoint wrappers (plain module names)
        from training.fp8 import convert_backbone, skipped_unaligned

        converted, skipped = convert_backbone(task.model, cfg.engine.fp8_recipe), skipped_unaligned(task.model)
        if dist.get_rank() == 0:
            print(
                f"fp8 (torchao {cfg.engine.fp8_recipe}): {len(converted)} backbone linears converted, "
                f"{len(skipped)} left in bf16 (dims not multiples of 16){': ' + ', '.join(skipped) if skipped else ''}",
                flush=True,
            )
    if cfg.model.activation_checkpointing:
        from training.activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(task.model)
    return DeepSpeedEngine(task.model, build_optimizer(task.model, cfg.optim), cfg, grad_accum)
