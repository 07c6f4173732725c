"""The benchmarks of `eval.generate --task NAME` and `eval.report`, one registration line each (`BENCHMARKS`).

A benchmark is a `Benchmark` subclass (`eval/benchmarks/base.py`): the model family it samples, its prompts or
classes, its own flags, its output layout and finishing step, its scorer and its report table. Adding one is a
module plus one `BENCHMARKS.register(name, Class)` line, here or anywhere before `eval.generate` parses its flags.
"""

from __future__ import annotations

from eval.benchmarks.base import Benchmark, Job
from models.core.registry import Registry

__all__ = ["BENCHMARKS", "Benchmark", "Job", "get_benchmark"]

BENCHMARKS: Registry[type[Benchmark]] = Registry("--task")
BENCHMARKS.register("geneval", "eval.benchmarks.geneval:GenEval")
BENCHMARKS.register("dpg", "eval.benchmarks.dpg:DPGBench")
BENCHMARKS.register("shapes", "eval.benchmarks.shapes:Shapes")
BENCHMARKS.register("prompts", "eval.benchmarks.prompts:FreePrompts")
BENCHMARKS.register("imagenet", "eval.benchmarks.imagenet:ImageNet")


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered as `name`."""
    return BENCHMARKS.get(name)(name)
