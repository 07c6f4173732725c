"""The planner's layout search: every parallel layout a cluster allows for a training config, checked by the engine's
own rules, sized by the memory model (`cluster.plan.memory`) and timed; the fastest that fits first.

Candidates are the training config's own `parallel` section (`models.t2i.megatron.config.ParallelSettings`) with the
layout fields set: tp inside a node dividing the GPUs per node; pp dividing the GPUs over tp, its stages taking an even
split of the layers (pp dividing them; vpp with pp >= 2 and pp * vpp dividing them) or a `pp_layers` split with a
lighter last stage (`pp_splits`); sequence parallelism whenever tp > 1; recompute none / selective / full. Each is
checked by the model's own `validate_parallel` (heads, KV heads, MLP width, vocabulary padded to tp, the split) and
the loop's `grad_accumulation` (data.global_batch over dp = gpus / (tp * pp), the interleaved schedule's rule).

Step time: model FLOPs of `models.t2i.flops` (`t2i_batch_flops`: backbone, attention pairs, LM head, diffusion head)
at `ASSUMED_MFU`, recompute's extra forward, tensor-parallel collectives over NVLink, pipeline sends, the
data-parallel gradient reduce-scatter and weight all-gather (not overlapped by the engine), on the slowest stage (its
layers; the heads on the last), stretched by the pipeline bubble (pp - 1) / (vpp * m) for m micro-batches per step.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cluster.plan.memory import (
    GRAD_BYTES,
    Behaviour,
    GiB,
    StageMemory,
    Workload,
    model_chunks,
    planning_workload,
    sequence_split,
    stage_memory,
)
from models.core.attention import resolve_attention
from models.t2i.megatron.batch import row_length
from models.t2i.megatron.config import (
    MegatronParallelConfig,
    ParallelSettings,
    stage_layer_counts,
    validate_parallel,
)
from models.t2i.model import T2IConfig, get_t2i_config
from training.config import TrainConfig, grad_accumulation, load_config
from training.engines import engine_class, precision
from training.engines.megatron import MegatronEngine
from training.flops import BF16_PEAK_TFLOPS

ASSUMED_MFU = 0.45  # matmul/attention efficiency of the compute itself; communication and bubble are added on top
NVLINK_GBS = 300.0  # effective per-GPU bandwidth of a tensor-parallel collective inside a node (GB/s)
NETWORK_GBS = 40.0  # effective per-GPU bandwidth between nodes (one 400 Gb/s NIC per GPU)
RECOMPUTE = (None, "selective", "full")
CONFIGS = {"14B-16x": "training/configs/t2i_14b_16x.yaml", "14B-64x": "training/configs/t2i_14b_64x.yaml"}
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Cluster:
    gpus: int
    gpu_mem_gib: float
    gpus_per_node: int = 8
    peak_tflops: float = BF16_PEAK_TFLOPS["H200"]
    mfu: float = ASSUMED_MFU

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.gpus_per_node)


@dataclass
class Plan:
    """One layout's verdict: memory per stage, step-time estimate, or why it cannot run."""

    par: ParallelSettings
    dp: int
    micro_batches: int
    stages: list[StageMemory] = field(default_factory=list)
    step_s: float = 0.0
    bubble: float = 0.0
    mfu: float = 0.0
    error: str = ""

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    def fits(self, gpu_mem_gib: float) -> bool:
        return not self.error and self.peak.total <= gpu_mem_gib * GiB


# ---- candidates -----------------------------------------------------------------------------------------------------


def pp_splits(num_layers: int, pp: int) -> list[list[int]]:
    """`pp_layers` worth trying for pp stages: the last stage, which also holds the LM head and the diffusion head,
    lighter than the others; the stages in between equal, the first equal to them or one layer more."""
    out = []
    for last in range(1, num_layers):
        share, extra = divmod(num_layers - last, pp - 1)
        if extra <= 1 and last < share:
            out.append([share + extra, *[share] * (pp - 2), last])
    return out


def pipeline_shapes(num_layers: int, pp: int) -> list[tuple[list[int] | None, int | None]]:
    """(pp_layers, virtual_pp) candidates for pp stages: the even split, plain or interleaved, then `pp_splits`."""
    if pp == 1:
        return [(None, None)]
    even = [(None, v) for v in (None, *range(2, num_layers // pp + 1)) if num_layers % (pp * (v or 1)) == 0]
    return even + [(split, None) for split in pp_splits(num_layers, pp)]


def layouts(cfg: T2IConfig, cl: Cluster, base: ParallelSettings) -> list[ParallelSettings]:
    """Every TP (inside a node) x PP (`pipeline_shapes`) x recompute candidate, as `base` with those fields set;
    sequence parallelism whenever tp > 1 (it only saves memory); full recompute layer by layer (megatron's default)."""
    L = cfg.llm.num_hidden_layers
    out = []
    for tp in (t for t in range(1, cl.gpus_per_node + 1) if cl.gpus_per_node % t == 0):
        for pp in (p for p in range(1, L + 1) if cl.gpus % (tp * p) == 0):
            for (pp_layers, vpp), recompute in itertools.product(pipeline_shapes(L, pp), RECOMPUTE):
                fields = dict(tp=tp, pp=pp, pp_layers=pp_layers, virtual_pp=vpp, sequence_parallel=tp > 1)
                out.append(
                    replace(base, **fields, recompute=recompute, recompute_method=None, recompute_num_layers=None)
                )
    return out


# ---- one layout -----------------------------------------------------------------------------------------------------


def step_time(
    cfg: T2IConfig,
    par: ParallelSettings,
    dp: int,
    m: int,
    work: Workload,
    stages: list[StageMemory],
    cl: Cluster,
    a: int,
) -> tuple[float, float]:
    """(seconds per optimizer step, bubble fraction) of the slowest stage's pipeline."""
    L, D = cfg.llm.num_hidden_layers, cfg.llm.hidden_size
    chunks = model_chunks(par)
    rate = cl.peak_tflops * 1e12 * cl.mfu
    ends = work.flops - work.backbone_flops  # LM head, projector, diffusion head: the last stage
    per_layer = work.backbone_flops / L  # recompute adds a forward: a third of forward + backward
    if par.recompute == "full":
        per_layer, ends = per_layer * 4 / 3, ends * 4 / 3
    elif par.recompute == "selective":
        per_layer += work.attention_flops / L / 3
    slowest = 0.0
    for r, layers in enumerate(stage_layer_counts(L, par)):
        flops = layers * per_layer + (ends if r == par.pp - 1 else 0)
        compute = flops / par.tp / rate
        tp_comm = 0.0
        if par.tp > 1:  # per layer: all-gather + reduce-scatter around attention and MLP, forward and backward
            volume = work.tokens * D * a * (par.tp - 1) / par.tp
            collectives = 10 + (4 if par.recompute == "full" else 0)
            tp_comm = layers * collectives * volume / (NVLINK_GBS * 1e9)
        p2p = 0.0
        if par.pp > 1:
            inside = par.tp * dp * par.pp <= cl.gpus_per_node
            sent = 2 * work.tokens / sequence_split(par) * D * a * chunks
            p2p = sent / ((NVLINK_GBS if inside else NETWORK_GBS) * 1e9)
        slowest = max(slowest, compute + tp_comm + p2p)
    bubble = (par.pp - 1) / (chunks * m)
    dp_comm = 0.0
    if dp > 1:
        inside = par.tp * dp <= cl.gpus_per_node
        bw = (NVLINK_GBS if inside else NETWORK_GBS) * 1e9
        biggest = max(s.weights / a for s in stages)  # parameters of the heaviest stage
        dp_comm = biggest * (GRAD_BYTES + a) * (dp - 1) / dp / bw  # gradient reduce-scatter + weight all-gather
    return slowest * m * (1 + bubble) + dp_comm, bubble


def plan_layout(
    cfg: T2IConfig, par: ParallelSettings, cl: Cluster, train: TrainConfig, micro_batches: int | None, how: Behaviour
) -> Plan:
    """Check `par` with the model's `validate_parallel` and the loop's `grad_accumulation`, then size it."""
    dp = cl.gpus // (par.tp * par.pp)
    plan = Plan(par, dp, micro_batches or 0)
    padded = replace(cfg, llm=replace(cfg.llm, vocab_size=-(-cfg.llm.vocab_size // par.tp) * par.tp))
    try:
        validate_parallel(padded, MegatronParallelConfig(**asdict(par)))
        if micro_batches is None:  # the training loop's own check of global batch vs dp and the interleaved schedule
            run = replace(train, parallel=par, engine=replace(train.engine, kind="megatron"))
            plan.micro_batches = grad_accumulation(run, cl.gpus)
        elif par.virtual_pp and micro_batches % par.pp:
            raise ValueError(f"interleaving needs micro-batches ({micro_batches}) to be a multiple of pp={par.pp}")
    except ValueError as e:
        plan.error = str(e)
        return plan
    fp8, flex = par.fp8 is not None, how.attention == "flex"
    length = row_length(train.data.token_budget, par.tp, par.sequence_parallel, fp8, flex)  # as the engine pads
    work = workload(padded, length, train.data.micro_batch)
    plan.stages = stage_memory(padded, par, dp, work, plan.micro_batches, how)
    plan.step_s, plan.bubble = step_time(padded, par, dp, plan.micro_batches, work, plan.stages, cl, how.param_bytes)
    flops_step = work.flops * plan.micro_batches * dp
    plan.mfu = flops_step / plan.step_s / (cl.peak_tflops * 1e12 * cl.gpus)
    return plan


_WORKLOADS: dict[tuple, Workload] = {}


def workload(cfg: T2IConfig, length: int, rows: int) -> Workload:
    """`planning_workload`, computed once per model, length and rows."""
    key = (repr((cfg.llm, cfg.head, cfg.image_sizes)), length, rows)
    if key not in _WORKLOADS:
        _WORKLOADS[key] = planning_workload(cfg, length, rows)
    return _WORKLOADS[key]


# ---- every layout ---------------------------------------------------------------------------------------------------


def load_train_config(name: str, config: str | None, token_budget: int | None) -> tuple[str, TrainConfig]:
    """(YAML path as given, the training config) of `name`: `config` or the model's own YAML, `model.name` set."""
    path = config or CONFIGS.get(name)
    if path is None:
        raise ValueError(f"no training config known for {name!r}; pass --config")
    overrides = [f"model.name={name}"] + ([f"data.token_budget={token_budget}"] if token_budget else [])
    full = path if Path(path).is_absolute() else str(REPO / path)
    return path, load_config(full, overrides)


def train_config(name: str, config: str | None, token_budget: int | None) -> tuple[str, TrainConfig]:
    """`load_train_config`, refused unless it trains with megatron-core (whose layouts the planner searches)."""
    path, train = load_train_config(name, config, token_budget)
    if engine_class(train) is not MegatronEngine:
        raise ValueError(
            f"{path} trains with another engine than megatron-core, whose layouts the planner searches; pass a config "
            "that uses it (e.g. training/configs/t2i_14b_16x.yaml)"
        )
    return path, train


def plan_all(
    name: str, cl: Cluster, train: TrainConfig, micro_batches: int | None = None
) -> tuple[list[Plan], Workload]:
    """Every candidate layout, feasible ones first (fastest first), then those that do not fit, then errors; and the
    planning row without model parallelism."""
    cfg = get_t2i_config(name)
    attention = resolve_attention(train.model.attention, cuda=True)
    how = Behaviour(attention=attention, param_bytes=2 if precision(train, cuda=True) in ("bf16", "fp8") else 4)
    plans = [plan_layout(cfg, par, cl, train, micro_batches, how) for par in layouts(cfg, cl, train.parallel)]
    fits = sorted((p for p in plans if p.fits(cl.gpu_mem_gib)), key=lambda p: (p.step_s, p.peak.total))
    over = sorted((p for p in plans if not p.error and not p.fits(cl.gpu_mem_gib)), key=lambda p: p.peak.total)
    bad = [p for p in plans if p.error]
    length = row_length(train.data.token_budget, flex=attention == "flex")
    return fits + over + bad, workload(cfg, length, train.data.micro_batch)
