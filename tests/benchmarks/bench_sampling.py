"""Sampling speed of next-patch decoding: wall time per image for P = 1, 4, 16, batched vs separate CFG, and the
compiled sampler (`SamplingConfig.compile`) vs the eager one.

One tiny class-conditional model family on a 16x16 token grid (the same backbone for every P; P = 1 has the
token-wise MLP head of the released 1x models, P > 1 the attention head), random weights (speed does not depend
on them). CFG is compared batched vs separate under both guidance schedules (the linear one samples its
unguided first patch for all 2B rows). The compiled sampler is timed after a warm-up call of the same shapes
(its compile time is reported on its own) at batch 1 and 16, P = 4 and 16. Prints the figures side by side as
ratios; not a test.
Run: `make bench` or `python tests/benchmarks/bench_sampling.py [--batch 8 --steps 10 --repeats 2]`;
`--quick` for a fast check (fewer steps, one repeat, only batch 1 at P = 16 for the compiled sampler).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from models.c2i.model import ClassConditionalBitDance, get_c2i_config
from models.c2i.sampler import sample_class_conditional
from models.core.sampling import SamplingConfig


def timed(model, batch: int, sampling: SamplingConfig, seed: int) -> float:
    labels = torch.arange(batch) % model.cfg.num_classes
    start = time.perf_counter()
    sample_class_conditional(model, labels, sampling, torch.Generator().manual_seed(seed))
    return time.perf_counter() - start


def per_image_seconds(
    model, batch: int, steps: int, cfg: float, batched: bool, repeats: int, schedule: str = "constant"
) -> float:
    warm = SamplingConfig(steps=1, cfg_scale=cfg, batched_cfg=batched, cfg_schedule=schedule)
    timed(model, 1, warm, 0)
    sampling = SamplingConfig(steps=steps, cfg_scale=cfg, batched_cfg=batched, cfg_schedule=schedule)
    return min(timed(model, batch, sampling, r) for r in range(repeats)) / batch


def compiled_vs_eager(model, batch: int, sampling: SamplingConfig, repeats: int) -> tuple[float, float, float]:
    """(eager s/image, compiled s/image, compile seconds): both warmed up at the same shapes; the compiled sampler's
    warm-up minus one timed call is its compile time. Eager and compiled calls alternate, the best of each counts."""
    fast = replace(sampling, compile=True)
    timed(model, batch, sampling, 0)
    first = timed(model, batch, fast, 0)
    eager, comp = [], []
    for r in range(repeats):
        eager.append(timed(model, batch, sampling, r))
        comp.append(timed(model, batch, fast, r))
    return min(eager) / batch, min(comp) / batch, first - min(comp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="head sampling steps per AR step")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="steps 4, batch 2, one repeat, compiled: batch 1 at P=16")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch, args.repeats = 4, 2, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"tiny model, 16x16 tokens, batch {args.batch}, {args.steps} head steps, CFG {args.cfg} (batched)")
    times = {}
    models = {P: ClassConditionalBitDance(get_c2i_config("tiny", parallel_num=P)).eval() for P in (1, 4, 16)}
    for P, model in models.items():
        times[P] = per_image_seconds(model, args.batch, args.steps, args.cfg, True, args.repeats)
    print(f"{'P':>4} {'AR steps':>9} {'s/image':>9} {'speed-up vs P=1':>16}")
    for P, t in times.items():
        print(f"{P:>4} {256 // P:>9} {t:>9.4f} {times[1] / t:>15.2f}x")

    model = models[16]
    print(f"{'CFG at P=16':>12} {'separate s/img':>15} {'batched s/img':>14} {'batched speed-up':>17}")
    ratios = {}
    for schedule in ("constant", "linear"):
        sep = per_image_seconds(model, args.batch, args.steps, args.cfg, False, args.repeats, schedule)
        bat = per_image_seconds(model, args.batch, args.steps, args.cfg, True, args.repeats, schedule)
        ratios[schedule] = (sep, bat)
        print(f"{schedule:>12} {sep:>15.4f} {bat:>14.4f} {sep / bat:>16.2f}x")
    lin, const = ratios["linear"][1], ratios["constant"][1]
    print(f"linear vs constant schedule (batched): {const / lin:.2f}x the speed")
    print(
        f"targets: P=16 >= 5x faster than P=1 -> {times[1] / times[16]:.2f}x; batched CFG faster -> "
        f"{ratios['constant'][0] / ratios['constant'][1]:.2f}x constant, {ratios['linear'][0] / lin:.2f}x linear"
    )

    sampling = SamplingConfig(steps=args.steps, cfg_scale=args.cfg)
    cases = [(16, 1)] if args.quick else [(4, 1), (16, 1), (4, 16), (16, 16)]
    print(f"compiled vs eager, {args.steps} head steps, CFG {args.cfg} (constant, batched)")
    print(f"{'P':>4} {'batch':>6} {'eager s/img':>12} {'compiled s/img':>15} {'speed-up':>9} {'compile s':>10}")
    speedup = {}
    for P, batch in cases:
        eager, comp, compile_s = compiled_vs_eager(models[P], batch, sampling, args.repeats)
        speedup[P, batch] = eager / comp
        print(f"{P:>4} {batch:>6} {eager:>12.4f} {comp:>15.4f} {eager / comp:>8.2f}x {compile_s:>10.1f}")
    at_one = ", ".join(f"P={P} {s:.2f}x" for (P, b), s in speedup.items() if b == 1)
    print(f"target: compiled >= 1.5x faster at batch 1 -> {at_one}")


if __name__ == "__main__":
    main()
