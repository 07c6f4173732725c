"""The one-GPU check of the megatron T2I training path; it drives the product's `MegatronEngine` (the code users train
with) and takes FLOPs from `models.t2i.flops` and MFU from `training.flops` (the formula the training loop logs).

    python -m cluster.gpu_check --out DIR [--steps N] [--quick]

Sections (each records its figures or its error and the run goes on; DIR/gpu_check.json is rewritten after each):
`env`, `config` (the ~1B model), `schedule` (fp32 tiny engine, lr 0, no clipping: the grads one `train_step` leaves in
the DDP buffers over several micro-batches == the sum of the per-micro-batch grads by hand through the same DDP model;
pipeline parallelism itself needs more than one rank), `attention` (FlexAttention BlockMask vs boolean-mask SDPA at
the model's attention shape: fwd and fwd+bwd time, speedup, output and input-grad differences; an fp32 equality check
at a smaller size), `train` (BF16 `MegatronEngine.train_step` over synthetic packed micro-batches with the T2I task's
hooks: tokens/s, MFU, peak memory) and `fp8` (the same on Transformer Engine layers, BF16 and FP8 hybrid tensorwise;
skipped when Transformer Engine does not import). FP8 of the DeepSpeed path (torchao, `engine.precision=fp8`) vs BF16:
`python -m cluster.gpu_check.fp8` (cluster/GPU_CHECK.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from cluster.gpu_check.common import add_peak_argument, check_config, gib, release, sync, synthetic_batch
from models.t2i.flops import mask_pairs, t2i_batch_flops, t2i_linear_params
from models.t2i.model import T2IConfig, TextToImageBitDance, get_t2i_config
from training.config import load_config
from training.flops import mfu
from training.tasks.t2i import T2ITask

ENGINE_SETTINGS = Path(__file__).with_name("megatron_engine.yaml")
TENSORS = ("out", "dq", "dk", "dv")  # what the attention checks compare


# ------------------------------------------------------------------------------------------- engine and helpers


def megatron_engine(model_cfg: T2IConfig, *overrides: str, reference: TextToImageBitDance | None = None):
    """The product's `MegatronEngine` for a one-rank run with the settings of `megatron_engine.yaml` (BF16, Adam lr
    1e-4, weight decay 0.1, clipping at 1), then `overrides` (dotted `TrainConfig` keys, e.g. `parallel.fp8=hybrid`)."""
    from training.engines.megatron import MegatronEngine

    return MegatronEngine(load_config(ENGINE_SETTINGS, list(overrides)), model_cfg, reference)


def t2i_hooks(model_cfg: T2IConfig) -> SimpleNamespace:
    """The T2I task's per-batch hooks `train_step` calls (the task itself needs a data folder)."""
    return SimpleNamespace(
        batch_counts=lambda b: T2ITask.counts(model_cfg, b),
        loss_metrics=T2ITask.loss_metrics,
        metric_names=T2ITask.metric_names,
    )


def reseed(seed: int = 1) -> None:
    """The same bit flips and diffusion draws for two passes over the same micro-batches."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def failure(e: Exception) -> dict:
    return dict(error=f"{type(e).__name__}: {e}"[:1000], traceback=traceback.format_exc()[-3000:])


def param_counts(model) -> dict[str, int]:
    """Parameters of a megatron model chunk by top-level module, and their total."""
    names = dict(
        decoder="backbone",
        word_embeddings="embedding",
        output_layer="lm_head",
        vision_head="diffusion_head",
        projector="projector",
    )
    counts = dict.fromkeys(["total", *names.values()], 0)
    for name, p in model.named_parameters():
        counts["total"] += p.numel()
        top = name.split(".")[0]
        if top in names:
            counts[names[top]] += p.numel()
    return counts


# -------------------------------------------------------------------------------------------------------- sections


def env_section() -> dict:
    def version(dist_name: str) -> str | None:
        try:
            return importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return None

    from models.t2i.megatron.config import transformer_engine_available

    props = torch.cuda.get_device_properties(0)
    return dict(
        gpu=props.name,
        capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        gpu_memory_gib=gib(props.total_memory),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        megatron_core=version("megatron-core"),
        triton=version("triton"),
        python=platform.python_version(),
        transformer_engine=transformer_engine_available(),
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
    )


def schedule_section(micro: int = 3) -> dict:
    """fp32 tiny engine (dense attention, random head weights, lr 0, no clipping): the grads one `train_step` leaves in
    the DDP buffers (megatron's schedule over `micro` micro-batches) vs the sum of loss/micro backwards by hand
    through the engine's DDP model, with the same bit flips and diffusion draws."""
    from megatron.core.distributed import finalize_model_grads

    cfg = replace(get_t2i_config("tiny-16x"), attention="dense")
    torch.manual_seed(0)
    ref = TextToImageBitDance(cfg)
    with torch.no_grad():  # the head is zero-initialised; give it weights so its conditions get gradients
        for p in ref.vision_head.parameters():
            p.normal_(0, 0.05)
    fixed = ("engine.precision=fp32", "optim.lr=0", "optim.grad_clip=0", "data.token_budget=512")  # the rows' length
    engine = megatron_engine(cfg, *fixed, reference=ref)
    (ddp,), (chunk,) = engine.ddp, engine.chunks
    batches = [synthetic_batch(cfg, 512, rows=2, seed=100 + i) for i in range(micro)]

    ddp.zero_grad_buffer()
    reseed()
    hand_losses = []
    for b in batches:
        out = ddp(b.to(engine.device))
        (out.loss / micro).backward()
        hand_losses.append(out.loss.item())
    finalize_model_grads([ddp])
    hand = {k: p.main_grad.clone() for k, p in chunk.named_parameters()}

    reseed()
    data = iter(batches)
    stats = engine.train_step(data, t2i_hooks(cfg), micro)
    sched = {k: p.main_grad for k, p in chunk.named_parameters()}
    rel = {k: ((sched[k] - g).norm() / g.norm().clamp_min(1e-30)).item() for k, g in hand.items()}
    worst = max(rel, key=rel.get)
    hand_loss = sum(hand_losses) / micro
    loss_diff = abs(stats.loss - hand_loss) / abs(hand_loss)
    nonzero = sum(g.abs().sum().item() > 0 for g in hand.values())
    ok = rel[worst] <= 1e-5 and loss_diff <= 1e-5 and next(data, None) is None and nonzero == len(hand)
    return dict(
        schedule=getattr(engine.forward_backward, "__name__", repr(engine.forward_backward)),
        micro_batches=micro,
        params=len(hand),
        params_with_grad=nonzero,
        worst_grad_rel_err=rel[worst],
        worst_param=worst,
        max_loss_rel_diff=loss_diff,
        step_applied=stats.result.applied,
        tolerance="grad and mean loss rel err <= 1e-5 (fp32)",
        pipeline_parallel="not run: needs more than one rank",
        ok=ok and stats.result.applied,
    )


def time_ms(fn, iters: int, warmup: int = 2) -> float:
    """Median CUDA-event time of `fn()` in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        sync()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _qkv(batch: int, seq: int, heads: int, kv_heads: int, dim: int, dtype, seed: int):
    """Leaves in megatron's [s, b, heads, d] layout and the [b, heads, s, d] views the core attention passes on."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    leaves = [
        torch.randn(seq, batch, n, dim, device="cuda", dtype=dtype, generator=g).requires_grad_()
        for n in (heads, kv_heads, kv_heads)
    ]
    return leaves, [t.permute(1, 2, 0, 3) for t in leaves]


def _fwd_bwd(leaves, views, mask, grad_out) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of `attend` (as `TENSORS`)."""
    from models.core.attention import attend

    for t in leaves:
        t.grad = None
    out = attend(*views, mask)
    out.backward(grad_out)
    return [out.detach(), *(t.grad for t in leaves)]


def attention_section(cfg: T2IConfig, seq: int, iters: int, fp32_seq: int) -> dict:
    """FlexAttention BlockMask vs dense boolean-mask SDPA through `models.core.attention.attend` (the model's GQA shape,
    bf16) on one synthetic packed row; equality vs each other and an fp32 dense reference; fp32 flex == dense."""
    from models.core.attention import attend, build_mask

    m = cfg.llm
    heads, kv_heads, dim = m.num_attention_heads, m.num_key_value_heads, m.head_dim
    batch = synthetic_batch(cfg, seq, rows=1, seed=7).to("cuda")
    doc, blk = batch.doc_ids, batch.block_ids
    pairs = mask_pairs(doc, blk)  # real positions only: padding pairs do no useful work
    shape = dict(seq=seq, heads=heads, kv_heads=kv_heads, head_dim=dim, dtype="bf16", P=cfg.parallel_num)
    res = dict(shape=dict(shape, docs=batch.num_samples), mask_density=pairs / seq**2)
    build_mask(doc, blk, "flex")  # compiles create_block_mask
    res["dense_mask_build_ms"] = time_ms(lambda: build_mask(doc, blk, "dense"), 5, 1)
    res["block_mask_build_ms"] = time_ms(lambda: build_mask(doc, blk, "flex"), 5, 1)
    masks = dict(flex=build_mask(doc, blk, "flex"), dense=build_mask(doc, blk, "dense"))
    leaves, views = _qkv(1, seq, heads, kv_heads, dim, torch.bfloat16, seed=1)
    grad_out = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16)
    results = {name: _fwd_bwd(leaves, views, mask, grad_out) for name, mask in masks.items()}  # also compiles
    # also dense SDPA with K/V expanded to every head (no GQA), which admits the memory-efficient kernel
    mha = [leaves[0].detach().requires_grad_()] + [
        t.detach().repeat_interleave(heads // kv_heads, dim=2).requires_grad_() for t in leaves[1:]
    ]
    variants = dict(
        flex=(leaves, views, masks["flex"]),
        dense=(leaves, views, masks["dense"]),
        dense_mha=(mha, [t.permute(1, 2, 0, 3) for t in mha], masks["dense"]),
    )
    fwd_flops, fwd_bwd_flops = 4 * heads * dim * pairs, 12 * heads * dim * pairs
    for name, (ls, vs, mask) in variants.items():
        fwd = time_ms(lambda vs=vs, mask=mask: attend(*vs, mask), iters)
        both = time_ms(lambda ls=ls, vs=vs, mask=mask: _fwd_bwd(ls, vs, mask, grad_out), iters)
        res[name] = dict(
            fwd_ms=fwd,
            fwd_bwd_ms=both,
            useful_tflops_fwd_bwd=fwd_bwd_flops / both / 1e9,
            useful_tflops_fwd=fwd_flops / fwd / 1e9,
        )
    for base in ("dense", "dense_mha"):
        suffix = "" if base == "dense" else "_vs_dense_mha"
        res["speedup_fwd" + suffix] = res[base]["fwd_ms"] / res["flex"]["fwd_ms"]
        res["speedup_fwd_bwd" + suffix] = res[base]["fwd_bwd_ms"] / res["flex"]["fwd_bwd_ms"]
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = _fwd_bwd(ref_leaves, [t.permute(1, 2, 0, 3) for t in ref_leaves], masks["dense"], grad_out.float())
    flex, dense = results["flex"], results["dense"]
    eq = {
        name: dict(
            flex_vs_dense=max_abs(flex[i], dense[i]),
            flex_vs_fp32=max_abs(flex[i], ref[i]),
            dense_vs_fp32=max_abs(dense[i], ref[i]),
            ref_max_abs=ref[i].abs().max().item(),
        )
        for i, name in enumerate(TENSORS)
    }
    res["bf16_equality"] = dict(
        eq,
        tolerance="max|flex - dense| <= 2e-2 * max|fp32 ref| per tensor",
        ok=all(e["flex_vs_dense"] <= 2e-2 * e["ref_max_abs"] for e in eq.values()),
        **{
            f"{k}_worst_rel_err_vs_fp32": max(e[f"{k}_vs_fp32"] / e["ref_max_abs"] for e in eq.values())
            for k in ("flex", "dense")
        },
    )
    res["fp32_equality"] = _fp32_equality(cfg, fp32_seq)
    return res


def _fp32_equality(cfg: T2IConfig, seq: int) -> dict:
    from models.core.attention import build_mask

    batch = synthetic_batch(cfg, seq, rows=2, seed=8).to("cuda")
    leaves, views = _qkv(2, seq, 4, 2, 64, torch.float32, seed=2)
    grad_out = torch.randn(2, 4, seq, 64, device="cuda")
    flex, dense = (
        _fwd_bwd(leaves, views, build_mask(batch.doc_ids, batch.block_ids, b), grad_out) for b in ("flex", "dense")
    )
    eq = {
        n: dict(max_abs_diff=max_abs(a, b), ref_max_abs=b.abs().max().item())
        for n, a, b in zip(TENSORS, flex, dense, strict=True)
    }
    return dict(
        shape=dict(batch=2, seq=seq, heads=4, kv_heads=2, head_dim=64),
        **eq,
        tolerance="max|flex - dense| <= 1e-4 * max|dense| per tensor",
        ok=all(e["max_abs_diff"] <= 1e-4 * e["ref_max_abs"] for e in eq.values()),
    )


def train_section(cfg: T2IConfig, seq: int, steps: int, micro: int, peak_tflops: float, *overrides: str) -> dict:
    """`steps` optimizer steps of the product's `MegatronEngine` (BF16 unless `overrides` say otherwise), each
    `train_step` over `micro` micro-batches of one synthetic `seq`-position row (on the CPU, as the loader hands them
    over). Step 0 (compilation) is not timed. FLOPs are the step's `StepStats.flops` (`T2ITask.counts`, the loop's
    count) and MFU is `training.flops.mfu` of them on one device."""
    release()
    engine = megatron_engine(cfg, f"data.token_budget={seq}", *overrides)  # the engine pads rows to the budget
    par, opt = engine.par, engine.optimizer
    inner = ", ".join(
        f"{type(o).__name__}({type(getattr(o, 'optimizer', o)).__name__})"
        for o in getattr(opt, "chained_optimizers", [opt])
    )
    batches = [synthetic_batch(cfg, seq, rows=1, seed=i) for i in range(micro)]
    flops = [t2i_batch_flops(cfg, b) for b in batches]
    res = dict(
        transformer_impl=par.transformer_impl,
        fp8=par.fp8,
        fp8_recipe=par.fp8_recipe if par.fp8 else None,
        precision=engine.precision,
        params=param_counts(engine.chunks[0]),
        seq_len=seq,
        micro_batch_rows=1,
        micro_batches=micro,
        optimizer=f"megatron {type(opt).__name__}[{inner}] (MegatronEngine)",
        schedule=getattr(engine.forward_backward, "__name__", repr(engine.forward_backward)),
        flops_per_step=dict(
            {k: sum(f[k] for f in flops) for k in ("total", "dense", "attention")},
            mask_density=sum(f["pairs"] for f in flops) / (micro * seq**2),
            padding_fraction=sum(int((b.doc_ids < 0).sum()) for b in batches) / (micro * seq),
        ),
    )
    hooks, log = t2i_hooks(cfg), []
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        stats = engine.train_step(iter(batches), hooks, micro)
        sync()
        dt = time.perf_counter() - t0
        r = stats.result
        log.append(dict(step=step, seconds=dt, **asdict(stats)))  # loss, metrics, samples, tokens, flops, result
        label = f"{par.transformer_impl}{'/fp8' if par.fp8 else ''}"
        print(f"  [{label}] step {step}: {dt:.2f}s loss {stats.loss:.4f} grad_norm {r.grad_norm:.3f}", flush=True)
    timed = log[1:] or log
    seconds, step_flops = sum(s["seconds"] for s in timed), sum(s["flops"] for s in timed)
    dense = len(timed) * res["flops_per_step"]["dense"]
    cuda = torch.cuda.is_available()
    res.update(
        steps=log,
        tokens_per_s=sum(s["tokens"] for s in timed) / seconds,  # real (unpadded) tokens, as the loop logs them
        achieved_tflops=step_flops / seconds / 1e12,
        peak_tflops_used=peak_tflops,
        mfu=mfu(step_flops, seconds, peak_tflops, devices=1),
        mfu_6n_only=mfu(dense, seconds, peak_tflops, devices=1),
        peak_memory_gib=gib(torch.cuda.max_memory_allocated()) if cuda else None,
        peak_reserved_gib=gib(torch.cuda.max_memory_reserved()) if cuda else None,
        finite=all(s["result"]["applied"] and math.isfinite(s["loss"] + s["result"]["grad_norm"]) for s in log),
    )
    return res


def fp8_section(cfg: T2IConfig, seq: int, steps: int, micro: int, peak_tflops: float) -> dict:
    from models.t2i.megatron.config import transformer_engine_available

    if not transformer_engine_available():
        return dict(skipped="transformer_engine not installed")
    te = "parallel.transformer_impl=te"
    out = {}
    for name, fp8 in (
        ("te_bf16", ()),
        ("te_fp8_hybrid_tensorwise", ("parallel.fp8=hybrid", "parallel.fp8_recipe=tensorwise")),
    ):
        try:
            out[name] = train_section(cfg, seq, steps, micro, peak_tflops, te, *fp8)
        except Exception as e:
            out[name] = failure(e)
        release()
    return out


# ------------------------------------------------------------------------------------------------------------ main


def table(report: dict) -> str:
    """Compact summary of the key figures; sections that failed show their error."""
    lines = [f"{'section':<11} result"]

    def row(section: str, text: str) -> None:
        lines.append(f"{section:<11} {text}")

    def verdict(sec: dict) -> str:
        return "OK" if sec["ok"] else "FAIL"

    for name, sec in report["sections"].items():
        if "error" in sec:
            row(name, "ERROR " + sec["error"][:200])
        elif name == "env":
            row(
                name,
                f"{sec['gpu']} cc{sec['capability']} torch {sec['torch']} cuda {sec['cuda']} "
                f"megatron-core {sec['megatron_core']} TE {sec['transformer_engine']}",
            )
        elif name == "config":
            row(name, sec["summary"])
        elif name == "schedule":
            row(
                name,
                f"{sec['schedule']} x{sec['micro_batches']}: worst grad rel err {sec['worst_grad_rel_err']:.1e}"
                f", loss rel diff {sec['max_loss_rel_diff']:.1e} -> {verdict(sec)}",
            )
        elif name == "attention":
            f, d, mha = sec["flex"], sec["dense"], sec["dense_mha"]
            row(
                name,
                f"flex fwd {f['fwd_ms']:.2f} / fwd+bwd {f['fwd_bwd_ms']:.2f} ms; dense {d['fwd_ms']:.2f} / "
                f"{d['fwd_bwd_ms']:.2f} ms; speedup {sec['speedup_fwd']:.1f}x / {sec['speedup_fwd_bwd']:.1f}x; "
                f"density {sec['mask_density']:.3f}",
            )
            row(
                "",
                f"dense without GQA (K/V expanded) {mha['fwd_ms']:.2f} / {mha['fwd_bwd_ms']:.2f} ms; speedup "
                f"{sec['speedup_fwd_vs_dense_mha']:.1f}x / {sec['speedup_fwd_bwd_vs_dense_mha']:.1f}x",
            )
            for key, diff in (("bf16_equality", "flex_vs_dense"), ("fp32_equality", "max_abs_diff")):
                eq = sec[key]
                diffs = " ".join(f"{k} {eq[k][diff]:.1e}" for k in TENSORS)
                row("", f"{key[:4]} max|flex-dense| {diffs} -> {verdict(eq)}")
        elif name in ("train", "fp8"):
            if "skipped" in sec:
                lines.append("FP8: skipped (transformer_engine not installed)")
                continue
            runs = {name: sec} if name == "train" else {k: v for k, v in sec.items() if isinstance(v, dict)}
            for label, r in runs.items():
                if "error" in r:
                    row(label, "ERROR " + r["error"][:200])
                    continue
                mfu_, mfu6 = 100 * r["mfu"], 100 * r["mfu_6n_only"]
                row(
                    label,
                    f"{r['tokens_per_s']:,.0f} tok/s, {r['achieved_tflops']:.0f} TFLOP/s, MFU {mfu_:.1f}% "
                    f"(6N only {mfu6:.1f}%) of {r['peak_tflops_used']:.0f} TFLOP/s peak, peak mem "
                    f"{r['peak_memory_gib']} GiB, finite {r['finite']}",
                )
                row("", f"optimizer: {r['optimizer'][:100]}; schedule {r['schedule']}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cluster.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    p.add_argument("--steps", type=int, default=None, help="training steps, the first untimed (default 5; quick 3)")
    p.add_argument("--quick", action="store_true", help="4 layers, 4096-position rows, 2 micro-batches")
    p.add_argument("--seq-len", type=int, default=None, help="positions per packed row (default 8192; quick 4096)")
    p.add_argument("--micro-batches", type=int, default=None, help="micro-batches per step (default 4; quick 2)")
    add_peak_argument(p)
    return p.parse_args(argv)


def config_section(cfg: T2IConfig) -> dict:
    lp = t2i_linear_params(cfg)
    m, h = cfg.llm, cfg.head
    summary = (
        f"Qwen3-style {m.num_hidden_layers}L d{m.hidden_size} {m.num_attention_heads}h/{m.num_key_value_heads}kv "
        f"x{m.head_dim} ffn{m.intermediate_size} vocab{m.vocab_size}; head w{h.ch_latent} x{h.depth_latent} blocks; "
        f"P={cfg.parallel_num}, {cfg.latent_dim}-bit tokens; backbone matmul params {lp['backbone'] / 1e6:.0f}M"
    )
    return dict(
        summary=summary,
        llm=asdict(m),
        head=asdict(h),
        parallel_num=cfg.parallel_num,
        latent_dim=cfg.latent_dim,
        attention=cfg.attention,
        linear_params=lp,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: cluster.gpu_check needs a CUDA GPU (torch.cuda.is_available() is False)")
    args.out.mkdir(parents=True, exist_ok=True)
    seq = args.seq_len or (4096 if args.quick else 8192)
    micro = args.micro_batches or (2 if args.quick else 4)
    steps = args.steps or (3 if args.quick else 5)
    report = dict(args=dict(steps=steps, quick=args.quick, seq_len=seq, micro_batches=micro), sections={})
    path = args.out / "gpu_check.json"
    cfg = check_config(4 if args.quick else 16)

    def run(name: str, fn) -> None:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            report["sections"][name] = fn()
        except Exception as e:
            report["sections"][name] = failure(e)
            print(report["sections"][name]["traceback"], file=sys.stderr, flush=True)
        report["sections"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(report, indent=1, default=str))
        release()

    run("env", env_section)
    run("config", lambda: config_section(cfg))
    try:
        from training.engines import init_distributed

        init_distributed("megatron")  # the engines set up megatron's model-parallel state themselves
    except Exception as e:
        report["megatron_init_error"] = f"{type(e).__name__}: {e}"
    run("schedule", schedule_section)
    run("attention", lambda: attention_section(cfg, seq, iters=10, fp32_seq=1024 if args.quick else 2048))
    run("train", lambda: train_section(cfg, seq, steps, micro, args.peak_tflops))
    run("fp8", lambda: fp8_section(cfg, seq, max(2, steps - 2), micro, args.peak_tflops))
    failed = [name for name, sec in report["sections"].items() if "error" in sec or sec.get("ok") is False]
    failed += [
        f"{name}.{k}"
        for name, sec in report["sections"].items()
        for k, v in sec.items()
        if isinstance(v, dict) and ("error" in v or v.get("ok") is False)
    ]
    report["failed"] = failed
    path.write_text(json.dumps(report, indent=1, default=str))
    try:
        print(table(report), flush=True)
    except Exception as e:  # the figures are in the json either way
        print(f"(summary table failed: {type(e).__name__}: {e})", flush=True)
    print(f"GPU CHECK {'FAILED: ' + ', '.join(failed) if failed else 'OK'}; wrote {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
