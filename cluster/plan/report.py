"""The planner's output: the table of the fastest layouts that fit, the best one's `torchrun` command, and
cluster/PLAN_14B.md (both 14B models on the clusters of `REPORT_CASES`)."""

from __future__ import annotations

from cluster.plan.memory import FIXED_OVERHEAD_GIB, GiB
from cluster.plan.search import ASSUMED_MFU, Cluster, Plan, plan_all, train_config
from models.t2i.megatron.config import ParallelSettings
from training.config import TrainConfig
from training.flops import BF16_PEAK_TFLOPS

COLUMNS = (
    "layout",
    "dp",
    "m",
    "weights",
    "grads",
    "optim",
    "EMA",
    "activations",
    "head",
    "working",
    "peak (stage)",
    "first / last",
    "step s",
    "bubble",
    "MFU",
)
REPORT_CASES = (  # (label, GPU, GPUs, GiB per GPU)
    ("8 x H200 (one node)", "H200", 8, 141.0),
    ("16 x H100 (2 nodes)", "H100", 16, 80.0),
    ("32 x H100 (4 nodes)", "H100", 32, 80.0),
    ("64 x H100 (8 nodes)", "H100", 64, 80.0),
    ("64 x H200 (8 nodes)", "H200", 64, 141.0),
)


def split_text(pp_layers: list[int]) -> str:
    return "[" + ",".join(map(str, pp_layers)) + "]"


def layout_label(par: ParallelSettings) -> str:
    """e.g. `tp2 sp pp2 vpp5 full`, `tp4 sp pp4 [11,10,10,9]`."""
    vpp = f" vpp{par.virtual_pp}" if par.virtual_pp else ""
    split = f" {split_text(par.pp_layers)}" if par.pp_layers else ""
    recompute = f" {par.recompute}" if par.recompute else ""
    return f"tp{par.tp}{' sp' if par.sequence_parallel else ''} pp{par.pp}{vpp}{split}{recompute}"


def torchrun_command(config: str, par: ParallelSettings, cl: Cluster, yaml_split: list[int] | None) -> str:
    """The multi-node launch of `training.train` with this layout (run on every node; $HEAD is node 0); `yaml_split`
    is the YAML's own `parallel.pp_layers`, which the command resets when the layout has none."""
    split = ""
    if par.pp_layers is not None:  # quoted: [...] is a shell glob
        split = f" 'parallel.pp_layers={split_text(par.pp_layers)}'"
    elif yaml_split is not None:
        split = " parallel.pp_layers=null"
    parts = [
        f"torchrun --nnodes {cl.nodes} --nproc-per-node {min(cl.gpus, cl.gpus_per_node)}",
        "--rdzv-backend c10d --rdzv-endpoint $HEAD:29500",
        f"-m training.train --config {config}",
        f"parallel.tp={par.tp} parallel.pp={par.pp}{split} parallel.virtual_pp={par.virtual_pp or 'null'}",
        f"parallel.sequence_parallel={str(par.sequence_parallel).lower()} parallel.recompute={par.recompute or 'null'}",
    ]
    if par.recompute is None:  # the YAMLs turn model.activation_checkpointing on, which means full recompute
        parts[-1] += " model.activation_checkpointing=false"
    return " \\\n    ".join(parts)


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def row(p: Plan) -> list[str]:
    """A table row: the fullest stage's components, its total and index, the first and last stages' totals."""
    pk = p.peak
    return [
        layout_label(p.par),
        str(p.dp),
        str(p.micro_batches),
        _gib(pk.weights),
        _gib(pk.grads),
        _gib(pk.optimizer),
        _gib(pk.ema),
        _gib(pk.activations),
        _gib(pk.head),
        _gib(pk.working),
        f"{_gib(pk.total)} ({pk.stage})",
        f"{_gib(p.stages[0].total)} / {_gib(p.stages[-1].total)}",
        f"{p.step_s:.1f}",
        f"{p.bubble:.0%}",
        f"{p.mfu:.0%}",
    ]


def render(rows: list[list[str]], markdown: bool, columns: tuple[str, ...] = COLUMNS) -> str:
    if markdown:
        head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
        return "\n".join([head, *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def report(
    name: str, cl: Cluster, config: str, train: TrainConfig, micro_batches: int | None, top: int, md: bool
) -> tuple[str, Plan | None]:
    """The table of the `top` fastest fitting layouts (or the smallest that do not fit) and the best one's command;
    and the best plan (None when nothing fits)."""
    plans, work = plan_all(name, cl, train, micro_batches)
    fitting = [p for p in plans if p.fits(cl.gpu_mem_gib)]
    sized = [p for p in plans if not p.error]
    title = (
        f"{name} on {cl.gpus} GPUs ({cl.nodes} node(s) x {min(cl.gpus, cl.gpus_per_node)}) of {cl.gpu_mem_gib:g} GiB, "
        f"token budget {train.data.token_budget} x micro-batch {train.data.micro_batch}, global batch "
        f"{train.data.global_batch if micro_batches is None else 'm x dp'}"
    )
    lines = [f"**{title}**" if md else title, ""]
    lines.append(
        f"Planning row: {work.length} positions, {work.targets} image targets, {work.text} labelled text tokens; "
        f"{len(fitting)} of {len(sized)} sized layouts fit ({len(plans) - len(sized)} refused by the config checks). "
        "Memory in GiB per GPU; peak = the fullest pipeline stage; fixed overhead "
        f"{FIXED_OVERHEAD_GIB:g} GiB included; step time at {cl.mfu:.0%} MFU of {cl.peak_tflops:g} TFLOP/s."
    )
    reasons: dict[str, int] = {}
    for p in plans:
        if p.error:
            reasons[p.error] = reasons.get(p.error, 0) + 1
    if reasons:
        lines.append("")
        lines.append("Refused: " + "; ".join(f"{n} x `{e}`" if md else f"{n} x {e}" for e, n in reasons.items()))
    lines.append("")
    shown = fitting[:top] if fitting else sorted(sized, key=lambda p: p.peak.total)[:top]
    if not fitting:
        lines.append("No layout fits; the smallest:" if sized else "No layout passes the config checks.")
        lines.append("")
    lines.append(render([row(p) for p in shown], md))
    if fitting:
        best = fitting[0]
        cmd = torchrun_command(config, best.par, cl, train.parallel.pp_layers)
        lines += ["", f"Best: {layout_label(best.par)} (dp={best.dp}, {best.micro_batches} micro-batches per step)", ""]
        lines += ["```bash", cmd, "```"] if md else [cmd]
    return "\n".join(lines), fitting[0] if fitting else None


def full_report(top: int = 5) -> str:
    """cluster/PLAN_14B.md: both 14B models on the clusters of `REPORT_CASES`."""
    out = [
        "# 14B layout plan",
        "",
        "Generated by `python -m cluster.plan --report cluster/PLAN_14B.md`; the memory model and its assumptions are",
        "in `cluster/plan/memory.py`, the layout rules and the step time in `cluster/plan/search.py`; the formulas are",
        "checked against the measured peaks of real megatron steps on CPU in `tests/cluster/test_plan.py` (within",
        "15%). Each model's own YAML (global batch 64 packed rows of 37,376 positions, micro-batch 1, bf16, flex",
        "attention) on nodes of 8 GPUs; a layout fits when its fullest stage, fixed overhead",
        f"({FIXED_OVERHEAD_GIB:g} GiB) included, fits the GPU; the fastest that fits is listed first. Pipelined",
        "layouts include uneven splits with a lighter last stage (`parallel.pp_layers`, e.g. `pp4 [11,10,10,9]`),",
        "which holds the LM head and the diffusion head.",
        "",
        "Columns (GiB per GPU): `weights`, `grads` (fp32), `optim` (Adam moments + fp32 main weights, dp-sharded),",
        "`EMA` (fp32, dp-sharded), `activations` (backbone layers of the micro-batches in flight, embedding),",
        "`head` (final norm, LM head, diffusion head on 1/tp of the patches), `working` (backward working memory)",
        "of the fullest stage; `peak (stage)` its total and index; `first / last` the first and last stages' totals;",
        "`m` micro-batches per step per pipeline; `step s` estimated seconds per optimizer step at",
        f"{ASSUMED_MFU:.0%} compute efficiency plus communication and bubble; `MFU` the model FLOPs utilisation that",
        "implies.",
        "",
    ]
    summary = [
        "| model | cluster | best layout | dp x m | peak GiB (stage) | step s | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    sections = []
    for name in ("14B-16x", "14B-64x"):
        sections += [f"## {name}", ""]
        config, train = train_config(name, None, None)
        for label, gpu, gpus, mem in REPORT_CASES:
            cl = Cluster(gpus, mem, peak_tflops=BF16_PEAK_TFLOPS[gpu])
            text, best = report(name, cl, config, train, None, top, True)
            sections += [f"### {label}", "", text, ""]
            if best is None:
                summary.append(f"| {name} | {label} | none fits | | | | |")
            else:
                summary.append(
                    f"| {name} | {label} | {layout_label(best.par)} | {best.dp} x {best.micro_batches} | "
                    f"{_gib(best.peak.total)} ({best.peak.stage}) | {best.step_s:.1f} | {best.mfu:.0%} |"
                )
    return "\n".join([*out, "## Summary", "", *summary, "", *sections])
