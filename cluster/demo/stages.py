"""`make demo`: the whole system end to end on the built-in shapes data, on one machine (2 CPU cores suffice).

Each stage runs a real entry point exactly as a user runs it on a cluster (a subprocess per stage):

  data       python -m data_pipeline.shapes                     captioned 32x32 shape scenes as webdataset tars
  tokenizer  torchrun --nproc-per-node N -m training.train      tiny binary tokenizer (model.kind=tokenizer), DeepSpeed
  text       models.t2i.text_tokenizer.build_chat_tokenizer     small BPE with the Qwen3 special tokens
  tokenize   python -m data_pipeline.tokenize                   Ray Data job on a local Ray -> binary-token shards
  train      torchrun --nproc-per-node N -m training.train      tiny text-to-image BitDance, P=4, DeepSpeed
  sample     torchrun --nproc-per-node N -m eval.generate       the shapes-benchmark prompts
  score      eval.shapes_bench.score_folder                     per-tag accuracy next to chance
  report     <out>/report.md                                    scores, sample grid, loss curve, figures, timings

With `distill=true` three more stages (cluster/demo_distill.py) distil the P=4 model into a P=16 student and add a
teacher-vs-student table (time per image and score). The score is the mean and spread over `seeds` benchmark seeds,
next to chance and to the image tokenizer's ceiling.

Re-running reuses finished stages: each writes <out>/stages/<name>.json when it completes, keyed by a fingerprint
of its settings and of the stages it reads; a stage whose fingerprint changed runs again (from scratch), and an
interrupted training stage resumes from its last checkpoint. Settings: `DemoConfig` (dotted overrides on the
command line, e.g. `python -m cluster.demo t2i_steps=50 out=runs/demo_short`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

from omegaconf import OmegaConf

from models.core.sampling import SamplingConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    seed: int = 0
    nproc: int = 2  # training and sampling processes (torchrun, gloo on CPU)
    # data
    samples: int = 4000
    image_size: int = 32
    samples_per_shard: int = 500
    # binary tokenizer
    tokenizer_config: str = str(CONFIGS / "demo_tokenizer.yaml")
    tokenizer_steps: int = 500
    # text-to-image model
    t2i_config: str = str(CONFIGS / "demo_t2i.yaml")
    t2i_steps: int = 1200
    text_vocab: int = 400
    # sampling and scoring
    prompts_per_tag: int = 12
    images_per_prompt: int = 2
    seeds: int = 3  # benchmark seeds (prompt draw and noise): the score is their mean, with the spread beside it
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(steps=20, cfg_scale=2.0))
    chance_samples: int = 300
    ceiling_renders: int = 4  # correct renders per prompt through the image tokenizer (the ceiling column)
    grid_images: int = 24
    # optional stage: distil the P=4 model into a P'-token student (cluster/demo_distill.py)
    distill: bool = False
    distill_parallel_num: int = 16
    distill_steps: int = 1000
    distill_min_object_area: float = 0.0  # curated subset: data.subset.score=min_object_area (0 keeps everything)
    speed_images: int = 32  # images each model samples for the time-per-image figure


@dataclass
class Stage:
    name: str
    what: str
    settings: Callable[[DemoConfig], dict]  # what the stage's output depends on (besides upstream stages)
    upstream: tuple[str, ...]
    run: Callable[[DemoConfig, Path], dict]
    resumable: tuple[str, ...] = ()  # settings that may change without starting over (training step counts)


def _torchrun(cfg: DemoConfig) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc}"]


def _sh(cmd: list[str], cfg: DemoConfig, log: Path) -> None:
    """Run one stage command, its output teed to <log>; a failure names the command and the log."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("WANDB_SILENT", "true")
    print("$ " + " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if not line.lstrip().startswith(("[W", "[20")) and "Warning" not in line:
                sys.stdout.write(line)
        rc = proc.wait()
    if rc:
        raise SystemExit(f"demo stage command failed (exit {rc}): {' '.join(cmd)}; see {log}")


def _schedule(config: str, steps: int) -> list[str]:
    """Step-count overrides; the YAML's warmup is shortened when a short run (tests) has fewer steps."""
    warmup = int(OmegaConf.load(config).get("schedule", {}).get("warmup_steps", 0))
    return [f"schedule.total_steps={steps}", f"schedule.warmup_steps={min(warmup, steps)}"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _last(rows: list[dict], key: str) -> float | None:
    return next((r[key] for r in reversed(rows) if key in r), None)


def _mean(rows: list[dict], key: str) -> float:
    """Mean over the logged steps after the first (which includes start-up)."""
    vals = [r[key] for r in rows if key in r][1:] or [float("nan")]
    return sum(vals) / len(vals)


# ---------------------------------------------------------------- stages


def run_data(cfg: DemoConfig, out: Path) -> dict:
    raw = out / "data" / "raw"
    size = f"{cfg.image_size}x{cfg.image_size}"
    _sh(
        [
            sys.executable,
            "-m",
            "data_pipeline.shapes",
            "--out",
            str(raw),
            "--num-samples",
            str(cfg.samples),
            "--size",
            size,
            "--per-shard",
            str(cfg.samples_per_shard),
            "--seed",
            str(cfg.seed),
        ],
        cfg,
        out / "logs" / "data.log",
    )
    return {"raw": str(raw), "samples": cfg.samples, "size": size}


def run_tokenizer(cfg: DemoConfig, out: Path) -> dict:
    run_dir = out / "tokenizer"
    _sh(
        [
            *_torchrun(cfg),
            "-m",
            "training.train",
            "--config",
            cfg.tokenizer_config,
            f"run_dir={run_dir}",
            f"data.data_dir={out / 'data' / 'raw'}",
            f"data.image_size={cfg.image_size}",
            f"seed={cfg.seed}",
            *_schedule(cfg.tokenizer_config, cfg.tokenizer_steps),
        ],
        cfg,
        out / "logs" / "tokenizer.log",
    )
    rows = _metrics(run_dir)
    return {
        "export": str(run_dir / "export"),
        "psnr": _last(rows, "eval/psnr"),
        "ssim": _last(rows, "eval/ssim"),
        "steps": cfg.tokenizer_steps,
    }


def run_text(cfg: DemoConfig, out: Path) -> dict:
    from data_pipeline.shapes import sample_scene
    from eval.shapes_bench import shapes_prompts
    from models.t2i.text_tokenizer import build_chat_tokenizer

    sizes = ((cfg.image_size, cfg.image_size),)
    corpus = [sample_scene(i, cfg.seed, sizes).caption for i in range(min(cfg.samples, 2000))]
    corpus += [p["prompt"] for p in shapes_prompts(cfg.seed, cfg.prompts_per_tag)]
    path = build_chat_tokenizer(corpus, out / "text_tokenizer", vocab_size=cfg.text_vocab)
    return {"path": str(path), "vocab_size": cfg.text_vocab}


def _parallel_num(cfg: DemoConfig) -> int:
    from models.t2i.model import get_t2i_config

    name = OmegaConf.load(cfg.t2i_config).model.name
    return get_t2i_config(name).parallel_num


def run_tokenize(cfg: DemoConfig, out: Path, parallel_num: int | None = None, dest: str = "tokens") -> dict:
    """Ray tokenization of the raw data into <out>/data/<dest>, for the T2I model's P (or `parallel_num`)."""
    tokens = out / "data" / dest
    size = f"{cfg.image_size}x{cfg.image_size}"
    _sh(
        [
            sys.executable,
            "-m",
            "data_pipeline.tokenize",
            "--source",
            "wds",
            "--input",
            str(out / "data" / "raw"),
            "--output",
            str(tokens),
            "--tokenizer",
            str(out / "tokenizer" / "export"),
            "--text-tokenizer",
            str(out / "text_tokenizer"),
            "--parallel-num",
            str(parallel_num or _parallel_num(cfg)),
            "--size",
            size,
            "--num-cpus",
            str(max(2, cfg.nproc)),
        ],
        cfg,
        out / "logs" / f"{dest}.log",
    )
    manifest = json.loads((tokens / "manifest.json").read_text())
    return {
        "tokens": str(tokens),
        "samples": manifest.get("samples"),
        "skipped": manifest.get("skipped"),
        "bits_per_token": manifest.get("bits_per_token"),
    }


def run_train(
    cfg: DemoConfig, out: Path, name: str = "t2i", steps: int | None = None, tokens: str = "tokens", extra=()
) -> dict:
    """torchrun text-to-image training into <out>/<name> (the distillation stage passes its own model overrides)."""
    run_dir, steps = out / name, steps or cfg.t2i_steps
    _sh(
        [
            *_torchrun(cfg),
            "-m",
            "training.train",
            "--config",
            cfg.t2i_config,
            f"run_dir={run_dir}",
            f"data.data_dir={out / 'data' / tokens}",
            f"model.text_tokenizer={out / 'text_tokenizer'}",
            f"model.image_tokenizer={out / 'tokenizer' / 'export'}",
            f"seed={cfg.seed}",
            *_schedule(cfg.t2i_config, steps),
            *extra,
        ],
        cfg,
        out / "logs" / f"{name}.log",
    )
    rows = _metrics(run_dir)
    return {
        "export": str(run_dir / "export"),
        "steps": steps,
        "final_loss": _last(rows, "loss"),
        "tokens_per_s": _mean(rows, "tokens_per_s"),
        "samples_per_s": _mean(rows, "samples_per_s"),
    }


def seed_dirs(cfg: DemoConfig, samples: Path) -> list[Path]:
    """One sample folder per benchmark seed: <samples>/seed_<k>."""
    return [samples / f"seed_{k}" for k in range(cfg.seeds)]


def run_sample(cfg: DemoConfig, out: Path, model: str = "t2i", dest: str = "samples") -> dict:
    """The shapes-benchmark prompts of every seed, sampled with torchrun from <out>/<model>/export."""
    start, images = time.perf_counter(), 0
    for k, folder in enumerate(seed_dirs(cfg, out / dest)):
        sample_prompts(cfg, out / model / "export", folder, cfg.seed + k, out / "logs" / f"{dest}.log")
        images += len(list(folder.glob("*/samples/*.png")))
    return {"samples": str(out / dest), "images": images, "images_per_s": images / (time.perf_counter() - start)}


def sample_prompts(cfg: DemoConfig, model: Path, samples: Path, seed: int, log: Path) -> None:
    size = f"{cfg.image_size}x{cfg.image_size}"
    _sh(
        [
            *_torchrun(cfg),
            "-m",
            "eval.generate",
            "--task",
            "shapes",
            "--model",
            str(model),
            "--out",
            str(samples),
            "--height",
            str(cfg.image_size),
            "--width",
            str(cfg.image_size),
            "--image-size",
            size,
            "--steps",
            str(cfg.sampling.steps),
            "--cfg-scale",
            str(cfg.sampling.cfg_scale),
            "--cfg-schedule",
            cfg.sampling.cfg_schedule,
            "--images-per-prompt",
            str(cfg.images_per_prompt),
            "--batch-size",
            "16",
            "--seed",
            str(seed),
            "--per-tag",
            str(cfg.prompts_per_tag),
        ],
        cfg,
        log,
    )


def score_seeds(cfg: DemoConfig, samples: Path) -> dict:
    """Scores of every seed's folder and their mean and spread: `per_tag` / `overall` are means over the seeds,
    `sd` their standard deviations (population), `per_seed` each seed's overall score."""
    import numpy as np

    from eval.shapes_bench import format_table, score_folder

    runs = []
    for folder in seed_dirs(cfg, samples):
        runs.append(score_folder(folder, cfg.chance_samples, size=cfg.image_size))
        (folder / "summary.json").write_text(json.dumps({"shapes": runs[-1]}, indent=2))
        print(f"{folder.name}:\n{format_table(runs[-1])}", flush=True)
    tags = list(runs[0]["per_tag"])
    per_tag = {t: [r["per_tag"][t] for r in runs] for t in tags}
    overall = [r["overall"] for r in runs]
    return {
        "per_tag": {t: float(np.mean(v)) for t, v in per_tag.items()},
        "sd": {t: float(np.std(v)) for t, v in per_tag.items()},
        "overall": float(np.mean(overall)),
        "overall_sd": float(np.std(overall)),
        "per_seed": overall,
        "images": sum(r["images"] for r in runs),
        "counts": {t: sum(r["counts"][t] for r in runs) for t in tags},
        "chance": runs[0]["chance"],
    }


def run_score(cfg: DemoConfig, out: Path) -> dict:
    """Per-tag accuracy (mean and spread over the seeds), chance, and the tokenizer's ceiling."""
    result = score_seeds(cfg, out / "samples")
    result["ceiling"] = tokenizer_ceiling(cfg, out)
    return result


def tokenizer_ceiling(cfg: DemoConfig, out: Path) -> dict:
    """The scorer's accuracy on the demo tokenizer's reconstructions of correct renders of the benchmark prompts."""
    import numpy as np
    import torch

    from eval.shapes_bench import ceiling_level, shapes_prompts
    from models.tokenizer.io import load_tokenizer
    from models.tokenizer.model import images_to_tensor, tensor_to_images

    ae = load_tokenizer(out / "tokenizer" / "export")

    @torch.no_grad()
    def reconstruct(images: np.ndarray) -> np.ndarray:
        return tensor_to_images(ae.decode(ae.encode(images_to_tensor(torch.from_numpy(images))).bits)).numpy()

    prompts = [p for k in range(cfg.seeds) for p in shapes_prompts(cfg.seed + k, cfg.prompts_per_tag)]
    per_tag = ceiling_level(reconstruct, prompts, cfg.ceiling_renders, cfg.seed, cfg.image_size)
    return {"per_tag": per_tag, "overall": float(np.mean(list(per_tag.values())))}


def _pick(*keys: str) -> Callable[[DemoConfig], dict]:
    return lambda c: {k: asdict(v) if is_dataclass(v := getattr(c, k)) else v for k in keys}


STAGES: tuple[Stage, ...] = (
    Stage(
        "data",
        "shapes dataset (webdataset tars)",
        _pick("seed", "samples", "image_size", "samples_per_shard"),
        (),
        run_data,
    ),
    Stage(
        "tokenizer",
        "binary tokenizer training (DeepSpeed)",
        lambda c: {"config": _file(c.tokenizer_config), "steps": c.tokenizer_steps},
        ("data",),
        run_tokenizer,
        ("steps",),
    ),
    Stage(
        "text",
        "text tokenizer (BPE + Qwen3 special tokens)",
        _pick("text_vocab", "prompts_per_tag"),
        ("data",),
        run_text,
    ),
    Stage(
        "tokenize",
        "Ray tokenization -> binary-token shards",
        lambda c: {"config": _file(c.t2i_config)},
        ("tokenizer", "text"),
        run_tokenize,
    ),
    Stage(
        "train",
        "text-to-image training (torchrun, DeepSpeed)",
        lambda c: {"config": _file(c.t2i_config), "steps": c.t2i_steps, "nproc": c.nproc},
        ("tokenize",),
        run_train,
        ("steps",),
    ),
    Stage(
        "sample",
        "sampling the shapes-benchmark prompts",
        _pick("prompts_per_tag", "images_per_prompt", "seeds", "sampling", "nproc"),
        ("train",),
        run_sample,
    ),
    Stage(
        "score",
        "scoring (per-tag accuracy over the seeds, chance, tokenizer ceiling)",
        _pick("chance_samples", "ceiling_renders"),
        ("sample",),
        run_score,
    ),
)
STAGE_DIRS = {
    "data": ("data/raw",),
    "tokenizer": ("tokenizer",),
    "text": ("text_tokenizer",),
    "tokenize": ("data/tokens",),
    "train": ("t2i",),
    "sample": ("samples",),
    "score": (),
}


def stages(cfg: DemoConfig) -> tuple[tuple[Stage, ...], dict[str, tuple[str, ...]]]:
    """The stages this configuration runs (the distillation ones with `distill=true`) and the folders they own."""
    if not cfg.distill:
        return STAGES, STAGE_DIRS
    from cluster import demo_distill

    return STAGES + demo_distill.STAGES, {**STAGE_DIRS, **demo_distill.STAGE_DIRS}


def _file(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def fingerprint(stage: Stage, cfg: DemoConfig, done: dict[str, dict], skip: tuple[str, ...] = ()) -> str:
    settings = {k: v for k, v in stage.settings(cfg).items() if k not in skip}
    ident = {"settings": settings, "upstream": {u: done[u]["fingerprint"] for u in stage.upstream}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def run_demo(cfg: DemoConfig) -> Path:
    """Run (or reuse) every stage, then write <out>/report.md; returns the report path."""
    out = Path(cfg.out).resolve()
    (out / "stages").mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    wall = time.perf_counter()
    run_stages, stage_dirs = stages(cfg)
    for stage in run_stages:
        fp, base = fingerprint(stage, cfg, done), fingerprint(stage, cfg, done, skip=stage.resumable)
        marker = out / "stages" / f"{stage.name}.json"
        if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fp:
            done[stage.name] = {**json.loads(marker.read_text()), "reused": True}
            print(f"== {stage.name}: reused ({done[stage.name]['seconds']:.1f} s when it ran)", flush=True)
            continue
        state = out / "stages" / f"{stage.name}.base"
        if not state.is_file() or state.read_text() != base:  # new inputs or settings: start this stage over
            for d in stage_dirs[stage.name]:
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
    from cluster.demo_report import write_demo_report

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


def load_demo_config(overrides: list[str]) -> DemoConfig:
    base = OmegaConf.structured(DemoConfig)
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.from_dotlist(overrides)))
    except Exception as e:  # omegaconf raises several types for unknown keys and bad values
        known = ", ".join(asdict(DemoConfig()))
        raise ValueError(f"bad demo override ({str(e).splitlines()[0]}); known keys: {known}") from None
    for name in ("tokenizer_config", "t2i_config"):
        if not Path(getattr(cfg, name)).is_file():
            raise ValueError(f"{name}={getattr(cfg, name)} does not exist; pass a YAML under training/configs/")
    if min(cfg.nproc, cfg.t2i_steps, cfg.tokenizer_steps, cfg.seeds, cfg.distill_steps, cfg.speed_images) < 1:
        raise ValueError("nproc, t2i_steps, tokenizer_steps, seeds, distill_steps and speed_images must be >= 1")
    if cfg.samples < 16:
        raise ValueError(f"samples must be >= 16, got {cfg.samples}")
    return cfg


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cluster.demo", description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="DemoConfig fields, e.g. out=runs/demo t2i_steps=400")
    args = p.parse_args(argv)
    try:
        cfg = load_demo_config(args.overrides)
    except ValueError as e:
        p.error(str(e))
    run_demo(cfg)


if __name__ == "__main__":
    from cluster.demo import main as _main

    _main()
