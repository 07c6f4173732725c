"""The shapes benchmark (`--task shapes`): GenEval's tags over the built-in shapes domain (`eval.shapes_bench`), in
GenEval's folder layout, scored on the CPU by `eval.shapes_bench`. The prompts are drawn from `--seed` and `--per-tag`,
or read from `--prompts-file` (JSON lines of `shapes_prompts`' dicts, e.g. several draws and extra prompts sampled in
one call)."""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.benchmarks.base import Benchmark, Job, per_tag_table, read_metadata_file


class Shapes(Benchmark):
    family = "t2i"
    scorer = "python -m eval.shapes_bench {out}"

    def add_arguments(self, flags) -> None:
        flags.add_argument("--per-tag", type=int, default=12, help="prompts per tag")

    def load_jobs(self, args: argparse.Namespace) -> list[Job]:
        from eval.shapes_bench import check_spec, shapes_prompts

        if args.prompts_file:
            metas = read_metadata_file(Path(args.prompts_file), "shapes prompts")
            for n, meta in enumerate(metas, 1):
                check_spec(meta, f"shapes prompts {args.prompts_file} prompt {n}")
            return [Job(i, f"{i:05d}", m["prompt"], m) for i, m in enumerate(metas)]
        try:
            metas = shapes_prompts(args.seed, args.per_tag)
        except ValueError as err:
            raise ValueError(f"--per-tag: {err}") from None
        return [Job(i, f"{i:05d}", m["prompt"], m) for i, m in enumerate(metas)]

    def score_table(self, result: dict) -> list[str]:
        return per_tag_table(result)

    def add_scorer_arguments(self, flags) -> None:
        flags.add_argument("--chance-samples", type=int, default=500, help="random renders per tag: chance level")

    def scorer_problem(self, args: argparse.Namespace) -> str | None:
        return None  # the scorer is this repository's own, on the CPU

    def score(self, out: Path, args: argparse.Namespace) -> dict:
        from eval.shapes_bench import score_folder

        return score_folder(out, args.chance_samples)
