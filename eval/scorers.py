"""Adapters that run the official GenEval and DPG-Bench scorers from local installs, and the results summary.

Nothing is downloaded or installed here: each adapter checks the local installation first (the scorer's repo,
its weights, the packages its Python imports) and raises `MissingScorerError` with one line saying what to
install or pass, then runs the official scripts as subprocesses and parses what they print. `geneval_ready` and
`dpg_ready` make those checks alone (`eval.watch` makes them before its first checkpoint).

`python -m eval.scorers geneval|dpg <out> --geneval-repo ... | --dpg-repo ...` scores a generated folder and
merges the result into `<out>/summary.json` and `<out>/summary.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

GENEVAL_SCRIPTS = ("evaluation/evaluate_images.py", "evaluation/summary_scores.py", "evaluation/object_names.txt")
GENEVAL_DETECTOR = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"
GENEVAL_MODULES = ("mmdet", "open_clip", "clip_benchmark", "pandas")
DPG_MODULES = ("modelscope", "accelerate", "pandas")
DPG_UPSTREAM_MODEL = "damo/mplug_visual-question-answering_coco_large_en"

# Runs compute_dpg_bench.py with modelscope's pipeline pointed at the local mPLUG folder instead of the hub id.
_DPG_BOOTSTRAP = """
import os, runpy, sys
import modelscope.pipelines as _p
_orig, _local, _upstream = _p.pipeline, sys.argv[1], sys.argv[2]
def _pipeline(*a, **k):
    if k.get("model") == _upstream:
        k["model"] = _local
    return _orig(*a, **k)
_p.pipeline = _pipeline
sys.argv = sys.argv[3:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class MissingScorerError(RuntimeError):
    """A scorer's code, weights or runtime is not available locally; the message says what to install or pass."""


def _probe_modules(python: str, modules: tuple[str, ...], what: str) -> None:
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)"
    proc = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise MissingScorerError(
            f"{what} cannot import its packages with {python} ({last}): "
            f"install {', '.join(modules)} there or pass --python"
        )


def _run(cmd: list[str], cwd: str | Path | None = None, capture: bool = False) -> str:
    """Run a scorer step; stderr (progress, errors) goes to ours, stdout is returned when `capture`."""
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE if capture else None, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited with code {proc.returncode} (its stderr is above)")
    return proc.stdout or ""


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _geneval_checks(geneval_repo, detector_weights, detector_config) -> tuple[Path, Path, str]:
    hint = "clone the official GenEval repository (djghosh13/geneval) and pass --geneval-repo /path/to/geneval"
    if not geneval_repo:
        raise MissingScorerError(f"GenEval needs its official scorer: {hint}")
    repo = Path(geneval_repo)
    for rel in GENEVAL_SCRIPTS:
        if not (repo / rel).is_file():
            raise MissingScorerError(f"GenEval scorer incomplete: {repo / rel} not found; {hint}")
    fetch = f"run evaluation/download_models.sh <dir> and pass --detector-weights <dir>/{GENEVAL_DETECTOR}.pth"
    if not detector_weights:
        raise MissingScorerError(f"GenEval needs the Mask2Former detector weights: {fetch}")
    weights = Path(detector_weights)
    if weights.is_dir():
        weights = weights / f"{GENEVAL_DETECTOR}.pth"
    if not weights.is_file():
        raise MissingScorerError(f"GenEval detector weights not found at {weights}: {fetch}")
    if detector_config and not Path(detector_config).is_file():
        raise MissingScorerError(
            f"GenEval detector config not found at {detector_config}: pass --detector-config "
            f"<mmdet 2.x>/configs/mask2former/{GENEVAL_DETECTOR}.py"
        )
    return repo, weights, detector_config


def geneval_ready(geneval_repo, detector_weights, detector_config, python: str) -> tuple[Path, Path, str]:
    """(repo, detector weights file, detector config or None) when GenEval's scorer can run here: its checkout and
    weights, a GPU, its packages importable by `python`; a MissingScorerError (one line) else."""
    repo, weights, config = _geneval_checks(geneval_repo, detector_weights, detector_config)
    if not _cuda_available():
        raise MissingScorerError("GenEval's scorer asserts CUDA (evaluate_images.py): run it on a machine with a GPU")
    _probe_modules(python, GENEVAL_MODULES, "GenEval's scorer (mmdet 2.x, open_clip, clip_benchmark)")
    return repo, weights, config


def run_geneval_scorer(
    out_dir: str | Path,
    geneval_repo: str | None,
    detector_weights: str | None,
    python: str = sys.executable,
    detector_config: str | None = None,
) -> dict:
    """Score `<out_dir>/<idx:05d>/{metadata.jsonl,samples/*.png}` with GenEval's official scripts.

    `detector_weights` is the Mask2Former `.pth` (or the folder holding it); `detector_config` defaults to the one
    inside the mmdet source tree, as the official script does. Returns {"per_tag": {tag: accuracy},
    "overall": unweighted mean over tags (as printed by summary_scores.py), "images": count}; the raw per-image
    results and the official printout are kept as `<out_dir>/geneval_results.jsonl` and `geneval_summary.txt`.
    """
    out = Path(out_dir).resolve()
    repo, weights, config = geneval_ready(geneval_repo, detector_weights, detector_config, python)
    if config is None:
        code = "import mmdet, os; print(os.path.dirname(mmdet.__file__))"
        mmdet_dir = _run([python, "-c", code], capture=True).strip()
        config = str(Path(mmdet_dir).parent / "configs" / "mask2former" / f"{GENEVAL_DETECTOR}.py")
        if not Path(config).is_file():
            raise MissingScorerError(
                f"mmdet's Mask2Former config not found at {config} (a wheel install has no "
                f"configs/): pass --detector-config /path/to/{GENEVAL_DETECTOR}.py"
            )
    results = out / "geneval_results.jsonl"
    _run(
        [
            python,
            str(repo / GENEVAL_SCRIPTS[0]),
            str(out),
            "--outfile",
            str(results),
            "--model-config",
            str(config),
            "--model-path",
            str(weights.parent),
            "--options",
            f"model={weights.stem}",
        ]
    )
    printed = _run([python, str(repo / GENEVAL_SCRIPTS[1]), str(results)], cwd=repo / "evaluation", capture=True)
    (out / "geneval_summary.txt").write_text(printed)
    return parse_geneval(results, printed)


def parse_geneval(results_jsonl: str | Path, printed: str) -> dict:
    """Per-tag accuracy from the per-image results (tags in first-seen order) and the official overall score."""
    per_tag: dict[str, list[bool]] = {}
    for line in Path(results_jsonl).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            per_tag.setdefault(row["tag"], []).append(bool(row["correct"]))
    m = re.search(r"Overall score \(avg\. over tasks\):\s*([0-9.eE+-]+)", printed)
    if m is None or not per_tag:
        raise RuntimeError(f"could not parse GenEval's summary output:\n{printed[-2000:]}")
    return {
        "per_tag": {tag: sum(v) / len(v) for tag, v in per_tag.items()},
        "overall": float(m.group(1)),
        "images": sum(len(v) for v in per_tag.values()),
    }


def _find_dpg_script(repo: Path) -> Path | None:
    for cand in (repo / "dpg_bench" / "compute_dpg_bench.py", repo / "compute_dpg_bench.py"):
        if cand.is_file():
            return cand
    return None


def dpg_checks(dpg_repo: str | None, mplug_weights: str | None) -> tuple[Path, Path]:
    """(compute_dpg_bench.py, dpg_bench.csv) of a local DPG-Bench checkout with its mPLUG folder; MissingScorerError
    else."""
    hint = "clone the DPG-Bench repository (TencentQQGYLab/ELLA) and pass --dpg-repo /path/to/ELLA"
    if not dpg_repo:
        raise MissingScorerError(f"DPG-Bench needs its official scorer (dpg_bench/compute_dpg_bench.py): {hint}")
    script = _find_dpg_script(Path(dpg_repo))
    if script is None:
        raise MissingScorerError(f"DPG-Bench scorer not found: no dpg_bench/compute_dpg_bench.py in {dpg_repo}; {hint}")
    csv = script.parent / "dpg_bench.csv"
    if not csv.is_file():
        raise MissingScorerError(f"DPG-Bench questions not found at {csv}: use a complete checkout; {hint}")
    fetch = f"download ModelScope's {DPG_UPSTREAM_MODEL} and pass --mplug-weights /path/to/that/folder"
    if not mplug_weights:
        raise MissingScorerError(f"DPG-Bench needs the mPLUG VQA model: {fetch}")
    if not (Path(mplug_weights) / "configuration.json").is_file():
        raise MissingScorerError(
            f"mPLUG model folder incomplete: {Path(mplug_weights) / 'configuration.json'} not found; {fetch}"
        )
    return script, csv


def dpg_ready(dpg_repo: str | None, mplug_weights: str | None, python: str) -> None:
    """Nothing when DPG-Bench's scorer can run here (`dpg_checks`, its packages importable by `python`); a
    MissingScorerError (one line) else."""
    dpg_checks(dpg_repo, mplug_weights)
    _probe_modules(python, DPG_MODULES, "DPG-Bench's scorer (modelscope, accelerate)")


def run_dpg_scorer(
    out_dir: str | Path,
    dpg_repo: str | None,
    mplug_weights: str | None,
    python: str = sys.executable,
    resolution: int | None = None,
) -> dict:
    """Score the 2x2 grids `<out_dir>/<id>.png` with DPG-Bench's compute_dpg_bench.py (ELLA repo), single process.

    `mplug_weights` is a local copy of the ModelScope model `damo/mplug_visual-question-answering_coco_large_en`
    (the official script names the hub id; a small bootstrap points it at the folder). `resolution` is one tile's
    side (default: half the first grid's width). Returns {"score": DPG-Bench score (x100), "per_category": {L1
    category: score}, "failed_images": grids the script skipped}; the official result files are
    `<out_dir>/dpg_results.txt` and `dpg_results_detail.txt`, its printout `dpg_summary.txt`.
    """
    out = Path(out_dir).resolve()
    script, csv = dpg_checks(dpg_repo, mplug_weights)
    grids = sorted(out.glob("*.png"))
    if not grids:
        raise FileNotFoundError(f"no DPG-Bench grids (<id>.png) in {out}")
    if resolution is None:
        from PIL import Image

        with Image.open(grids[0]) as im:
            resolution = im.width // 2
    _probe_modules(python, DPG_MODULES, "DPG-Bench's scorer (modelscope, accelerate)")
    res = out / "dpg_results.txt"
    printed = _run(
        [
            python,
            "-c",
            _DPG_BOOTSTRAP,
            str(Path(mplug_weights).resolve()),
            DPG_UPSTREAM_MODEL,
            str(script),
            "--image-root-path",
            str(out),
            "--resolution",
            str(resolution),
            "--pic-num",
            "4",
            "--csv",
            str(csv),
            "--res-path",
            str(res),
            "--vqa-model",
            "mplug",
        ],
        capture=True,
    )
    (out / "dpg_summary.txt").write_text(printed)
    return parse_dpg(printed)


def parse_dpg(printed: str) -> dict:
    """The final score, the L1 category scores and the count of skipped grids from compute_dpg_bench.py's output."""
    m = re.search(r"DPG-Bench score:\s*([0-9.eE+-]+|nan)", printed)
    if m is None:
        raise RuntimeError(f"could not parse DPG-Bench's output:\n{printed[-2000:]}")
    per_category: dict[str, float] = {}
    block = re.search(r"L1 category scores:\n(.*?)(?:L2 category scores:|\Z)", printed, re.S)
    for line in (block.group(1) if block else "").splitlines():
        name, _, value = line.strip().rpartition(":")
        if name:
            per_category[name.strip()] = float(value)
    failed = re.findall(r"^Failed filename: (\S+\.png)", printed, re.M)  # the script skips images it cannot score
    return {"score": float(m.group(1)), "per_category": per_category, "failed_images": len(failed)}


def _rows(prefix: str, value) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _rows(f"{prefix}.{k}" if prefix else str(k), v)]
    if isinstance(value, float):
        return [(prefix, f"{value:.4f}")]
    return [(prefix, str(value))]


def write_summary(out_dir: str | Path, name: str, result: dict) -> None:
    """Merge `result` under `name` into `<out_dir>/summary.json` and rewrite `<out_dir>/summary.md` (all results)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary[name] = result
    lines = ["| benchmark | metric | value |", "| --- | --- | --- |"]
    lines += [f"| {bench} | {metric} | {value} |" for bench, res in summary.items() for metric, value in _rows("", res)]
    for target, text in ((path, json.dumps(summary, indent=2) + "\n"), (out / "summary.md", "\n".join(lines) + "\n")):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)


def geneval_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of GenEval's scorer (`eval.scorers geneval`, and `eval.watch --task geneval`)."""
    p.add_argument("--geneval-repo")
    p.add_argument("--detector-weights", help=f"{GENEVAL_DETECTOR}.pth or its folder")
    p.add_argument("--detector-config", help="the mmdet 2.x Mask2Former config (default: mmdet's tree)")


def dpg_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of DPG-Bench's scorer (`eval.scorers dpg`, and `eval.watch --task dpg`)."""
    p.add_argument("--dpg-repo", help="the ELLA checkout")
    p.add_argument("--mplug-weights", help="local mPLUG VQA model folder")
    p.add_argument("--resolution", type=int, help="one tile's side (default: half the grid width)")


# benchmark -> (its flags, the scorer run on the parsed flags)
SCORERS = {
    "geneval": (
        geneval_arguments,
        lambda a: run_geneval_scorer(a.out, a.geneval_repo, a.detector_weights, a.python, a.detector_config),
    ),
    "dpg": (dpg_arguments, lambda a: run_dpg_scorer(a.out, a.dpg_repo, a.mplug_weights, a.python, a.resolution)),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval.scorers", description="Run an official scorer on a folder.")
    sub = p.add_subparsers(dest="task", required=True)
    for name, (add_arguments, _) in SCORERS.items():
        q = sub.add_parser(name, help=f"the official {name} scorer")
        q.add_argument("out", help="the folder eval.generate wrote")
        q.add_argument("--python", default=sys.executable, help="the interpreter that has the scorer's packages")
        add_arguments(q)
    args = p.parse_args(argv)
    try:
        result = SCORERS[args.task][1](args)
    except MissingScorerError as e:
        raise SystemExit(f"error: {e}") from None
    write_summary(args.out, args.task, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
