"""The shapes benchmark over several benchmark seeds, each its own prompt draw and noise (folder <samples>/seed_<k>,
sampled with seed + k): every seed's folder scored, the per-tag mean and standard deviation over the seeds, chance,
the image tokenizer's ceiling on the same prompts, and the markdown section that puts them side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from eval.shapes_bench import ceiling_level, format_table, score_folder, shapes_prompts
from models.core.sampling import SamplingConfig


def seed_dirs(samples: Path, seeds: int) -> list[Path]:
    """One sample folder per benchmark seed: <samples>/seed_<k>."""
    return [samples / f"seed_{k}" for k in range(seeds)]


def score_seeds(samples: Path, seeds: int, chance_samples: int, size: int) -> dict:
    """Scores of every seed's folder (each also written to its summary.json) and their mean and spread: `per_tag` /
    `overall` are means over the seeds, `sd` their standard deviations (population), `per_seed` each seed's overall
    score, `chance` from `chance_level(chance_samples)` at image side `size`."""
    runs = []
    for folder in seed_dirs(samples, seeds):
        runs.append(score_folder(folder, chance_samples, size=size))
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


def tokenizer_ceiling(tokenizer: Path, seed: int, seeds: int, per_tag: int, renders: int, size: int) -> dict:
    """The scorer's accuracy on an image tokenizer's (exported folder) reconstructions of `renders` correct renders of
    every seed's prompts: what a perfect model could reach through that tokenizer."""
    import torch

    from models.tokenizer.io import load_tokenizer
    from models.tokenizer.model import images_to_tensor, tensor_to_images

    ae = load_tokenizer(tokenizer)

    @torch.no_grad()
    def reconstruct(images: np.ndarray) -> np.ndarray:
        return tensor_to_images(ae.decode(ae.encode(images_to_tensor(torch.from_numpy(images))).bits)).numpy()

    prompts = [p for k in range(seeds) for p in shapes_prompts(seed + k, per_tag)]
    accuracy = ceiling_level(reconstruct, prompts, renders, seed, size)
    return {"per_tag": accuracy, "overall": float(np.mean(list(accuracy.values())))}


def fmt(v, spec: str = ".3f") -> str:
    """A number for a report; "n/a" for None and NaN."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def mean_sd(mean: float, sd: float) -> str:
    return f"{fmt(mean)} ± {fmt(sd)}"


def benchmark_section(score: dict, images_per_prompt: int, sampling: SamplingConfig) -> list[str]:
    """The markdown benchmark table of `score_seeds` (with its "ceiling"): per tag the mean and spread over the seeds,
    chance, the tokenizer's ceiling and the target (2x chance where chance is below 0.3; the mean at least half the
    ceiling)."""
    chance, achieved = score["chance"], score["overall"]
    ceiling = score.get("ceiling", {"per_tag": {}, "overall": float("nan")})
    seeds = ", ".join(fmt(v) for v in score["per_seed"])
    lines = [
        "## Shapes benchmark",
        "",
        f"Mean accuracy over the tags: **{mean_sd(achieved, score['overall_sd'])}** (mean ± standard deviation over "
        f"{len(score['per_seed'])} benchmark seeds, each its own prompt draw and noise: {seeds}); chance (a random "
        f"training image per prompt): **{fmt(chance['overall'])}**; ceiling (the scorer on the image tokenizer's "
        f"reconstructions of correct renders, what a perfect model could reach through it): "
        f"**{fmt(ceiling['overall'])}**. {score['images']} images, {images_per_prompt} per prompt per seed, "
        f"{sampling.steps} head steps, CFG {sampling.cfg_scale}.",
        "",
        "| tag | accuracy (mean ± sd) | chance | ceiling | target | met | images |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tag, acc in score["per_tag"].items():
        c = chance["per_tag"].get(tag)
        target = 2 * c if c is not None and c < 0.3 else None
        met = "" if target is None else ("yes" if acc >= target else "no")
        lines.append(
            f"| {tag} | {mean_sd(acc, score['sd'][tag])} | {fmt(c)} | {fmt(ceiling['per_tag'].get(tag))} | "
            f"{'>= ' + fmt(target) if target is not None else '-'} | {met} | {score['counts'][tag]} |"
        )
    half = ceiling["overall"] / 2
    met = "yes" if achieved >= half else "no"
    lines += [
        f"| **mean** | **{mean_sd(achieved, score['overall_sd'])}** | {fmt(chance['overall'])} | "
        f"{fmt(ceiling['overall'])} | >= {fmt(half)} | {met} | {score['images']} |",
        "",
    ]
    return lines
