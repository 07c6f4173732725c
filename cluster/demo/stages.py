"""The demo's base stages, each a real entry point run as a user runs it on a cluster: the shapes data, the binary
tokenizer, the text tokenizer, Ray tokenization, text-to-image training, sampling the benchmark prompts and scoring
them (`STAGES`, in order); the training stages' `training.train` overrides (`tokenizer_overrides`, `t2i_overrides`)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from cluster.demo.config import DemoConfig, held_out
from cluster.demo.launch import plan_launch
from cluster.demo.stage import Stage, beside, file_digest, pick, sh, torchrun
from data_pipeline.shard_format import VAL_DIR
from eval.shapes_seeds import score_seeds, seed_dirs, tokenizer_ceiling


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


def shapes_command(cfg: DemoConfig, raw: Path, samples: int, seed: int, pair_flags: list[str]) -> list[str]:
    """`python -m data_pipeline.shapes` writing `samples` scenes into `raw` (`pair_flags`: --hold-out/--concept)."""
    return [
        sys.executable,
        "-m",
        "data_pipeline.shapes",
        "--out",
        str(raw),
        "--num-samples",
        str(samples),
        "--size",
        f"{cfg.image_size}x{cfg.image_size}",
        "--per-shard",
        str(cfg.samples_per_shard),
        "--seed",
        str(seed),
        *pair_flags,
    ]


def t2i_raw(cfg: DemoConfig) -> str:
    """The folder under <out>/data of the text-to-image model's images: `raw`, or with `finetune=true` `raw_t2i`, the
    same scenes without what the base holds out. The image tokenizer always learns from `raw` (all of them): it is
    the generic part, and a colour it never saw could not be drawn by any fine-tune."""
    return "raw_t2i" if held_out(cfg) else "raw"


def run_data(cfg: DemoConfig, out: Path) -> dict:
    """The shapes data: every scene (`raw`) and, with `finetune=true`, the base's scenes without the held-out colour."""
    data, held = out / "data", held_out(cfg)
    sh(shapes_command(cfg, data / "raw", cfg.samples, cfg.seed, []), out / "logs" / "data.log")
    text = " ".join(w for w in held if w) if held else None
    if text:
        sh(
            shapes_command(cfg, data / t2i_raw(cfg), cfg.samples, cfg.seed, ["--hold-out", text]),
            out / "logs" / "data.log",
        )
    size = f"{cfg.image_size}x{cfg.image_size}"
    return {"raw": str(data / t2i_raw(cfg)), "samples": cfg.samples, "size": size, "held_out": text}


def tokenizer_overrides(cfg: DemoConfig, out: Path) -> list[str]:
    """The tokenizer stage's `training.train` overrides of `cfg.tokenizer_config` (this machine's last)."""
    return [
        f"run_dir={out / 'tokenizer'}",
        f"data.data_dir={out / 'data' / 'raw'}",
        f"data.image_size={cfg.image_size}",
        f"seed={cfg.seed}",
        *_schedule(cfg.tokenizer_config, cfg.tokenizer_steps),
        *plan_launch(cfg.nproc).overrides(cfg.tokenizer_config),
    ]


def run_tokenizer(cfg: DemoConfig, out: Path) -> dict:
    run_dir = out / "tokenizer"
    cmd = [*torchrun(cfg), "-m", "training.train", "--config", cfg.tokenizer_config, *tokenizer_overrides(cfg, out)]
    sh(cmd, out / "logs" / "tokenizer.log")
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
    corpus = [sample_scene(i, cfg.seed, sizes, held_out(cfg)).caption for i in range(min(cfg.samples, 2000))]
    corpus += [p["prompt"] for p in shapes_prompts(cfg.seed, cfg.prompts_per_tag)]
    path = build_chat_tokenizer(corpus, out / "text_tokenizer", vocab_size=cfg.text_vocab)
    return {"path": str(path), "vocab_size": cfg.text_vocab}


def t2i_parallel_num(cfg: DemoConfig) -> int:
    """P of the T2I model `cfg.t2i_config` names."""
    from models.t2i.model import get_t2i_config

    name = OmegaConf.load(cfg.t2i_config).model.name
    return get_t2i_config(name).parallel_num


def run_tokenize(
    cfg: DemoConfig, out: Path, parallel_num: int | None = None, dest: str = "tokens", src: str | None = None
) -> dict:
    """Ray tokenization of <out>/data/<src> (default: the text-to-image images, `t2i_raw`) into <out>/data/<dest>, for
    the T2I model's P (or `parallel_num`)."""
    tokens, src = out / "data" / dest, src or t2i_raw(cfg)
    size = f"{cfg.image_size}x{cfg.image_size}"
    sh(
        [
            sys.executable,
            "-m",
            "data_pipeline.tokenize",
            "--source",
            "wds",
            "--input",
            str(out / "data" / src),
            "--output",
            str(tokens),
            "--tokenizer",
            str(out / "tokenizer" / "export"),
            "--text-tokenizer",
            str(out / "text_tokenizer"),
            "--parallel-num",
            str(parallel_num or t2i_parallel_num(cfg)),
            "--size",
            size,
            "--num-cpus",
            str(max(2, cfg.nproc)),
            "--val-fraction",
            str(cfg.val_fraction),
        ],
        out / "logs" / f"{dest}.log",
    )
    manifest = json.loads((tokens / "manifest.json").read_text())
    return {
        "tokens": str(tokens),
        "samples": manifest.get("samples"),
        "skipped": manifest.get("skipped"),
        "bits_per_token": manifest.get("bits_per_token"),
        "val_samples": _val_samples(tokens),
    }


def _val_samples(tokens: Path) -> int:
    val = tokens / VAL_DIR / "manifest.json"
    return int(json.loads(val.read_text()).get("samples", 0)) if val.is_file() else 0


def t2i_overrides(
    cfg: DemoConfig, out: Path, name: str = "t2i", steps: int | None = None, tokens: str = "tokens", extra=()
) -> list[str]:
    """A text-to-image training stage's `training.train` overrides of `cfg.t2i_config` into <out>/<name> on
    <out>/data/<tokens> (`extra`: the distillation's model overrides; this machine's last)."""
    return [
        f"run_dir={out / name}",
        f"data.data_dir={out / 'data' / tokens}",
        f"model.text_tokenizer={out / 'text_tokenizer'}",
        f"model.image_tokenizer={out / 'tokenizer' / 'export'}",
        f"seed={cfg.seed}",
        *_schedule(cfg.t2i_config, steps or cfg.t2i_steps),
        *extra,
        *plan_launch(cfg.nproc).overrides(cfg.t2i_config),
    ]


def run_train(
    cfg: DemoConfig, out: Path, name: str = "t2i", steps: int | None = None, tokens: str = "tokens", extra=()
) -> dict:
    """torchrun text-to-image training into <out>/<name> (the distillation stage passes its own model overrides)."""
    run_dir, steps = out / name, steps or cfg.t2i_steps
    overrides = t2i_overrides(cfg, out, name, steps, tokens, extra)
    sh([*torchrun(cfg), "-m", "training.train", "--config", cfg.t2i_config, *overrides], out / "logs" / f"{name}.log")
    rows = _metrics(run_dir)
    return {
        "export": str(run_dir / "export"),
        "steps": steps,
        "final_loss": _last(rows, "loss"),
        "val_loss": _last(rows, "val/loss"),
        "val_steps": sum(1 for r in rows if "val/loss" in r),
        "tokens_per_s": _mean(rows, "tokens_per_s"),
        "samples_per_s": _mean(rows, "samples_per_s"),
    }


def shapes_sampling_flags(cfg: DemoConfig) -> list[str]:
    """eval.generate's image size and sampler flags of the demo's shapes prompts (sampling and the watcher alike)."""
    side = str(cfg.image_size)
    s = cfg.sampling
    return ["--height", side, "--width", side, "--image-size", f"{side}x{side}", "--steps", str(s.steps),
            "--cfg-scale", str(s.cfg_scale), "--cfg-schedule", s.cfg_schedule]  # fmt: skip


def watch_command(cfg: DemoConfig, run_dir: Path, steps: int) -> list[str]:
    """The checkpoint watcher beside the training run: the shapes benchmark on `watch_per_tag` prompts per tag, one
    image each, at every checkpoint up to `steps`."""
    return [
        sys.executable,
        "-m",
        "eval.watch",
        "--run-dir",
        str(run_dir),
        "--task",
        "shapes",
        "--per-tag",
        str(cfg.watch_per_tag),
        "--images-per-prompt",
        "1",
        *shapes_sampling_flags(cfg),
        "--seed",
        str(cfg.seed),
        "--interval",
        "2",
        "--until-step",
        str(steps),
    ]


def run_train_watched(cfg: DemoConfig, out: Path) -> dict:
    """`run_train` with the checkpoint watcher (`python -m eval.watch`) beside it, registered before the first
    checkpoint, so that keep-last-N keeps every checkpoint until it is scored; the scores per checkpoint."""
    run_dir = out / "t2i"
    run_dir.mkdir(parents=True, exist_ok=True)
    with beside(watch_command(cfg, run_dir, cfg.t2i_steps), out / "logs" / "watch.log"):
        result = run_train(cfg, out)
    rows = [r for r in _metrics(run_dir) if "watch/score" in r]
    result["watch"] = [{"step": r["step"], "score": r["watch/score"]} for r in sorted(rows, key=lambda r: r["step"])]
    return result


def run_sample(cfg: DemoConfig, out: Path, model: str = "t2i", dest: str = "samples", flags=()) -> dict:
    """The shapes-benchmark prompts of every seed, sampled with torchrun from <out>/<model>/export (`flags`: more
    eval.generate flags, e.g. `--lora DIR`)."""
    start, images = time.perf_counter(), 0
    for k, folder in enumerate(seed_dirs(out / dest, cfg.seeds)):
        sample_prompts(cfg, out / model / "export", folder, cfg.seed + k, out / "logs" / f"{dest}.log", flags)
        images += len(list(folder.glob("*/samples/*.png")))
    return {"samples": str(out / dest), "images": images, "images_per_s": images / (time.perf_counter() - start)}


def sample_prompts(cfg: DemoConfig, model: Path, samples: Path, seed: int, log: Path, flags=()) -> None:
    sh(
        [
            *torchrun(cfg),
            "-m",
            "eval.generate",
            "--task",
            "shapes",
            "--model",
            str(model),
            "--out",
            str(samples),
            *shapes_sampling_flags(cfg),
            *flags,
            "--images-per-prompt",
            str(cfg.images_per_prompt),
            "--batch-size",
            "16",
            "--seed",
            str(seed),
            "--per-tag",
            str(cfg.prompts_per_tag),
        ],
        log,
    )


def score_samples(cfg: DemoConfig, samples: Path) -> dict:
    """The benchmark scores of the sample folders under `samples` (eval.shapes_seeds.score_seeds)."""
    return score_seeds(samples, cfg.seeds, cfg.chance_samples, cfg.image_size)


def run_score(cfg: DemoConfig, out: Path) -> dict:
    """Per-tag accuracy (mean and spread over the seeds), chance, and the tokenizer's ceiling."""
    result = score_samples(cfg, out / "samples")
    result["ceiling"] = tokenizer_ceiling(
        out / "tokenizer" / "export", cfg.seed, cfg.seeds, cfg.prompts_per_tag, cfg.ceiling_renders, cfg.image_size
    )
    return result


STAGES: tuple[Stage, ...] = (
    Stage(
        "data",
        "shapes dataset (webdataset tars)",
        lambda c: (
            pick("seed", "samples", "image_size", "samples_per_shard")(c)
            | ({"held_out": held_out(c)} if c.finetune else {})
        ),
        (),
        run_data,
        owns=("data/raw", "data/raw_t2i"),
    ),
    Stage(
        "tokenizer",
        "binary tokenizer training (DeepSpeed)",
        lambda c: {"config": file_digest(c.tokenizer_config), "steps": c.tokenizer_steps},
        ("data",),
        run_tokenizer,
        owns=("tokenizer",),
        resumable=("steps",),
    ),
    Stage(
        "text",
        "text tokenizer (BPE + Qwen3 special tokens)",
        pick("text_vocab", "prompts_per_tag"),
        ("data",),
        run_text,
        owns=("text_tokenizer",),
    ),
    Stage(
        "tokenize",
        "Ray tokenization -> binary-token shards",
        lambda c: {"config": file_digest(c.t2i_config)},
        ("tokenizer", "text"),
        run_tokenize,
        owns=("data/tokens",),
    ),
    Stage(
        "train",
        "text-to-image training (torchrun, DeepSpeed) with the checkpoint watcher beside it",
        lambda c: (
            {"config": file_digest(c.t2i_config), "steps": c.t2i_steps, "nproc": c.nproc, "watch": c.watch_per_tag}
            | {"sampling": asdict(c.sampling)}
        ),
        ("tokenize",),
        run_train_watched,
        owns=("t2i",),
        resumable=("steps",),
    ),
    Stage(
        "sample",
        "sampling the shapes-benchmark prompts",
        pick("prompts_per_tag", "images_per_prompt", "seeds", "sampling", "nproc"),
        ("train",),
        run_sample,
        owns=("samples",),
    ),
    Stage(
        "score",
        "scoring (per-tag accuracy over the seeds, chance, tokenizer ceiling)",
        pick("chance_samples", "ceiling_renders"),
        ("sample",),
        run_score,
    ),
)
