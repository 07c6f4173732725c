"""Training engines: the interface every engine implements (`Engine`, with the config-time part in `EngineBase`), what
a step returns, process-group setup, and the registry of engines by `engine.kind` (`ENGINES`). The DeepSpeed engine
(ZeRO 0-3) and the megatron-core engine (TP/PP) live beside this file, each owning its setup and its config checks;
the loop and the run-directory code (`training.checkpoint`) talk to them only through `Engine`. Adding an engine is
one module here that subclasses `EngineBase` plus one `ENGINES.register` line below.
"""

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

from models.core.registry import Registry

# Modules whose functions default to `group=GroupMember.WORLD` capture the world group when they are imported. Imported
# after the group exists, they keep it alive past destroy_process_group; its gloo/TCPStore threads then run on into
# interpreter finalization, where a finished run may abort ("terminate called without an active exception", SIGABRT).
# So they are imported before init_distributed makes the group: torch.distributed.nn (which torch._dynamo imports) here,
# DeepSpeed (deepspeed.comm.torch: `barrier(group=GroupMember.WORLD)`) in DeepSpeedEngine.before_process_group.

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
    optimizer_s: float = 0.0  # seconds in the optimizer step (DeepSpeed: with its gradient reduction at the boundary)
    forward_s: float = 0.0  # seconds this rank computed forwards (`training.step_monitor.ForwardClock`: stragglers)


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

    def validation_sums(self, batches: list[tuple[tuple, bool]], task: Task) -> torch.Tensor:
        """Forward only, in eval mode, over this replica's held-out batches ((model inputs, whether its sums count)
        pairs, as many on every replica): the sum of `task.validation_sums` over the counted ones and over the
        data-parallel replicas, the same on every rank (every rank calls this; `training.validation`)."""

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


def init_distributed(engine: type[EngineBase] | str = "deepspeed") -> tuple[int, int, torch.device]:
    """Process group from the torchrun launcher env (a single process when absent), with the hooks of `engine` (a class
    or its `engine.kind` name) around it."""
    engine = ENGINES.get(engine) if isinstance(engine, str) else engine
    engine.before_process_group()
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
    engine.after_process_group(cuda)
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


class EngineBase:
    """What an engine says about a run before any process starts (class methods: the config loader, the launcher-side
    tools and the tasks call them), with the defaults of an engine that holds the task's whole model on every rank."""

    kind: str
    precisions: tuple[str, ...] = ("fp32", "bf16")  # engine.precision values it trains with (besides "auto")
    model_kinds: tuple[str, ...] | None = None  # the model families it trains (None: every family)
    shards_model = False  # builds its own sharded model from the task's config and `model.init_from`
    supports_async_save = False  # checkpoint.async_save
    export_how = "the run's export"  # how to get official-layout weights when the EMA is sharded over ranks

    @classmethod
    def check(cls, cfg: TrainConfig) -> list[tuple[bool, str]]:
        """This engine's own config checks: (ok, one-line message naming the fix) pairs."""
        return []

    @classmethod
    def check_model(cls, cfg: TrainConfig, model_cfg) -> None:
        """Refuse (one line, naming the setting and the fix) a layout this engine cannot give the model `model_cfg`;
        called at start-up, before any work, with the named model (`training.config.startup_checks`)."""

    @classmethod
    def before_process_group(cls) -> None:
        """Imports that must happen before the process group exists (see the note at the imports)."""

    @classmethod
    def after_process_group(cls, cuda: bool) -> None:
        """Setup that adopts the process group `init_distributed` made."""

    @classmethod
    def auto_precision(cls, cfg: TrainConfig, cuda: bool) -> str:
        """What engine.precision=auto trains with: bf16 on GPUs, fp32 on CPU."""
        return "bf16" if cuda else "fp32"

    @classmethod
    def data_parallel_size(cls, cfg: TrainConfig, world_size: int) -> int:
        return world_size

    @classmethod
    def check_accumulation(cls, cfg: TrainConfig, micro_batches: int) -> None:
        """Refuse (one line) a number of micro-batches per step this engine's schedule cannot run."""

    @classmethod
    def vocab_multiple(cls, cfg: TrainConfig) -> int:
        """The text vocabulary (embedding rows) is padded to a multiple of this."""
        return 1

    @classmethod
    def build(cls, cfg: TrainConfig, task: Task, grad_accum: int) -> Engine:
        raise NotImplementedError

    @classmethod
    def export_checkpoint(cls, checkpoint: Path, dst: Path, text_tokenizer: Path, image_tokenizer: Path) -> Path:
        """Write the EMA weights of a checkpoint this engine saved as an official-layout T2I folder `dst`, on CPU in
        this process without a process group (eval.watch; implementations: training/engines/export.py)."""
        raise NotImplementedError(
            f"engine.kind={cls.kind} cannot export its checkpoints to an official folder; add export_checkpoint to it"
        )


ENGINES: Registry[type[EngineBase]] = Registry("engine.kind")
ENGINES.register("deepspeed", "training.engines.deepspeed:DeepSpeedEngine")
ENGINES.register("megatron", "training.engines.megatron:MegatronEngine")


def engine_class(cfg: TrainConfig) -> type[EngineBase]:
    return ENGINES.get(cfg.engine.kind)


def precision(cfg: TrainConfig, cuda: bool | None = None) -> str:
    """engine.precision with "auto" resolved by the engine, for this machine or (`cuda`) for a GPU / CPU machine."""
    if cfg.engine.precision != "auto":
        return cfg.engine.precision
    return engine_class(cfg).auto_precision(cfg, torch.cuda.is_available() if cuda is None else cuda)


def build_engine(cfg: TrainConfig, task: Task, grad_accum: int) -> Engine:
    """The engine of `engine.kind`, holding the task's model (an engine that shards the model builds its own)."""
    return engine_class(cfg).build(cfg, task, grad_accum)
