"""`python -m eval.report <out>`: report.md for a generation folder: score tables, a captioned sample grid,
and the run metadata (model, sampler settings, seeds) recorded by `eval.generate`."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

CELL = 160


def sample_cells(out: Path, limit: int) -> list[tuple[Path, str]]:
    cells = []
    for meta in sorted(out.glob("*/metadata.jsonl"))[:limit]:  # GenEval / shapes layout
        prompt = json.loads(meta.read_text().splitlines()[0])["prompt"]
        cells.append((meta.parent / "samples" / "0000.png", prompt))
    if not cells:  # DPG-Bench grids or ImageNet images
        cells = [(p, p.stem) for p in sorted(out.glob("*.png"))[:limit]]
        cells = cells or [(p, p.stem) for p in sorted((out / "images").glob("*.png"))[:limit]]
    return cells


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
        lines += [f"### {name}", ""]
        if isinstance(result, dict) and "per_tag" in result:
            lines += ["| tag | accuracy |", "| --- | --- |"]
            lines += [f"| {tag} | {acc:.3f} |" for tag, acc in result["per_tag"].items()]
            lines.append(f"| **overall (mean of tags)** | **{result.get('overall', float('nan')):.3f}** |")
            chance = result.get("chance")
            if isinstance(chance, dict) and "overall" in chance:
                lines.append(f"| chance (mean of tags) | {chance['overall']:.3f} |")
        elif isinstance(result, dict):
            lines += ["| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result.items()]
        lines.append("")
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
        lines += ["No scores yet: run `python -m eval.shapes_bench`, `eval.scorers` or `eval.imagenet_metrics`.", ""]
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
