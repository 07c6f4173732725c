"""The demo's optional fine-tuning stages (`make demo ARGS="finetune=true"`): a colour-shape pair held out of the base
data (`finetune_concept`, e.g. "red circle": no base scene has that object) is taught to the base model afterwards,
by LoRA adapters and, for comparison, by full fine-tuning, on the same data and steps (training/finetune.py).

  ft_data      `finetune_samples` scenes with the concept as their subject, captioned in the base data's style
  ft_tokenize  the concept data tokenized (Ray job) with the same text and image tokenizers and P as the base
  ft_lora      `finetune.method=lora` from the base export on a 50/50 mixture of the concept and the base tokens (the
               base data keeps the other tags); the EMA adapters are exported to ft_lora/export/adapter (PEFT format)
  ft_full      `finetune.method=full`, the same data, steps and schedule
  ft_eval      the shapes benchmark (the base's prompt sets, seeds and flags) for the adapters (`eval.generate --lora`,
               unmerged) and the full fine-tune, per tag over the prompts not naming the concept (the "other tags"
               that must not be lost); and the concept's own score: prompts naming the concept (a single
               object, counts, and relations as subject) sampled by base, LoRA and full models and scored with colours
               by the shapes scorer
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cluster.demo.config import DemoConfig, held_out
from cluster.demo.stage import Stage, file_digest, pick, sh, torchrun
from cluster.demo.stages import (
    run_sample,
    run_tokenize,
    run_train,
    score_samples,
    shapes_command,
    shapes_sampling_flags,
)
from eval.shapes_seeds import seed_dirs

RAW, TOKENS = "ft_raw", "tokens_ft"  # <out>/data/...: the concept's scenes and their tokens
MODELS = ("base", "lora", "full")  # rows of the report's fine-tuning table


def run_ft_data(cfg: DemoConfig, out: Path) -> dict:
    """`finetune_samples` scenes with the concept as their (first) object; another seed than the base data."""
    raw = out / "data" / RAW
    sh(shapes_command(cfg, raw, cfg.finetune_samples, cfg.seed + 1, ["--concept", cfg.finetune_concept]),
       out / "logs" / "ft_data.log")  # fmt: skip
    return {"raw": str(raw), "samples": cfg.finetune_samples, "concept": cfg.finetune_concept}


def run_ft_tokenize(cfg: DemoConfig, out: Path) -> dict:
    return run_tokenize(cfg, out, dest=TOKENS, src=RAW)


def finetune_overrides(cfg: DemoConfig, out: Path, method: str) -> list[str]:
    """`training.train` overrides of a fine-tuning run: the base export, `method`, and the concept/base mixture."""
    data = out / "data"
    mix = [(data / TOKENS, "concept"), (data / "tokens", "base")]
    sources = "[" + ", ".join(f"{{dir: '{d}', weight: 0.5, name: {n}}}" for d, n in mix) + "]"  # YAML flow
    lora = [f"finetune.lora.rank={cfg.finetune_lora_rank}", f"finetune.lora.alpha={2 * cfg.finetune_lora_rank}"]
    return [
        f"model.init_from={out / 't2i' / 'export'}",
        f"finetune.method={method}",
        "finetune.base_dtype=fp32",  # the demo's engine trains in fp32 (a bf16 base is refused there)
        f"data.sources={sources}",
        *(lora if method == "lora" else []),
    ]


def trainable_params(folder: Path, skip: tuple[str, ...] = ("ae.safetensors",)) -> int:
    """Parameters in the weight files a run exports to `folder` (the adapters, or the whole model without the image
    tokenizer)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        if path.name not in skip:
            with safe_open(str(path), "pt") as f:
                total += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    return total


def run_ft_lora(cfg: DemoConfig, out: Path) -> dict:
    result = run_train(cfg, out, "ft_lora", cfg.finetune_steps, TOKENS, finetune_overrides(cfg, out, "lora"))
    return result | {"adapter": str(out / "ft_lora" / "export" / "adapter"),
                     "trainable_params": trainable_params(out / "ft_lora" / "export" / "adapter")}  # fmt: skip


def run_ft_full(cfg: DemoConfig, out: Path) -> dict:
    result = run_train(cfg, out, "ft_full", cfg.finetune_steps, TOKENS, finetune_overrides(cfg, out, "full"))
    return result | {"trainable_params": trainable_params(out / "ft_full" / "export")}


def concept_prompts(cfg: DemoConfig) -> list[dict]:
    """`finetune_concept_prompts` prompt dicts naming the concept, cycling a single object (tag colors), two and three
    of it (counting) and the concept as subject of a relation (color_attr): all scored with colours."""
    from data_pipeline.shapes import COLORS, RELATIONS, SHAPES
    from eval.shapes_bench import _entry

    color, shape = held_out(cfg)
    others = [(c, s) for c in COLORS for s in SHAPES if c != color and s != shape]
    rng = np.random.default_rng([cfg.seed, 27])
    prompts = []
    for j in range(cfg.finetune_concept_prompts):
        kind = j % 4
        if kind == 0:
            prompts.append(_entry("colors", [(color, shape, 1)]))
        elif kind < 3:
            prompts.append(_entry("counting", [(color, shape, kind + 1)]))
        else:
            ref = others[int(rng.integers(len(others)))]
            relation = list(RELATIONS)[int(rng.integers(len(RELATIONS)))]
            prompts.append(_entry("color_attr", [(color, shape, 1), (*ref, 1)], relation))
    return prompts


def concept_score(cfg: DemoConfig, out: Path, model: Path, dest: str, flags: tuple[str, ...] = ()) -> dict:
    """The concept prompts sampled (`eval.generate --task prompts`, the benchmark's flags, every seed) from `model`
    and scored with the shapes scorer: accuracy per seed and their mean."""
    from PIL import Image

    from eval.shapes_bench import score_image

    specs = concept_prompts(cfg)
    prompts = out / dest / "prompts.txt"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(p["prompt"] + "\n" for p in specs))
    accs = []
    for k, folder in enumerate(seed_dirs(out / dest, cfg.seeds)):
        task = ["--task", "prompts", "--prompts-file", str(prompts), "--model", str(model), "--out", str(folder)]
        per = ["--images-per-prompt", str(cfg.images_per_prompt), "--batch-size", "16", "--seed", str(cfg.seed + k)]
        sh([*torchrun(cfg), "-m", "eval.generate", *task, *shapes_sampling_flags(cfg), *flags, *per],
           out / "logs" / f"{dest}.log")  # fmt: skip
        pngs = [(spec, png) for i, spec in enumerate(specs) for png in (folder / f"{i:05d}" / "samples").glob("*.png")]
        hits = [score_image(Image.open(png), spec)[0] for spec, png in pngs]
        accs.append(float(np.mean(hits)))
    return {"score": float(np.mean(accs)), "sd": float(np.std(accs)), "per_seed": accs, "prompts": len(specs)}


def concept_chance(cfg: DemoConfig, n: int) -> float:
    """Accuracy of `n` random base-data renders (`make_scene`, the concept not held out) against random concept
    prompts: the concept score's chance level."""
    from data_pipeline.shapes import make_scene, render
    from eval.shapes_bench import score_image

    specs, rng = concept_prompts(cfg), np.random.default_rng([cfg.seed, 28])
    hits = [score_image(render(make_scene(rng, cfg.image_size, cfg.image_size)), specs[i % len(specs)])[0]
            for i in range(n)]  # fmt: skip
    return float(np.mean(hits))


def other_tag_scores(cfg: DemoConfig, samples: Path) -> dict[str, float]:
    """Per-tag accuracy of scored benchmark samples (every seed's shapes_results.jsonl) over the prompts that do not
    name the concept, as a mean over the seeds: what fine-tuning must not lose."""
    pair, per_seed = held_out(cfg), []
    for folder in seed_dirs(samples, cfg.seeds):
        hits: dict[str, list[bool]] = {}
        for line in (folder / "shapes_results.jsonl").read_text().splitlines():
            r = json.loads(line)
            spec = json.loads((folder / f"{r['index']:05d}" / "metadata.jsonl").read_text().splitlines()[0])
            if not any((o["color"], o["shape"]) == pair for o in spec["include"]):
                hits.setdefault(r["tag"], []).append(r["correct"])
        per_seed.append({t: float(np.mean(v)) for t, v in hits.items()})
    tags = dict.fromkeys(t for s in per_seed for t in s)
    return {t: float(np.mean([s[t] for s in per_seed if t in s])) for t in tags}


def run_ft_eval(cfg: DemoConfig, out: Path) -> dict:
    """Benchmark and concept scores of the base, the adapters (unmerged) and the full fine-tune."""
    base, adapter = out / "t2i" / "export", out / "ft_lora" / "export" / "adapter"
    lora_flags = ("--lora", str(adapter))
    run_sample(cfg, out, model="t2i", dest="ft_lora_samples", flags=lora_flags)
    run_sample(cfg, out, model="ft_full", dest="ft_full_samples")
    score_samples(cfg, out / "ft_lora_samples")  # writes each seed's shapes_results.jsonl
    score_samples(cfg, out / "ft_full_samples")
    folders = {"base": out / "samples", "lora": out / "ft_lora_samples", "full": out / "ft_full_samples"}
    concept = {
        "base": concept_score(cfg, out, base, "ft_concept_base"),
        "lora": concept_score(cfg, out, base, "ft_concept_lora", lora_flags),
        "full": concept_score(cfg, out, out / "ft_full" / "export", "ft_concept_full"),
    }
    return {
        "concept": cfg.finetune_concept,
        "rows": {m: {"concept": concept[m], "per_tag": other_tag_scores(cfg, folders[m])} for m in MODELS},
        "concept_chance": concept_chance(cfg, cfg.chance_samples),
    }


STAGES: tuple[Stage, ...] = (
    Stage(
        "ft_data",
        "the held-out concept's scenes (webdataset tars)",
        pick("seed", "image_size", "samples_per_shard", "finetune_concept", "finetune_samples"),
        (),
        run_ft_data,
        owns=(f"data/{RAW}",),
    ),
    Stage(
        "ft_tokenize",
        "Ray tokenization of the concept's scenes",
        lambda c: {"config": file_digest(c.t2i_config)},
        ("ft_data", "tokenizer", "text"),
        run_ft_tokenize,
        owns=(f"data/{TOKENS}",),
    ),
    Stage(
        "ft_lora",
        "LoRA fine-tuning of the base export on the concept (torchrun)",
        pick("finetune_steps", "finetune_lora_rank", "nproc"),
        ("train", "ft_tokenize"),
        run_ft_lora,
        owns=("ft_lora",),
    ),
    Stage(
        "ft_full",
        "full fine-tuning of the base export on the same data (torchrun)",
        pick("finetune_steps", "nproc"),
        ("train", "ft_tokenize"),
        run_ft_full,
        owns=("ft_full",),
    ),
    Stage(
        "ft_eval",
        "benchmark and concept scores of base, LoRA and full fine-tune",
        pick("prompts_per_tag", "images_per_prompt", "seeds", "sampling", "chance_samples", "finetune_concept_prompts"),
        ("ft_lora", "ft_full", "score"),
        run_ft_eval,
        owns=("ft_lora_samples", "ft_full_samples", "ft_concept_base", "ft_concept_lora", "ft_concept_full"),
    ),
)
