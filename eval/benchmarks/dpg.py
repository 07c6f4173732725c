"""DPG-Bench (`--task dpg`): its prompts, four images each written as one 2x2 grid `<out>/<id>.png` (the layout its
official scorer reads), scored by `eval.scorers dpg`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from eval.benchmarks.base import SHARED_PROMPTS, Benchmark, Job, save_png_atomic
from eval.scorers import MissingScorerError, dpg_arguments, dpg_ready, run_dpg_scorer


class DPGBench(Benchmark):
    family = "t2i"
    score_key = "score"
    scorer = "python -m eval.scorers dpg {out} --dpg-repo ELLA_REPO --mplug-weights MPLUG_DIR"

    def check(self, p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.images_per_prompt != 4:
            p.error("DPG-Bench scores 2x2 grids: --images-per-prompt must be 4")

    def load_jobs(self, args: argparse.Namespace) -> list[Job]:
        path = Path(args.prompts_file) if args.prompts_file else SHARED_PROMPTS / "dpg_prompts.json"
        if not path.is_file():
            raise SystemExit(f"DPG-Bench prompts not found at {path}; pass --prompts-file")
        items = json.loads(path.read_text())
        return [Job(i, str(k), v, {"id": k}) for i, (k, v) in enumerate(items.items())]

    def is_done(self, job: Job, out: Path) -> bool:
        return (out / f"{job.name}.png").is_file()

    def write_job(self, job: Job, images: list[np.ndarray], out: Path) -> None:
        h, w = images[0].shape[:2]
        grid = np.zeros((2 * h, 2 * w, 3), dtype=np.uint8)
        for k, img in enumerate(images[:4]):
            grid[(k // 2) * h : (k // 2 + 1) * h, (k % 2) * w : (k % 2 + 1) * w] = img
        save_png_atomic(grid, out / f"{job.name}.png")

    def sample_cells(self, out: Path, limit: int) -> list[tuple[Path, str]]:
        return [(p, p.stem) for p in sorted(out.glob("*.png"))[:limit]]

    def add_scorer_arguments(self, flags) -> None:
        dpg_arguments(flags)
        flags.add_argument("--dpg-python", default=sys.executable, help="the interpreter with its packages")

    def scorer_problem(self, args: argparse.Namespace) -> str | None:
        try:
            dpg_ready(args.dpg_repo, args.mplug_weights, args.dpg_python)
        except MissingScorerError as err:
            return str(err)
        return None

    def score(self, out: Path, args: argparse.Namespace) -> dict:
        return run_dpg_scorer(out, args.dpg_repo, args.mplug_weights, args.dpg_python, args.resolution)
