"""A toy benchmark, written the way a new benchmark is added: one module with a `Benchmark` subclass (its model
family, its jobs, its own flag and its output layout); the test registers it with one line,
`BENCHMARKS.register("toy", "helpers.toys.toy_benchmark:EvenClasses")`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.benchmarks import Benchmark, Job
from eval.benchmarks.base import save_png_atomic


class EvenClasses(Benchmark):
    """One image of each even class id below `--toy-classes`, written as <out>/class_<id>.png."""

    family = "c2i"

    def add_arguments(self, flags) -> None:
        flags.add_argument("--toy-classes", type=int, default=6)

    def load_jobs(self, args) -> list[Job]:
        return [Job(c, f"class_{c}", c, {"class": c}) for c in range(0, args.toy_classes, 2)]

    def is_done(self, job: Job, out: Path) -> bool:
        return (out / f"{job.name}.png").is_file()

    def write_job(self, job: Job, images: list[np.ndarray], out: Path) -> None:
        save_png_atomic(images[0], out / f"{job.name}.png")
