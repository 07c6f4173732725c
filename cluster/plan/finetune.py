"""Fine-tuning memory: what one GPU (and its host) holds when the reference model trains through the DeepSpeed engine
with a frozen base (`finetune.method` of `training.finetune`: lora, head; full for comparison), ZeRO 0-3, full
activation recompute and DeepSpeed's CPU offload (`engine.offload`: none, optimizer, params).

- parameters (`param_split`): counted exactly on a meta-device model the trainer's own method adapted
  (`Method.apply`): lora: PEFT adapters on the decoder layers' attention and MLP linears, r x (in + out) each (A is
  r x in, B is out x r), everything else frozen; head: the diffusion head, the projector and the P - 1 query rows of
  the text embedding trained, the backbone frozen; full: everything trained.
- frozen: the base weights at `finetune.base_dtype`, divided over dp under ZeRO-3.
- trainable (weights at the engine's precision), grads (the model's gradients at that width plus, for 16-bit
  weights, DeepSpeed's fp32 copy the optimizer steps on; dp-sharded from ZeRO-2), optim (Adam's two fp32 moments and,
  for 16-bit weights, the fp32 master weights; dp-sharded from ZeRO-1), EMA (the loop's fp32 average of the trainable
  weights, `training.ema`).
- activations, head, working: the planner's formulas (`cluster.plan.memory.stage_memory`) for one replica (tp 1,
  pp 1; with `model.activation_checkpointing` full recompute: every backbone layer keeps its input, one layer is
  rematerialised in backward, the head's blocks keep their inputs), at the width the frozen base computes in. Both
  lora and head need the backward through the frozen backbone (lora: its adapters; head: the projector and the
  query rows sit at its input), so their activations are full training's; only the frozen layers' weight gradients
  are never made.
- offload optimizer: the fp32 master weights, moments and fp32 gradients live in host memory, the gradients leave the
  GPU a reduce bucket at a time (DeepSpeed's `reduce_bucket_size`); the GPU keeps the weights and the EMA. Offload
  params (ZeRO-3, the optimizer offloaded too): the frozen and trainable weights and the EMA live in host memory as
  well; the GPU holds the parameters of the running modules (`gathered`: DeepSpeed's `max_live_parameters`, at least
  the largest module and a prefetch bucket).
- overhead: `memory.FIXED_OVERHEAD_GIB`, as for the training layouts.
Not counted: the host memory of loading the model before DeepSpeed takes it, DeepSpeed's pinned staging buffers.
tests/benchmarks/bench_finetune_memory.py checks the total (without overhead) against the measured peak of a LoRA and
a full step of a small model on CPU.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
from torch import nn

from cluster.plan.memory import ADAM_BYTES, FIXED_OVERHEAD_GIB, Behaviour, GiB, Workload, stage_memory
from cluster.plan.search import workload
from models.core.attention import resolve_attention
from models.t2i.megatron.batch import row_length
from models.t2i.megatron.config import ParallelSettings
from models.t2i.model import T2IConfig, TextToImageBitDance, get_t2i_config
from training.config import TrainConfig, validate
from training.engines import precision
from training.engines.deepspeed import OFFLOADS, DeepSpeedEngine, offload_settings
from training.finetune import BASE_DTYPES, build_method
from training.tasks.t2i import T2I_TARGETS

FP32_BYTES = 4


def finetune_run(
    train: TrainConfig,
    method: str,
    rank: int | None = None,
    offload: str | None = None,
    zero_stage: int | None = None,
) -> TrainConfig:
    """`train` as a fine-tuning run of the DeepSpeed engine: `method`, LoRA `rank` and `offload` (None: the config's),
    ZeRO `zero_stage` (None: 3 when the parameters are offloaded, else 2), checked by the trainer's own `validate`."""
    ft = train.finetune
    lora = replace(ft.lora, rank=ft.lora.rank if rank is None else rank)
    offload = train.engine.offload if offload is None else offload
    params = offload in OFFLOADS and "offload_param" in offload_settings(offload)  # validate names a bad one
    stage = (3 if params else 2) if zero_stage is None else zero_stage
    engine = replace(train.engine, kind=DeepSpeedEngine.kind, zero_stage=stage, offload=offload)
    return validate(replace(train, engine=engine, finetune=replace(ft, method=method, lora=lora)))


def planning_targets(cfg: T2IConfig):
    """The T2I task's fine-tuning targets with its P - 1 query rows (their ids do not matter to the counts)."""
    return replace(T2I_TARGETS, rows=tuple(range(cfg.parallel_num - 1)))


@dataclass(frozen=True)
class ParamSplit:
    """Parameter counts (elements) of the model as a method trains it."""

    frozen: int
    trainable: int
    largest_module: int  # the most parameters one module holds (what ZeRO-3 gathers at once)


_SPLITS: dict[tuple, ParamSplit] = {}


def param_split(cfg: T2IConfig, run: TrainConfig) -> ParamSplit:
    """Frozen / trainable elements of `cfg`'s model as `run.finetune` trains it, on the meta device."""
    key = (repr((cfg.llm, cfg.head)), repr(run.finetune))
    if key not in _SPLITS:
        with torch.device("meta"):
            model = TextToImageBitDance(cfg)
            build_method(run).apply(SimpleNamespace(model=model, finetune_targets=planning_targets(cfg)))
        _SPLITS[key] = _split(model)
    return _SPLITS[key]


def _split(model: nn.Module) -> ParamSplit:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParamSplit(total - trainable, trainable, largest)


def zero_default(name: str) -> int:
    """A default of DeepSpeed's ZeRO config (`reduce_bucket_size`, `max_live_parameters`, ...), in elements."""
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs its accelerator on import: stdout is the table's
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return int(DeepSpeedZeroConfig.model_fields[name].default)


@dataclass
class FinetuneMemory:
    """Bytes on one GPU at its peak by component, and in its host's memory (`host`)."""

    frozen: float  # frozen base weights resident on the GPU (ZeRO-3: this rank's shard)
    trainable: float  # trainable weights resident on the GPU
    gathered: float  # ZeRO-3: parameters gathered from the other ranks or the host for the running modules
    grads: float
    optimizer: float
    ema: float
    activations: float
    head: float
    working: float
    overhead: float
    host: float
    params: ParamSplit

    @property
    def static(self) -> float:
        return self.frozen + self.trainable + self.gathered + self.grads + self.optimizer + self.ema

    @property
    def total(self) -> float:
        return self.static + self.activations + self.head + self.working + self.overhead


def finetune_memory(
    cfg: T2IConfig,
    run: TrainConfig,
    work: Workload,
    how: Behaviour,
    dp: int = 1,
    cuda: bool = True,
    overhead: float = FIXED_OVERHEAD_GIB * GiB,
) -> FinetuneMemory:
    """One GPU's memory (and its host's) for one micro-batch `work` of `cfg`'s model fine-tuned as `run` says
    (`finetune_run`) on `dp` data-parallel GPUs (`cuda`: at the precision the engine picks on GPUs, else on CPU);
    `how` gives the attention backend (its width is the run's)."""
    split = param_split(cfg, run)
    a = BASE_DTYPES.get(precision(run, cuda), torch.bfloat16).itemsize  # trainable weights (fp8: bf16 weights)
    base = BASE_DTYPES[run.finetune.base_dtype].itemsize if split.frozen else a
    main = 0 if a == FP32_BYTES else FP32_BYTES  # DeepSpeed's fp32 master weights and gradients of 16-bit weights
    stage, n = run.engine.zero_stage, split.trainable
    offload = offload_settings(run.engine.offload)

    def shard(size: float, from_stage: int) -> float:
        return size / dp if stage >= from_stage else size

    optim, fp32_grads, grads = shard(n * (ADAM_BYTES + main), 1), shard(n * main, 2), shard(n * a, 2)
    frozen, trainable, ema = shard(split.frozen * base, 3), shard(n * a, 3), shard(n * FP32_BYTES, 3)
    gathered, host = 0.0, 0.0
    if "offload_optimizer" in offload:
        host += optim + fp32_grads
        optim = fp32_grads = 0.0
        grads = min(grads, zero_default("reduce_bucket_size") * a)
    if "offload_param" in offload:
        host += frozen + trainable + ema
        frozen = trainable = ema = 0.0
    if "offload_param" in offload or (stage == 3 and dp > 1):  # the running modules, up to DeepSpeed's live cap
        live = max(zero_default("max_live_parameters"), split.largest_module + zero_default("prefetch_bucket_size"))
        gathered = min(live, split.frozen + n) * max(a, base)
    width = replace(how, param_bytes=min(a, base))  # the frozen base computes in its own dtype
    replica = ParallelSettings(recompute="full" if run.model.activation_checkpointing else None)
    (acts,) = stage_memory(cfg, replica, 1, work, 1, width, overhead=0)
    return FinetuneMemory(
        frozen=frozen,
        trainable=trainable,
        gathered=gathered,
        grads=grads + fp32_grads,
        optimizer=optim,
        ema=ema,
        activations=acts.activations,
        head=acts.head,
        working=acts.working,
        overhead=overhead,
        host=host,
        params=split,
    )


def plan_finetune(run: TrainConfig, dp: int = 1) -> tuple[FinetuneMemory, Workload]:
    """The memory of `run` (`finetune_run`) on each of `dp` GPUs, for one micro-batch of its model (`model.name`) at
    its token budget, padded as the T2I task pads rows; and that micro-batch's workload."""
    cfg = get_t2i_config(run.model.name)
    attention = resolve_attention(run.model.attention, cuda=True)
    work = workload(cfg, row_length(run.data.token_budget, flex=attention == "flex"), run.data.micro_batch)
    return finetune_memory(cfg, run, work, Behaviour(attention=attention), dp), work
