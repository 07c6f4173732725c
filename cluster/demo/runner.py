"""Running the demo: every stage run or reused (a finished stage writes <out>/stages/<name>.json keyed by a
fingerprint of its settings and of the stages it reads), then <out>/report.md and the stage timings.

The output folder is claimed first (`training.output_folder`, tool `cluster.demo`): a new or empty folder, or one the
demo made (its marker), where re-runs reuse and resume stages. Any other non-empty folder is refused in one line
before any stage unless `overwrite` (`--overwrite`): then the stage records found there (`stages/<name>.json` and
`.base`) are dropped, so every stage runs afresh (each clears the folders it owns), files the stages do not write
stay, and the folder is the demo's from then on (an interrupted run resumes from what it wrote itself)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from cluster.demo.config import DemoConfig
from cluster.demo.distill import STAGES as DISTILL_STAGES
from cluster.demo.finetune import STAGES as FINETUNE_STAGES
from cluster.demo.report import write_demo_report
from cluster.demo.stage import Stage
from cluster.demo.stages import STAGES
from training.output_folder import check_output_folder, claim_output_folder

TOOL = "cluster.demo"  # the marker of the folders it made


def fingerprint(stage: Stage, cfg: DemoConfig, done: dict[str, dict], skip: tuple[str, ...] = ()) -> str:
    settings = {k: v for k, v in stage.settings(cfg).items() if k not in skip}
    ident = {"settings": settings, "upstream": {u: done[u]["fingerprint"] for u in stage.upstream}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def run_demo(cfg: DemoConfig, overwrite: bool = False) -> Path:
    """Run (or reuse) every stage (the distillation ones with `distill=true`, the fine-tuning ones with
    `finetune=true`), then write <out>/report.md; returns the report path. `out` must be new, empty or the demo's
    own, unless `overwrite` (see the module docstring)."""
    out = Path(cfg.out).resolve()
    stages = STAGES + (DISTILL_STAGES if cfg.distill else ()) + (FINETUNE_STAGES if cfg.finetune else ())
    if not check_output_folder(out, TOOL, overwrite, flag="out"):
        print(f"--overwrite: {out} is not the demo's; every stage runs afresh", flush=True)
        for stage in STAGES + DISTILL_STAGES + FINETUNE_STAGES:  # nothing recorded there is reused
            for suffix in (".json", ".base"):
                (out / "stages" / f"{stage.name}{suffix}").unlink(missing_ok=True)
    claim_output_folder(out, TOOL, overwrite=True)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    wall = time.perf_counter()
    for stage in stages:
        fp, base = fingerprint(stage, cfg, done), fingerprint(stage, cfg, done, skip=stage.resumable)
        marker = out / "stages" / f"{stage.name}.json"
        if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fp:
            done[stage.name] = {**json.loads(marker.read_text()), "reused": True}
            print(f"== {stage.name}: reused ({done[stage.name]['seconds']:.1f} s when it ran)", flush=True)
            continue
        state = out / "stages" / f"{stage.name}.base"
        if not state.is_file() or state.read_text() != base:  # new inputs or settings: start this stage over
            for d in stage.owns:
                shutil.rmtree(out / d, ignore_errors=True)
        state.write_text(base)  # same base, other step count: the training stages resume from their checkpoints
        print(f"== {stage.name}: {stage.what}", flush=True)
        start = time.perf_counter()
        result = stage.run(cfg, out)
        record = {"fingerprint": fp, "seconds": time.perf_counter() - start, "result": result}
        marker.write_text(json.dumps(record, indent=2, default=str))
        done[stage.name] = {**record, "reused": False}
        print(f"== {stage.name}: done in {record['seconds']:.1f} s", flush=True)
    start = time.perf_counter()
    report = write_demo_report(cfg, out, done)
    timings = {name: d["seconds"] for name, d in done.items()} | {"report": time.perf_counter() - start}
    print(
        "\nstage timings (s): "
        + ", ".join(
            f"{k} {v:.1f}" + (" (reused)" if done.get(k, {}).get("reused") else "") for k, v in timings.items()
        ),
        flush=True,
    )
    print(f"this run: {time.perf_counter() - wall:.1f} s; report: {report}", flush=True)
    return report
