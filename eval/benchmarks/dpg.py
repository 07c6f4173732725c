"""DPG-Bench (`--task dpg`): its prompts, four images each written as one 2x2 grid `<out>/<id>.png` (the layout its
official scorer reads), scored by `eval.scorers dpg`. The prompt file is a UTF-8 JSON object {id: prompt}; an id
names its output file, so one that is not a plain file name (`../x`, `/abs`, `a/b`) is refused in one line rather
than renamed (the scorer looks images up by id)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from eval.benchmarks.base import SHARED_PROMPTS, Benchmark, Job, output_file, read_prompt_file, save_png_atomic
from eval.scorers import MissingScorerError, dpg_arguments, dpg_ready, run_dpg_scorer
from models.core.contained_path import safe_file_name


class DPGBench(Benchmark):
    family = "t2i"
    score_key = "score"
    scorer = "python -m eval.scorers dpg {out} --dpg-repo ELLA_REPO --mplug-weights MPLUG_DIR"

    def check(self, p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.images_per_prompt != 4:
            p.error("DPG-Bench scores 2x2 grids: --images-per-prompt must be 4")

    def load_jobs(self, args: argparse.Namespace) -> list[Job]:
        path = Path(args.prompts_file) if args.prompts_file else SHARED_PROMPTS / "dpg_prompts.json"
        try:
            items = json.loads(read_prompt_file(path, "DPG-Bench prompts"))
        except json.JSONDecodeError as err:
            raise ValueError(f"DPG-Bench prompts {path} is not JSON ({err}); give an object {{id: prompt}}") from None
        if not isinstance(items, dict) or not all(isinstance(v, str) and v.strip() for v in items.values()):
            raise ValueError(f"DPG-Bench prompts {path} must be a JSON object {{id: prompt}} of non-empty prompts")
        for key in items:
            if safe_file_name(key) != key:
                raise ValueError(
                    f"DPG-Bench prompts {path}: id {key!r} names its image <id>.png and is not a plain file name "
                    "(letters, digits, '.', '_', '-'); rename it"
                )
        return [Job(i, k, v, {"id": k}) for i, (k, v) in enumerate(items.items())]

    def is_done(self, job: Job, out: Path) -> bool:
        return output_file(out, f"{job.name}.png").is_file()

    def write_job(self, job: Job, images: list[np.ndarray], out: Path) -> None:
        h, w = images[0].shape[:2]
        grid = np.zeros((2 * h, 2 * w, 3), dtype=np.uint8)
        for k, img in enumerate(images[:4]):
            grid[(k // 2) * h : (k // 2 + 1) * h, (k % 2) * w : (k % 2 + 1) * w] = img
        save_png_atomic(grid, output_file(out, f"{job.name}.png"))

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
