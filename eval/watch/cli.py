"""The command line of `python -m eval.watch`: its own flags, eval.generate's flags (passed on per checkpoint) and the
flags of each benchmark's scorer, checked in two steps: `parse_flags` (the flags alone, what the cluster launchers
check before they render a job) and `check_run` (the run folder and the scorer, where the watcher runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from eval.generate import FlagGroup, add_arguments, resolve_arguments
from training.checkpoint import checkpoint_root
from training.checkpoint_readers import STALE_AFTER_S


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`prog: error: message`), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> tuple[argparse.ArgumentParser, list[FlagGroup]]:
    """The parser and its flag groups (eval.generate's and the scorers', each checked against --task)."""
    p = OneLineParser(
        prog="python -m eval.watch", description="Sample and score every new checkpoint of a training run."
    )
    p.add_argument("--run-dir", required=True, help="the training run's folder (checkpoints/, metrics.jsonl)")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between looks for new checkpoints")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--until-step", type=int, help="stop after this step (default: the run's schedule.total_steps)")
    stop.add_argument("--once", action="store_true", help="evaluate the checkpoints there now, then stop")
    p.add_argument("--text-tokenizer", help="text tokenizer folder (default: the run's model.text_tokenizer)")
    p.add_argument("--image-tokenizer", help="image tokenizer weights (default: the run's model.image_tokenizer)")
    p.add_argument(
        "--stale-after",
        type=float,
        default=STALE_AFTER_S,
        help="seconds without a heartbeat after which the trainer stops keeping checkpoints for this watcher",
    )
    groups = add_arguments(p)
    for name in BENCHMARKS:
        groups.append(FlagGroup(p, [name], f"--task {name} scorer"))
        get_benchmark(name).add_scorer_arguments(groups[-1])
    return p, groups


def parse_flags(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace, list[FlagGroup]]:
    """The flags checked on their own (no file is read): a task with a scorer, scorer flags that go with it, and the
    generation flags as eval.generate resolves them (for a folder not exported yet)."""
    p, groups = build_parser()
    args = p.parse_args(argv)
    bench = get_benchmark(args.task)
    if type(bench).score is Benchmark.score:
        p.error(bench.scorer_problem(args) or f"--task {args.task} has no scorer")
    for flag, value in (("--interval", args.interval), ("--stale-after", args.stale_after)):
        if not value > 0:
            p.error(f"{flag} must be > 0, got {value:g}")
    if args.until_step is not None and args.until_step < 0:
        p.error(f"--until-step must be >= 0, got {args.until_step}")
    placeholder = argparse.Namespace(**vars(args))
    placeholder.model, placeholder.out = str(Path(args.run_dir) / "watch" / "not-exported-yet"), args.run_dir
    resolve_arguments(p, placeholder, groups)
    return p, args, groups


def check_run(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Where the watcher runs: the run folder exists (its first checkpoint may not: the watcher, registered from the
    start, waits for it and so keeps every checkpoint from keep-last-N until it is evaluated), and the task's scorer
    can run here."""
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        p.error(f"--run-dir {run_dir} does not exist; pass the training run's run_dir (or create it before the run)")
    if not checkpoint_root(run_dir).is_dir():
        print(f"eval.watch: waiting for the first checkpoint in {checkpoint_root(run_dir)}", flush=True)
    problem = get_benchmark(args.task).scorer_problem(args)
    if problem:
        p.error(problem)


def main(argv: list[str] | None = None) -> None:
    p, args, groups = parse_flags(argv)
    check_run(p, args)
    from eval.watch.loop import watch

    watch(p, args, groups)
