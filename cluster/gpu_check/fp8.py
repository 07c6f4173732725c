"""BF16 vs FP8 (torchao float8, tensorwise and rowwise) on one GPU for the plain PyTorch T2I model, the way the
DeepSpeed engine trains it with `engine.precision=fp8`: the same `training.fp8.convert_backbone`, bf16 weights, and
FLOPs from `models.t2i.flops`, MFU from `training.flops`. Needs only torch, torchao and this repo's models/ and
training/ (no DeepSpeed, megatron or ray), so it runs on a bare GPU host; see cluster/GPU_CHECK.md.

    python -m cluster.gpu_check.fp8 [--shape 14b-slice|1b] [--quick] [--steps N] [--peak-tflops T] [--out FILE]
    python -m cluster.gpu_check.fp8 --device cpu --quick      # CPU smoke run (tiny shapes; the figures mean nothing)

Prints per mode: tokens/s, step time, MFU against --peak-tflops, the FP8/BF16 speed ratio, peak memory
(torch.cuda.max_memory_allocated), the diffusion head's share of the step time, and a profiler summary by op for
the BF16 step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from cluster.gpu_check.common import add_peak_argument, check_config, release, sync, synthetic_batch
from models.family import FAMILIES
from models.t2i.flops import t2i_batch_flops
from models.t2i.model import T2IConfig, TextToImageBitDance, get_t2i_config, vision_loss_sum
from training.fp8 import convert_backbone

MODES = ("bf16", "fp8-tensorwise", "fp8-rowwise")


def model_config(shape: str, layers: int, device: str) -> T2IConfig:
    """`14b-slice`: the 14B T2I shapes (hidden 5120, SwiGLU 17408, 40/8 heads, the 5120-wide 6-block head, P=16)
    with `layers` backbone layers and a 32768-token vocabulary; `1b`: the ~1B check model (`common.check_config`);
    CPU: tiny-4x."""
    if device == "cpu":
        return get_t2i_config("tiny-4x", attention="dense")
    if shape == "14b-slice":
        cfg = get_t2i_config("14B-16x", attention="flex")
        return replace(cfg, llm=replace(cfg.llm, num_hidden_layers=layers, vocab_size=32768))
    return replace(check_config(layers), attention="flex")


def build(cfg: T2IConfig, mode: str, device: torch.device, compile_blocks: bool):
    """The model as `engine.precision=bf16|fp8` trains it (fp8: backbone linears converted, then bf16 weights)."""
    torch.manual_seed(0)
    model = TextToImageBitDance(cfg).to(device)
    if mode != "bf16":
        convert_backbone(model, FAMILIES.get("t2i").fp8_prefixes, mode.removeprefix("fp8-"))
    model.to(torch.bfloat16).train()
    if compile_blocks:
        for block in [*model.llm.model.layers, *model.vision_head.net.res_blocks]:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    return model, opt


def train_step(model, opt, batch) -> float:
    loss = model(batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def timed(fn, iters: int) -> float:
    """Seconds per call of `fn` over `iters` calls (after one untimed call)."""
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def head_seconds(model, batch, cfg: T2IConfig, iters: int) -> float:
    """The diffusion head's forward+backward alone, on this batch's conditions (detached), per step."""
    with torch.no_grad():
        _, cond = model.head_conditions(batch, perturb=False)
    cond = cond.detach().requires_grad_()

    def run():
        vision_loss_sum(model.vision_head, cond, batch, cfg).backward()

    seconds = timed(run, iters)
    model.zero_grad(set_to_none=True)
    return seconds


def profile_summary(model, opt, batch, device: torch.device, rows: int = 15) -> str:
    acts = [torch.profiler.ProfilerActivity.CPU]
    key = "self_cpu_time_total"
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        key = "self_device_time_total"
    with torch.profiler.profile(activities=acts) as prof:
        train_step(model, opt, batch)
        sync()
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def measure(cfg, batch, mode: str, args, device: torch.device) -> dict:
    """Tokens/s, MFU, peak memory and the head's share for one mode; `profile` adds the op summary."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, opt = build(cfg, mode, device, args.compile)
    losses = [float(train_step(model, opt, batch)) for _ in range(args.warmup)]  # compile and autotune here
    seconds = timed(lambda: losses.append(float(train_step(model, opt, batch))), args.steps)
    flops = t2i_batch_flops(cfg, batch)
    out = dict(
        mode=mode,
        step_ms=seconds * 1e3,
        tokens_per_s=flops["positions"] / seconds,
        tflops=flops["total"] / seconds / 1e12,
        mfu=flops["total"] / seconds / (args.peak_tflops * 1e12),
        losses=losses,
        finite=all(math.isfinite(x) for x in losses),
        peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    )
    out["head_share"] = head_seconds(model, batch, cfg, args.steps) / seconds
    if mode == "bf16":
        out["profile"] = profile_summary(model, opt, batch, device)
    model = opt = None  # free this mode's weights before the next
    release()
    return out


def table(results: list[dict], peak: float) -> str:
    base = next((r for r in results if r["mode"] == "bf16" and "error" not in r), None)
    lines = [
        f"{'mode':<16}{'tokens/s':>12}{'step ms':>10}{'TFLOP/s':>9}{'MFU':>8}{'x bf16':>8}{'head':>7}{'peak GiB':>10}"
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['mode']:<16}  failed: {r['error']}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        lines.append(
            f"{r['mode']:<16}{r['tokens_per_s']:>12.0f}{r['step_ms']:>10.1f}{r['tflops']:>9.1f}{r['mfu']:>8.1%}"
            f"{ratio:>8.2f}{r['head_share']:>7.0%}{mem:>10}"
        )
    lines.append(f"MFU: model FLOPs (models.t2i.flops) / step time / {peak:g} TFLOP/s; head: its fwd+bwd / step time")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cluster.gpu_check.fp8", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--shape", choices=("14b-slice", "1b"), default="14b-slice", help="model shape on the GPU")
    p.add_argument("--layers", type=int, default=None, help="backbone layers (default 14b-slice 2, 1b 16; quick 4)")
    p.add_argument("--seq-len", type=int, default=None, help="positions per packed row (default 37376; quick 8192)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode (compilation)")
    add_peak_argument(p)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager blocks (default: compiled)")
    p.add_argument("--quick", action="store_true", help="1b shape, 4 layers, 8192 positions, 2 steps")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.shape = "1b" if args.device == "cuda" else args.shape
    default_layers = 4 if args.quick else (2 if args.shape == "14b-slice" else 16)
    args.layers = args.layers or default_layers
    args.seq_len = args.seq_len or (256 if args.device == "cpu" else 8192 if args.quick else 37376)
    args.steps = args.steps or (2 if args.quick else 5)
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode {bad[0]!r}; choose from {MODES}")
    if args.device == "cpu":
        args.compile, args.warmup = False, min(args.warmup, 1)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run on the GPU host, or pass --device cpu --quick for the smoke run")
        return 2
    device = torch.device(args.device)
    cfg = model_config(args.shape, args.layers, args.device)
    batch = synthetic_batch(cfg, args.seq_len).to(device)  # one row, padded to seq_len
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shape = args.shape if device.type == "cuda" else "tiny"
    print(
        f"{gpu}, torch {torch.__version__}; shape {shape}: hidden {cfg.llm.hidden_size}, {cfg.llm.num_hidden_layers} "
        f"layers, head {cfg.head.ch_latent}x{cfg.head.depth_latent}; {batch.input_ids.shape[1]} positions; "
        f"compile={args.compile}",
        flush=True,
    )
    results = []
    for mode in args.modes:
        try:
            results.append(measure(cfg, batch, mode, args, device))
        except Exception as e:  # one mode failing (a kernel missing on this GPU) must not hide the others
            results.append(dict(mode=mode, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        print(f"{mode}: done", flush=True)
    for r in results:
        if "profile" in r:
            print(f"\nBF16 step, profiler by op (self time):\n{r['profile']}")
    print("\n" + table(results, args.peak_tflops))
    if args.out:
        args.out.write_text(json.dumps(dict(device=gpu, results=results, args=str(vars(args))), indent=1))
    return 0 if all("error" not in r and r["finite"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
