"""What low-memory inference costs in quality: the demo's shapes-benchmark score of its trained model sampled with
fp32, bf16 and int8 weights (`eval.generate --weights`), the demo's own sampling flags, seeds and scorer, side by
side in one run. Needs a finished demo (`make demo`). Not a test.

Run: `python tests/benchmarks/bench_low_memory_score.py [--demo runs/demo] [--weights fp32 bf16 int8]`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from cluster.demo.config import load_demo_config
from cluster.demo.stages import shapes_sampling_flags
from eval.generate import main as generate
from eval.shapes_seeds import score_seeds, seed_dirs


def score(cfg, model: Path, weights: str, root: Path) -> tuple[dict, float]:
    samples = root / weights
    started = time.perf_counter()
    for k, folder in enumerate(seed_dirs(samples, cfg.seeds)):
        argv = ["--task", "shapes", "--model", str(model), "--out", str(folder), *shapes_sampling_flags(cfg)]
        argv += ["--images-per-prompt", str(cfg.images_per_prompt), "--batch-size", "16", "--seed", str(cfg.seed + k)]
        argv += ["--per-tag", str(cfg.prompts_per_tag)]
        generate([*argv, "--weights", weights] if weights != "fp32" else argv)
    took = time.perf_counter() - started
    return score_seeds(samples, cfg.seeds, cfg.chance_samples, cfg.image_size), took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="runs/demo", help="a finished demo's out= folder")
    p.add_argument("--weights", nargs="+", default=["fp32", "bf16", "int8"])
    args = p.parse_args()
    cfg = load_demo_config([f"out={args.demo}"])
    model = Path(args.demo) / "t2i" / "export"
    if not (model / "config.json").is_file():
        raise SystemExit(f"{model} is not an exported model; run `make demo` first (or pass --demo)")
    root = Path(tempfile.mkdtemp(prefix="bench_low_memory_"))
    try:
        results = {w: score(cfg, model, w, root) for w in args.weights}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = results[args.weights[0]][0]["overall"]
    print(f"\nshapes score of {model} ({cfg.seeds} seeds, {cfg.prompts_per_tag} prompts/tag, "
          f"{cfg.images_per_prompt} images each):")  # fmt: skip
    print(f"{'weights':8} {'score':>7} {'sd':>6} {'vs ' + args.weights[0]:>9} {'s':>6}  per seed")
    for w, (r, took) in results.items():
        seeds = ", ".join(f"{s:.4f}" for s in r["per_seed"])
        print(f"{w:8} {r['overall']:7.4f} {r['overall_sd']:6.4f} {r['overall'] - base:+9.4f} {took:6.1f}  {seeds}")


if __name__ == "__main__":
    main()
