"""Class-conditional ImageNet (`--task imagenet`): every class (or `--classes`), `--per-class` images each, as PNGs
`<out>/images/<index:06d>.png` (index = class * per_class + j), then one ADM `<out>/samples.npz` written in chunks
for `eval.imagenet_metrics` (FID / Inception Score)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from eval.benchmarks.base import Benchmark, Job, output_file, save_png_atomic


def class_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated class ids like 1,2,3, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("no class ids given (e.g. --classes 1,2,3)")
    return ids


class ImageNet(Benchmark):
    family = "c2i"
    scorer = "python -m eval.imagenet_metrics {out}/samples.npz --ref-stats REF_BATCH.npz --inception-weights W.pth"

    def add_arguments(self, flags) -> None:
        flags.add_argument("--num-classes", type=int, help="the first N classes (default: all of the config's)")
        flags.add_argument("--classes", type=class_ids, help="only these comma-separated class ids, e.g. 1,2,3")
        flags.add_argument("--per-class", type=int, default=50, help="images of every class")

    def check(self, p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        """One image per job; classes against the model config: --num-classes defaults to (and may not exceed) the
        config's count."""
        from models.c2i.model import get_c2i_config

        args.images_per_prompt = 1
        total = get_c2i_config(args.model_config).num_classes
        if args.num_classes is None:
            args.num_classes = total
        elif not 1 <= args.num_classes <= total:
            p.error(f"--num-classes must be in [1, {total}] for --model-config {args.model_config}")
        if args.classes is not None:
            bad = sorted({c for c in args.classes if not 0 <= c < args.num_classes})
            if bad:
                p.error(f"--classes needs ids in [0, {args.num_classes}); bad: {bad}")
            twice = sorted({c for c in args.classes if args.classes.count(c) > 1})
            if twice:
                p.error(f"--classes lists {twice} more than once; use --per-class N for N images of a class")
        if args.per_class < 1:
            p.error("--per-class must be >= 1")

    def load_jobs(self, args: argparse.Namespace) -> list[Job]:
        n = args.per_class
        classes = args.classes if args.classes is not None else range(args.num_classes)
        return [Job(c * n + j, f"{c * n + j:06d}", c, {"class": c}) for c in classes for j in range(n)]

    def is_done(self, job: Job, out: Path) -> bool:
        return output_file(out, "images", f"{job.name}.png").is_file()

    def write_job(self, job: Job, images: list[np.ndarray], out: Path) -> None:
        save_png_atomic(images[0], output_file(out, "images", f"{job.name}.png"))

    def finish(self, jobs: list[Job], out: Path) -> None:
        from eval.imagenet_metrics import NpzWriter

        first = np.asarray(Image.open(out / "images" / f"{jobs[0].name}.png"))
        writer = NpzWriter(output_file(out, "samples.npz"), len(jobs), first.shape[0], first.shape[1])
        for start in range(0, len(jobs), 1000):
            batch = [
                np.asarray(Image.open(out / "images" / f"{j.name}.png").convert("RGB"))
                for j in jobs[start : start + 1000]
            ]
            writer.add(np.stack(batch), start)
        writer.close()
        print(f"wrote {out / 'samples.npz'}", flush=True)

    def sample_cells(self, out: Path, limit: int) -> list[tuple[Path, str]]:
        return [(p, p.stem) for p in sorted((out / "images").glob("*.png"))[:limit]]
