"""GenEval (`--task geneval`): its 553 prompts (or the rewritten long ones) in the folder layout its official scorer
reads, scored by `eval.scorers geneval`. The prompt file is UTF-8 JSON lines, each an object with a "prompt"."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval.benchmarks.base import SHARED_PROMPTS, Benchmark, Job, per_tag_table, read_metadata_file
from eval.scorers import MissingScorerError, geneval_arguments, geneval_ready, run_geneval_scorer
from models.core.sampling import Preset, SamplingConfig


class GenEval(Benchmark):
    family = "t2i"
    scorer = "python -m eval.scorers geneval {out} --geneval-repo GENEVAL_REPO --detector-weights WEIGHTS_DIR"

    def add_arguments(self, flags) -> None:
        flags.add_argument("--long-prompts", action="store_true", help="the rewritten long prompts")

    def sampling(self, preset: Preset, args: argparse.Namespace) -> SamplingConfig:
        return preset.sampling_for(self.name, args.long_prompts)

    def load_jobs(self, args: argparse.Namespace) -> list[Job]:
        name = "evaluation_metadata_long.jsonl" if args.long_prompts else "evaluation_metadata.jsonl"
        path = Path(args.prompts_file) if args.prompts_file else SHARED_PROMPTS / name
        metas = read_metadata_file(path, "GenEval prompts")
        return [Job(i, f"{i:05d}", m["prompt"], m) for i, m in enumerate(metas)]

    def score_table(self, result: dict) -> list[str]:
        return per_tag_table(result)

    def add_scorer_arguments(self, flags) -> None:
        geneval_arguments(flags)
        flags.add_argument("--geneval-python", default=sys.executable, help="the interpreter with its packages")

    def scorer_problem(self, args: argparse.Namespace) -> str | None:
        try:
            geneval_ready(args.geneval_repo, args.detector_weights, args.detector_config, args.geneval_python)
        except MissingScorerError as err:
            return str(err)
        return None

    def score(self, out: Path, args: argparse.Namespace) -> dict:
        a = args
        return run_geneval_scorer(out, a.geneval_repo, a.detector_weights, a.geneval_python, a.detector_config)
