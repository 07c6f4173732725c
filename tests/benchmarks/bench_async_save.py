"""Training step time around a checkpoint save under megatron, with and without `checkpoint.async_save`.

A T2I model of a few hundred MB of checkpoint (model, EMA, Adam state) trains on CPU through the test harness
(tests/helpers/megatron_cpu.py: megatron's CUDA lookups redirected, gloo); a checkpoint is saved after each of the
steps `--save-at`. Prints every step's wall time (a save counts in its step) side by side, the run's total and the
time it then waits for the background write. On this 2-core machine the background writer and the manifest hashing
compete with training for the cores (the steps after a save slow down); on GPU nodes training runs on the GPUs.
Not a test. Run: `python tests/benchmarks/bench_async_save.py [--hidden 512 --layers 8 --steps 8 --save-at 2 5]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (the harness)

from helpers.megatron_case import make_case, step, train_config  # noqa: E402
from helpers.megatron_cpu import megatron_in_process  # noqa: E402

from models.t2i.model import TextToImageBitDance  # noqa: E402
from training.checkpoint import save_checkpoint  # noqa: E402


def run(
    model, cfg, batch, run_dir: Path, async_save: bool, steps: int, save_at: list[int]
) -> tuple[list[float], float]:
    from training.engines.megatron import MegatronEngine

    with megatron_in_process():
        engine = MegatronEngine(train_config(1, 1, f"checkpoint.async_save={str(async_save).lower()}"), cfg, model)
        ema = engine.new_ema(0.99)
        times = []
        for i in range(1, steps + 1):
            start = time.perf_counter()
            step(engine, batch)
            ema.update(engine.module)
            if i in save_at:
                save_checkpoint(run_dir, i, engine, ema, {}, {"step": i}, keep_last=1)
            engine.poll_saves()
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.wait_saves()
        return times, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--save-at", type=int, nargs="+", default=[2, 5])
    args = ap.parse_args()
    cfg, _, batch, _, _ = make_case()
    llm = replace(
        cfg.llm,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        head_dim=64,
    )
    cfg = replace(cfg, llm=llm, head=replace(cfg.head, ch_cond=args.hidden))
    torch.manual_seed(0)
    model = TextToImageBitDance(cfg)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {params / 1e6:.1f}M parameters; checkpoint ~{params * 16 / 2**20:.0f} MiB (fp32 model, EMA, Adam)")
    results = {}
    for mode in (False, True):
        with tempfile.TemporaryDirectory() as d:
            results[mode] = run(model, cfg, batch, Path(d), mode, args.steps, args.save_at)
    print(f"{'step':>5} {'sync s':>9} {'async s':>9}")
    for i, (a, b) in enumerate(zip(results[False][0], results[True][0], strict=True), start=1):
        mark = "  <- checkpoint saved after this step" if i in args.save_at else ""
        print(f"{i:>5} {a:>9.3f} {b:>9.3f}{mark}")
    for k in args.save_at:
        s, a = results[False][0][k - 1], results[True][0][k - 1]
        print(f"step {k} (saves): sync {s:.3f} s, async {a:.3f} s -> {s / a:.2f}x the speed with async_save")
    total = {m: sum(t) + w for m, (t, w) in results.items()}
    print(f"whole run: sync {total[False]:.2f} s, async {total[True]:.2f} s -> {total[False] / total[True]:.2f}x")
    print(f"waiting for the background write at the end: {results[True][1]:.3f} s")


if __name__ == "__main__":
    main()
