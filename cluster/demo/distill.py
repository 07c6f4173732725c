"""The demo's optional distillation stages (`make demo ARGS="distill=true"`): the P=4 model distilled into a P'=16
student at demo scale, by the same path the 14B 16x -> 64x distillation takes (README "Distilling 16x into 64x").

  tokenize_student the raw shapes data tokenized again for P' (Ray job; the same text tokenizer, so the first query
                  ids are the teacher's)
  distill         torchrun training of `demo-<P'>x` with `model.init_from=<teacher export>` (models/t2i/repatch.py),
                  optionally on a curated subset (`data.subset.score=min_object_area`)
  distill_eval    the student sampled on the benchmark seeds and scored; then, in one process, both models sample
                  the same prompts with the same settings for the time per image: the report's distillation table

Time per image is measured two ways. Latency, one image at a time, is the paper's figure (seconds for one 1024px
image) and the regime next-patch decoding speeds up: each AR step costs about the same whatever P is, so P'/P times
fewer steps is that much faster. Throughput, batches of 16, is shown beside it: on a CPU the tiny model's steps are
compute-bound at that batch, and the head does the same work per token for any P, so the gain there is smaller.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cluster.demo.config import DemoConfig
from cluster.demo.stage import Stage, pick
from cluster.demo.stages import run_sample, run_tokenize, run_train, score_samples, t2i_parallel_num

TOKENS = "tokens_student"  # <out>/data/tokens_student: the raw data tokenized for the student's P


def run_tokenize_student(cfg: DemoConfig, out: Path) -> dict:
    return run_tokenize(cfg, out, cfg.distill_parallel_num, TOKENS)


def run_distill(cfg: DemoConfig, out: Path) -> dict:
    extra = [f"model.name=demo-{cfg.distill_parallel_num}x", f"model.init_from={out / 't2i' / 'export'}"]
    if cfg.distill_min_object_area > 0:
        extra += ["data.subset.score=min_object_area", f"data.subset.min_score={cfg.distill_min_object_area}"]
    return run_train(cfg, out, "distill", cfg.distill_steps, TOKENS, extra)


BATCHES = {"latency": 1, "throughput": 16}  # images per sampling call for each time-per-image figure


def time_per_image(folder: Path, prompts: list[str], cfg: DemoConfig) -> dict[str, float]:
    """Seconds per image to sample and decode `prompts` with the model of an official folder, for each of BATCHES."""
    import torch

    from models.t2i.io import load_t2i_folder
    from models.t2i.sampler import sample_t2i

    size = (cfg.image_size, cfg.image_size)
    model, text, ae = load_t2i_folder(folder, image_sizes=[size])
    model.float()

    def sample(part: list[str]) -> None:
        gen = torch.Generator().manual_seed(cfg.seed)
        bits = sample_t2i(model, text, part, *size, cfg.sampling, generator=gen)
        ae.decode(bits)

    seconds = {}
    with torch.no_grad():
        sample(prompts[:2])  # warm-up (first-call allocations)
        for name, batch in BATCHES.items():
            start = time.perf_counter()
            for i in range(0, len(prompts), batch):
                sample(prompts[i : i + batch])
            seconds[name] = (time.perf_counter() - start) / len(prompts)
    return seconds


def run_distill_eval(cfg: DemoConfig, out: Path) -> dict:
    import torch

    from eval.shapes_bench import shapes_prompts

    sampled = run_sample(cfg, out, model="distill", dest="distill_samples")
    student = score_samples(cfg, out / "distill_samples")
    teacher = json.loads((out / "stages" / "score.json").read_text())["result"]
    prompts = [p["prompt"] for p in shapes_prompts(cfg.seed, cfg.prompts_per_tag)]
    prompts = (prompts * (cfg.speed_images // len(prompts) + 1))[: cfg.speed_images]
    torch.set_num_threads(max(1, cfg.nproc))
    seconds = {name: time_per_image(out / name / "export", prompts, cfg) for name in ("t2i", "distill")}
    down = json.loads((out / "data" / "tokens" / "manifest.json").read_text())["downsample"]
    grid = (cfg.image_size // down) ** 2  # tokens per image
    rows = {
        name: {
            "P": p,
            "ar_steps": grid // p,
            "s_per_image": seconds[run]["latency"],
            "s_per_image_batched": seconds[run]["throughput"],
            "score": scores["overall"],
            "sd": scores["overall_sd"],
        }
        for name, p, run, scores in (
            ("teacher", t2i_parallel_num(cfg), "t2i", teacher),
            ("student", cfg.distill_parallel_num, "distill", student),
        )
    }
    return {
        "rows": rows,
        "speedup": seconds["t2i"]["latency"] / seconds["distill"]["latency"],
        "speedup_batched": seconds["t2i"]["throughput"] / seconds["distill"]["throughput"],
        "batches": BATCHES,
        "score_ratio": student["overall"] / teacher["overall"] if teacher["overall"] else float("nan"),
        "student_scores": student,
        "images": sampled["images"],
        "speed_images": len(prompts),
    }


STAGES: tuple[Stage, ...] = (
    Stage(
        "tokenize_student",
        "Ray tokenization for the student's P",
        pick("distill_parallel_num"),
        ("tokenizer", "text"),
        run_tokenize_student,
        owns=(f"data/{TOKENS}",),
    ),
    Stage(
        "distill",
        "distillation: the P'-token student from the P=4 model (torchrun, DeepSpeed)",
        pick("distill_steps", "distill_min_object_area", "nproc"),
        ("train", "tokenize_student"),
        run_distill,
        owns=("distill",),
        resumable=("distill_steps",),
    ),
    Stage(
        "distill_eval",
        "student sampling and scoring; teacher vs student time per image",
        pick("prompts_per_tag", "images_per_prompt", "seeds", "sampling", "speed_images", "chance_samples"),
        ("distill", "score"),
        run_distill_eval,
        owns=("distill_samples",),
    ),
)
