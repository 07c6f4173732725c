"""Sampling speed of next-patch decoding: wall time per image for P = 1, 4, 16 and batched vs separate CFG.

One tiny class-conditional model family on a 16x16 token grid (the same backbone for every P; P = 1 has the
token-wise MLP head of the released 1x models, P > 1 the attention head), random weights (speed does not depend
on them). CFG is compared batched vs separate under both guidance schedules (the linear one samples its
unguided first patch for all 2B rows). Prints the figures side by side as ratios; not a test.
Run: `make bench` or `python tests/benchmarks/bench_sampling.py [--batch 8 --steps 10 --repeats 2]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from models.c2i.model import ClassConditionalBitDance, get_c2i_config
from models.c2i.sampler import sample_class_conditional
from models.core.sampling import SamplingConfig


def per_image_seconds(
    model, batch: int, steps: int, cfg: float, batched: bool, repeats: int, schedule: str = "constant"
) -> float:
    labels = torch.arange(batch) % model.cfg.num_classes
    warm = SamplingConfig(steps=1, cfg_scale=cfg, batched_cfg=batched, cfg_schedule=schedule)
    sample_class_conditional(model, labels[:1], warm, torch.Generator().manual_seed(0))
    sampling = SamplingConfig(steps=steps, cfg_scale=cfg, batched_cfg=batched, cfg_schedule=schedule)
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        sample_class_conditional(model, labels, sampling, torch.Generator().manual_seed(r))
        best = min(best, time.perf_counter() - start)
    return best / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="head sampling steps per AR step")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"tiny model, 16x16 tokens, batch {args.batch}, {args.steps} head steps, CFG {args.cfg} (batched)")
    times = {}
    for P in (1, 4, 16):
        model = ClassConditionalBitDance(get_c2i_config("tiny", parallel_num=P)).eval()
        times[P] = per_image_seconds(model, args.batch, args.steps, args.cfg, True, args.repeats)
    print(f"{'P':>4} {'AR steps':>9} {'s/image':>9} {'speed-up vs P=1':>16}")
    for P, t in times.items():
        print(f"{P:>4} {256 // P:>9} {t:>9.4f} {times[1] / t:>15.2f}x")

    model = ClassConditionalBitDance(get_c2i_config("tiny", parallel_num=16)).eval()
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


if __name__ == "__main__":
    main()
