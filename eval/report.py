"""`python -m eval.report <out>`: report.md for a generation folder: score tables, a captioned sample grid,
and the run metadata (model, sampler settings, seeds) recorded by `eval.generate`. The tables, the sample layout and
the scorer to run are the benchmark's (`eval.benchmarks`), found by the task in run.json and the names in summary.json.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from eval.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from eval.benchmarks.base import metric_table

CELL = 160


def benchmarks_of(out: Path) -> list[Benchmark]:
    """The benchmark that wrote `out` (run.json's task), or every registered one when that is unknown."""
    run = out / "run.json"
    task = json.loads(run.read_text()).get("task") if run.is_file() else None
    return [get_benchmark(task)] if task in BENCHMARKS else [get_benchmark(name) for name in BENCHMARKS]


def sample_cells(out: Path, limit: int) -> list[tuple[Path, str]]:
    """The first benchmark layout in `out` that has images: (image, caption) pairs."""
    for bench in benchmarks_of(out):
        cells = bench.sample_cells(out, limit)
        if cells:
            return cells
    return []


def captioned_grid(cells: list[tuple[Path, str]], columns: int = 4) -> Image.Image:
    rows = -(-len(cells) // columns)
    grid = Image.new("RGB", (columns * CELL, rows * (CELL + 36)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (path, caption) in enumerate(cells):
        x, y = (k % columns) * CELL, (k // columns) * (CELL + 36)
        img = Image.open(path).convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
        grid.paste(img, (x, y))
        draw.multiline_text((x + 2, y + CELL + 2), "\n".join(textwrap.wrap(caption, 26)[:2]), fill="black", spacing=2)
    return grid


def score_tables(summary: dict) -> list[str]:
    lines = []
    for name, result in summary.items():
        table = get_benchmark(name).score_table(result) if name in BENCHMARKS else metric_table(result)
        lines += [f"### {name}", "", *table, ""]
    return lines


def write_report(out: str | Path, limit: int = 16) -> Path:
    out = Path(out)
    if not out.is_dir():
        raise SystemExit(f"{out} is not a generation folder")
    lines = [f"# Evaluation report: {out.name}", ""]
    summary_path = out / "summary.json"
    if summary_path.is_file():
        lines += ["## Scores", "", *score_tables(json.loads(summary_path.read_text()))]
    else:
        scorers = [f"`{bench.scorer.format(out=out)}`" for bench in benchmarks_of(out) if bench.scorer]
        lines += [f"No scores yet: run {' or '.join(scorers)}.", ""] if scorers else []
    cells = sample_cells(out, limit)
    if cells:
        captioned_grid(cells).save(out / "report_samples.png")
        lines += ["## Samples", "", "![samples](report_samples.png)", ""]
    run = out / "run.json"
    if run.is_file():
        meta = json.loads(run.read_text())
        keys = (
            "task",
            "model",
            "steps",
            "cfg_scale",
            "cfg_schedule",
            "height",
            "width",
            "images_per_prompt",
            "seed",
            "world_size",
            "prompts",
        )
        lines += ["## Run", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {meta[k]} |" for k in keys if k in meta]
        lines += [
            "",
            "Seeds: every image uses its own generator seeded by sha256(seed / prompt index / image index).",
            "",
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--limit", type=int, default=16, help="samples in the grid")
    args = p.parse_args(argv)
    print(write_report(args.out, args.limit))


if __name__ == "__main__":
    main()
