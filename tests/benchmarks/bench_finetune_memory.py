"""Peak memory of one LoRA fine-tuning step against one full training step of the same small text-to-image model on
CPU, side by side, and the planner's fine-tuning estimate (`cluster.plan.finetune.finetune_memory`) against each
measurement; not a test.

What runs: the bench-sized model of tests/benchmarks/bench_inference_memory.py (Qwen3 shapes, ~400 MiB of fp32
weights, the tiny configs' head) trained in fp32 as the trainer does on CPU, every backbone layer and head block
recomputed in backward (the loop's activation checkpointing), on one fixed packed row built like the planner's
planning rows (`cluster.plan.memory.planning_batch`: captioned images packed to the row length, as the loader packs
them). The method is the trainer's own (`training.finetune`, its `apply` on the T2I task's targets): full: every
weight trained; lora: PEFT adapters on the decoder layers' attention and MLP linears, the base frozen and cast to
`finetune.base_dtype` (default bf16); head: the diffusion head, projector and query rows. AdamW over the trainable
weights and the loop's fp32 EMA of them (`training.ema`).

How it measures (the helper of bench_inference_memory.py): each case runs in a fresh subprocess with glibc told to
return every block over 64 KiB to the OS (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set. It warms
the kernels with two steps of a one-layer model of the same shapes (the CPU kernels keep per-shape state: oneDNN's
bf16 primitives hold ~40 MiB for this model), takes the resident set (RSS) as the baseline, builds the model, runs
one step (the optimizer state exists from then on), resets the kernel's peak-RSS mark (/proc/self/clear_refs) and
runs a second; "peak" is its peak RSS (VmHWM) minus the baseline: weights, optimizer state, EMA, gradients, saved
activations and every temporary. The estimate is the planner's for that model, row and run (fp32, ZeRO 0, no
offload, no fixed overhead).

Run: `python tests/benchmarks/bench_finetune_memory.py [--size bench|small] [--length 1024] [--rank 16]
[--base-dtype bf16|fp32] [--methods full,lora,head]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference_memory import HEIGHT, SIZES, WIDTH, MiB, P, _rss_kib, build_model, model_config, run_child  # noqa: E402

VOCAB = 512  # the tiny configs' text vocabulary (the planning rows' caption ids stay below it)


def _run(method: str, rank: int, base_dtype: str):
    """The fine-tuning run's config as the trainer reads it: fp32 on CPU, ZeRO 0, no offload."""
    from cluster.plan.finetune import finetune_run
    from training.config import EngineConfig, ModelConfig, TrainConfig

    # init_from is only named (the lora / head checks want a base); the model is built here
    model = ModelConfig(name=f"tiny-{P}x", init_from="bench", activation_checkpointing=True)
    train = TrainConfig(model=model, engine=EngineConfig(precision="fp32"))
    train = replace(train, finetune=replace(train.finetune, base_dtype=base_dtype))
    return finetune_run(train, method, rank, offload="none", zero_stage=0)


def _batch(cfg, length: int):
    from cluster.plan.memory import planning_batch

    return planning_batch(cfg, length, image=(HEIGHT, WIDTH))


def _prepared(cfg, run):
    """The model as the run's method trains it (`training.finetune`: its `apply`, the base cast to
    finetune.base_dtype), every block recomputed, AdamW over its trainable weights and their EMA."""
    from cluster.plan.finetune import planning_targets
    from training.activation_checkpointing import apply_activation_checkpointing
    from training.ema import EMA
    from training.finetune import build_method

    model = build_model(cfg).train()
    build_method(run).apply(SimpleNamespace(model=model, finetune_targets=planning_targets(cfg)))
    apply_activation_checkpointing(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer, EMA(model, 0.999)


def _step(model, optimizer, ema, batch) -> None:
    model(batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(model)


def _child(size: str, method: str, length: int, rank: int, base_dtype: str) -> dict:
    from cluster.plan.finetune import finetune_memory
    from cluster.plan.memory import Behaviour, Workload
    from models.core.attention import resolve_attention

    run = _run(method, rank, base_dtype)
    cfg = model_config(size, VOCAB)
    batch = _batch(cfg, length)
    # warm up on one layer of the same shapes: the CPU kernels keep per-shape state (oneDNN's bf16 primitives)
    warm = _prepared(replace(cfg, llm=replace(cfg.llm, num_hidden_layers=1)), run)
    for _ in range(2):
        _step(*warm, batch)
    del warm
    gc.collect()
    base = _rss_kib("VmRSS")
    model, optimizer, ema = _prepared(cfg, run)
    _step(model, optimizer, ema, batch)  # the optimizer state exists from here on
    gc.collect()
    static = _rss_kib("VmRSS") - base
    Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark starts again from here
    _step(model, optimizer, ema, batch)
    peak = _rss_kib("VmHWM") - base
    how = Behaviour(attention=resolve_attention(cfg.attention, cuda=False))
    est = finetune_memory(cfg, run, Workload.of_batch(cfg, batch), how, cuda=False, overhead=0)
    return dict(
        method=method,
        params=est.params.frozen + est.params.trainable,
        trainable=est.params.trainable,
        static_mib=static / 1024,
        peak_mib=peak / 1024,
        estimate_mib=est.total / MiB,
        estimate_static_mib=est.static / MiB,
        positions=batch.input_ids.numel(),
    )


def measure(size: str, method: str, length: int, rank: int, base_dtype: str, threads: int = 1) -> dict:
    """One case in a fresh subprocess: static_mib / peak_mib (RSS over the baseline after one step / at the second's
    peak), estimate_mib / estimate_static_mib (the planner's total / weights + gradients + optimizer + EMA), the
    parameter counts and the row's positions."""
    spec = dict(size=size, method=method, length=length, rank=rank, base_dtype=base_dtype)
    return run_child(__file__, spec, threads)


def main() -> None:
    from training.config import FinetuneConfig
    from training.finetune import BASE_DTYPES, FINETUNE_METHODS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="bench")
    ap.add_argument("--length", type=int, default=1024, help="positions of the packed row")
    ap.add_argument("--rank", type=int, default=FinetuneConfig().lora.rank, help="LoRA rank")
    ap.add_argument("--base-dtype", choices=sorted(BASE_DTYPES), default=FinetuneConfig().base_dtype)
    ap.add_argument("--methods", default="full,lora", help=f"comma-separated, of {', '.join(FINETUNE_METHODS.names())}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(_child(**spec)))
        return
    methods = args.methods.split(",")
    recs = [measure(args.size, m, args.length, args.rank, args.base_dtype, args.threads) for m in methods]
    ref = recs[0]
    print(
        f"{args.size} model, {ref['params'] / 1e6:.1f}M parameters ({ref['params'] * 4 / MiB:.0f} MiB in fp32); one "
        f"packed row of {ref['positions']} positions; fp32 training, frozen base in {args.base_dtype}, every block "
        f"recomputed, AdamW + EMA; LoRA rank {args.rank}; {args.threads} threads, CPU; MiB"
    )
    vs = f"vs {methods[0]}"
    print(f"{'method':>6} {'trainable':>10} {'static':>8} {'peak RSS':>9} {vs:>9} {'estimate':>9} {'est.err':>8}")
    for r in recs:
        err = (r["estimate_mib"] - r["peak_mib"]) / r["peak_mib"]
        print(
            f"{r['method']:>6} {r['trainable'] / 1e6:>9.2f}M {r['static_mib']:>8.1f} {r['peak_mib']:>9.1f} "
            f"{r['peak_mib'] / ref['peak_mib']:>8.2f}x {r['estimate_mib']:>9.1f} {err:>+8.1%}"
        )
    print(
        "static: RSS after the first step (weights, optimizer state, EMA); peak RSS: the second step's peak over the "
        "baseline; estimate: cluster.plan.finetune.finetune_memory for the same model, row and run (no overhead)"
    )


if __name__ == "__main__":
    main()
