"""The planner's fine-tuning output: the memory table of a model's fine-tuning runs (`python -m cluster.plan --finetune
lora`), and the fine-tuning section of cluster/PLAN_14B.md: both 14B models on one 80 GB and one 24 GB GPU, lora and
head, every offload, at the YAML's packed row and at a row of one 1024x1024 image."""

from __future__ import annotations

from cluster.plan.finetune import FinetuneMemory, finetune_run, plan_finetune
from cluster.plan.memory import CAPTION_TOKENS, FIXED_OVERHEAD_GIB, PLAN_IMAGE, GiB
from cluster.plan.report import render
from cluster.plan.search import load_train_config
from models.t2i.model import get_t2i_config
from models.t2i.packing import sample_length
from training.config import TrainConfig
from training.engines import precision
from training.engines.deepspeed import OFFLOADS

COLUMNS = (
    "method",
    "offload",
    "ZeRO",
    "trainable params",
    "frozen",
    "trainable",
    "gathered",
    "grads",
    "optim",
    "EMA",
    "activations",
    "head",
    "working",
    "GPU",
    "host",
)
SINGLE_GPUS = (80.0, 24.0)  # GiB of the one-GPU tables: an 80 GB H100 / A100, a 24 GB card
SECTION_METHODS = ("lora", "head")
SECTION_MODELS = ("14B-16x", "14B-64x")


def one_image_budget(name: str) -> int:
    """Positions of a row holding one planning image (1024x1024) with a planning caption."""
    cfg = get_t2i_config(name)
    return sample_length(CAPTION_TOKENS, *cfg.grid(*PLAN_IMAGE))


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def fits(mem: FinetuneMemory, gpu_mem_gib: float) -> bool:
    return mem.total <= gpu_mem_gib * GiB


def component_row(run: TrainConfig, mem: FinetuneMemory) -> list[str]:
    parts = (mem.frozen, mem.trainable, mem.gathered, mem.grads, mem.optimizer, mem.ema)
    parts += (mem.activations, mem.head, mem.working, mem.total, mem.host)
    e = run.engine
    return [run.finetune.method, e.offload, str(e.zero_stage), f"{mem.params.trainable / 1e6:,.1f}M", *map(_gib, parts)]


def finetune_table(
    name: str,
    train: TrainConfig,
    methods: tuple[str, ...],
    offloads: tuple[str, ...] = OFFLOADS,
    rank: int | None = None,
    zero_stage: int | None = None,
    dp: int = 1,
    gpu_mems: tuple[float, ...] = SINGLE_GPUS,
    markdown: bool = False,
) -> str:
    """GiB per GPU of every (method, offload) run of `train`'s model on `dp` GPUs, by component, and whether it fits
    each of `gpu_mems`."""
    rows, work = [], None
    for method in methods:
        for offload in offloads:
            run = finetune_run(train, method, rank, offload, zero_stage)
            mem, work = plan_finetune(run, dp)
            rows.append([*component_row(run, mem), *("yes" if fits(mem, g) else "no" for g in gpu_mems)])
    ft = run.finetune
    recompute = "every layer and head block recomputed" if run.model.activation_checkpointing else "no recompute"
    title = (
        f"{name} fine-tuning on {dp} GPU(s) (DeepSpeed, {precision(run, cuda=True)}, frozen base {ft.base_dtype}, "
        f"LoRA rank {ft.lora.rank} alpha {ft.lora.alpha}, {recompute}): micro-batch {run.data.micro_batch} x "
        f"{work.length} positions ({work.targets} image targets, {work.text} labelled text tokens)"
    )
    note = (
        f"GiB per GPU; GPU = the sum, fixed overhead {FIXED_OVERHEAD_GIB:g} GiB included; host: the offloaded state "
        "in CPU memory; gathered: ZeRO-3 parameters gathered for the running modules. lora and head backpropagate "
        "through the frozen backbone (adapters inside it; projector and query rows at its input): activations as in "
        "full training."
    )
    columns = (*COLUMNS, *(f"fits {g:g} GiB" for g in gpu_mems))
    return "\n".join([f"**{title}**" if markdown else title, "", note, "", render(rows, markdown, columns)])


def finetune_section(models: tuple[str, ...] = SECTION_MODELS, methods: tuple[str, ...] = SECTION_METHODS) -> str:
    """The fine-tuning section of cluster/PLAN_14B.md: the one-GPU summary, then each model's tables at the YAML's
    row and at one 1024x1024 image."""
    small, large = SINGLE_GPUS[::-1]
    summary = [
        f"| model | method | offload | trainable params | GPU GiB, YAML row | GPU GiB, one image | host GiB | "
        f"1 x {large:g} GB | 1 x {small:g} GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    details, lengths = [], {}
    for name in models:
        _, train = load_train_config(name, None, None)
        short = load_train_config(name, None, one_image_budget(name))[1]
        details += [f"### {name}", ""]
        for t in (train, short):
            details += [finetune_table(name, t, methods, markdown=True), ""]
        for method in methods:
            for offload in OFFLOADS:
                (long_mem, long_work), (short_mem, short_work) = (
                    plan_finetune(finetune_run(t, method, offload=offload)) for t in (train, short)
                )
                lengths = {"YAML row": long_work.length, "one image": short_work.length}
                verdicts = [_verdict(long_mem, short_mem, g) for g in (large, small)]
                summary.append(
                    f"| {name} | {method} | {offload} | {long_mem.params.trainable / 1e6:,.1f}M | "
                    f"{_gib(long_mem.total)} | {_gib(short_mem.total)} | {_gib(long_mem.host)} | "
                    + " | ".join(verdicts)
                    + " |"
                )
    intro = [
        "## Fine-tuning on one GPU",
        "",
        "Generated with the layouts above (`python -m cluster.plan --report`); one model with `python -m cluster.plan",
        "--finetune lora|head [--lora-rank R] [--offload none|optimizer|params] [--gpu-mem G] [--token-budget N]`.",
        "The memory model is `cluster/plan/finetune.py` (checked against the measured peaks of LoRA, head and full",
        "steps of a small model on CPU by tests/benchmarks/bench_finetune_memory.py): the DeepSpeed engine (bf16,",
        "fp32 master weights; ZeRO-2, ZeRO-3 with `params`) with the trainer's own `finetune.method` applied to a",
        "meta-device model (lora: PEFT adapters on every decoder layer's attention and MLP linears, the base frozen;",
        "head: the diffusion head, the projector and the query rows train, the backbone frozen), AdamW and the fp32",
        "EMA of the trainable weights, every layer and head block recomputed. Both methods backpropagate through the",
        "frozen backbone (lora: the adapters inside it; head: the projector and query rows at its input), so their",
        "activations are full training's. `offload`: `optimizer` keeps the fp32 master weights, Adam moments and fp32",
        "gradients in host memory (`host`); `params` (ZeRO-3) also the weights and the EMA, the GPU gathering the",
        f"running modules' weights. Rows: micro-batch 1 of the YAML's {lengths['YAML row']:,}-position packed row, or",
        f"of one 1024x1024 image with a {CAPTION_TOKENS}-token caption ({lengths['one image']:,} positions). A run",
        f"fits when its total, fixed overhead ({FIXED_OVERHEAD_GIB:g} GiB) included, fits the GPU; `one image`: only",
        "at the one-image row.",
        "",
    ]
    return "\n".join([*intro, *summary, "", *details])


def _verdict(long_mem: FinetuneMemory, short_mem: FinetuneMemory, gpu: float) -> str:
    """yes: at the YAML's row; one image: only at the one-image row; no."""
    if fits(long_mem, gpu):
        return "yes"
    return "one image" if fits(short_mem, gpu) else "no"
