"""Free prompts (`--task prompts`): `--prompt TEXT` (repeatable) or `--prompts-file FILE` (one prompt a line), in
GenEval's folder layout; nothing scores them. The file is UTF-8 text (`read_prompt_file`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.benchmarks.base import Benchmark, Job, read_prompt_file


def read_prompt_lines(path: Path) -> list[str]:
    return [line.strip() for line in read_prompt_file(path).splitlines() if line.strip()]


class FreePrompts(Benchmark):
    family = "t2i"

    def add_arguments(self, flags) -> None:
        flags.add_argument("--prompt", action="append", help="a prompt (repeatable)")

    def check(self, p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.prompt and args.prompts_file:
            p.error("--prompt and --prompts-file are alternatives; give one of them")
        if args.prompts_file:
            try:
                lines = read_prompt_lines(Path(args.prompts_file))
            except ValueError as err:
                p.error(str(err))
            if not lines:
                p.error(f"--prompts-file {args.prompts_file} has no prompts (one prompt a line)")
        elif not args.prompt:
            p.error("--task prompts needs --prompt TEXT (repeatable) or --prompts-file FILE")
        elif not all(x.strip() for x in args.prompt):
            p.error("--prompt text must not be empty")

    def load_jobs(self, args: argparse.Namespace) -> list[Job]:
        prompts = args.prompt or read_prompt_lines(Path(args.prompts_file))
        return [Job(i, f"{i:05d}", p, {"prompt": p}) for i, p in enumerate(prompts)]
