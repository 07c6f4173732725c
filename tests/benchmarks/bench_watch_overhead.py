"""What watching a run costs the training step, printed side by side as ratios; not a test.

The same tiny T2I run (2 gloo ranks under torchrun, DeepSpeed ZeRO-0) without and with the watching a long run gets:
the held-out validation at `eval.every` (`training.validation`), the heartbeat and hang watchdog (`fault.hang_seconds`)
and the per-rank forward timing behind straggler detection (`fault.straggler_fraction`). Runs alternate (off, on, off,
on, ...) and each figure is the median over the repeats. Printed: the step time with heartbeat, watchdog and straggler
timing over the step time without them, and the cost of validation spread over the steps between evaluations
(the goal: under 2% of step time between evaluations, all together).
Run: `python tests/benchmarks/bench_watch_overhead.py [--steps 100] [--every 100] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from helpers.data import make_t2i_data  # noqa: E402


def run(run_dir: Path, data: dict, val: Path, steps: int, watched: bool, every: int) -> dict[str, float]:
    """One run; returns its summed step seconds (first step excluded: start-up) and validation seconds."""
    watch = [f"eval.every={every}", "eval.val_samples=16", "fault.hang_seconds=300", "fault.straggler_fraction=0.2"]
    plain = ["eval.every=0", "fault.hang_seconds=0", "fault.straggler_fraction=0"]
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "training.train",
        "--config",
        str(REPO / "training" / "configs" / "tiny_t2i.yaml"),
        f"run_dir={run_dir}",
        f"data.data_dir={data['tokens']}",
        f"data.val_dir={val}",
        f"schedule.total_steps={steps}",
        "schedule.warmup_steps=1",
        "checkpoint.every=0",
        "checkpoint.export_official=false",
        "logging.every=1",
        "logging.wandb=disabled",
        *(watch if watched else plain),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = sum(r["time/step_s"] for r in rows if r["step"] > 1 and "time/step_s" in r)
    validation_s = sum(r.get("time/validation_s", 0.0) for r in rows if r["step"] > 0)  # step 0: before training
    shutil.rmtree(run_dir)
    return {"step_s": step_s, "validation_s": validation_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=100, help="eval.every of the watched runs (the demo's)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_watch_"))
    try:
        data = make_t2i_data(root / "train", samples=64)
        val = make_t2i_data(root / "val", samples=16)["tokens"]
        off, on = [], []
        for k in range(args.repeats):
            off.append(run(root / f"off{k}", data, val, args.steps, False, args.every))
            on.append(run(root / f"on{k}", data, val, args.steps, True, args.every))
        step_off = statistics.median(r["step_s"] for r in off)
        step_on = statistics.median(r["step_s"] for r in on)
        validation = statistics.median(r["validation_s"] for r in on)
        steps = args.steps - 1
        print(
            f"tiny T2I, 2 ranks, {args.steps} steps, validation of 16 samples every {args.every} steps, median of "
            f"{args.repeats} runs each"
        )
        rows = [
            ("step time without watching", step_off / steps, ""),
            (
                "step time with heartbeat, watchdog, straggler timing",
                step_on / steps,
                f"ratio {step_on / step_off:.3f}",
            ),
            ("validation, spread over the steps", validation / steps, f"ratio {1 + validation / step_off:.3f}"),
        ]
        for label, seconds, ratio in rows:
            print(f"  {label:54s} {1000 * seconds:8.1f} ms   {ratio}")
        total = (step_on + validation) / step_off
        print(f"  {'all together':54s} {'':11s}   ratio {total:.3f} (goal: under 1.020)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
