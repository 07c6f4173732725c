"""The demo's optional fine-tuning stages (`make demo ARGS="finetune=true"`): a colour-shape pair (`finetune_concept`,
"purple circle") whose colour the base data holds out (no base scene has a purple object, so the base cannot compose
the pair from purple squares and red circles) is taught to the base model afterwards, by LoRA adapters and, for
comparison, by full fine-tuning, on the same data and steps (training/finetune.py).

  ft_data      `finetune_samples` scenes with the concept as their subject, captioned in the base data's style
  ft_tokenize  the concept data tokenized (Ray job) with the same text and image tokenizers and P as the base
  ft_lora      `finetune.method=lora` from the base export on a 50/50 mixture of the concept and the base tokens (the
               base data keeps the other tags); the EMA adapters are exported to ft_lora/export/adapter (PEFT format)
  ft_full      `finetune.method=full`, the same data, steps and schedule
  ft_eval      one sampling call per model: the adapters (unmerged, `eval.generate --lora`) and the full fine-tune on
               every seed's benchmark draw (the base's prompt sets and flags) and the concept prompts (a single object,
               counts, and relations with it as subject; scored with colours), the base on the concept prompts (its
               benchmark samples are the sample stage's); per tag over the prompts not naming the held-out colour (the
               "other tags" that must not be lost) and the concept's score, per seed
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cluster.demo.config import DemoConfig, concept, held_out
from cluster.demo.stage import Stage, file_digest, pick, sh, torchrun
from cluster.demo.stages import (
    run_tokenize,
    run_train,
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

    color, shape = concept(cfg)
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


def eval_prompts(cfg: DemoConfig, benchmark: bool = True) -> list[dict]:
    """What a fine-tuned model is sampled on, in one `eval.generate` call: for each benchmark seed k, that seed's
    benchmark draw (`shapes_prompts(seed + k)`, with `benchmark`) and the concept prompts, each dict marked with its
    "seed" k and "set" ("benchmark" or "concept")."""
    from eval.shapes_bench import shapes_prompts

    prompts = []
    for k in range(cfg.seeds):
        draw = shapes_prompts(cfg.seed + k, cfg.prompts_per_tag) if benchmark else []
        prompts += [p | {"seed": k, "set": "benchmark"} for p in draw]
        prompts += [p | {"seed": k, "set": "concept"} for p in concept_prompts(cfg)]
    return prompts


def sample_and_score(cfg: DemoConfig, out: Path, model: Path, dest: str, specs: list[dict], flags=()) -> list[tuple]:
    """`specs` sampled from `model` by one torchrun `eval.generate --task shapes --prompts-file` call into <out>/<dest>
    (the benchmark's sampler flags and images per prompt) and scored: (spec, correct) per image."""
    folder = out / dest
    prompts = out / f"{dest}.jsonl"  # beside the folder: eval.generate's --out must be its own
    prompts.write_text("".join(json.dumps(p) + "\n" for p in specs))
    task = ["--task", "shapes", "--prompts-file", str(prompts), "--model", str(model), "--out", str(folder)]
    per = ["--images-per-prompt", str(cfg.images_per_prompt), "--batch-size", "16", "--seed", str(cfg.seed)]
    sh([*torchrun(cfg), "-m", "eval.generate", *task, *shapes_sampling_flags(cfg), *flags, *per],
       out / "logs" / f"{dest}.log")  # fmt: skip
    return scored(folder)


def scored(folder: Path) -> list[tuple[dict, bool]]:
    """(spec, correct) of every image of a GenEval-layout folder of shapes prompts."""
    from eval.shapes_bench import scored_images

    return [(spec, correct) for _, spec, _, correct, _ in scored_images(folder)]


def names_held_out(cfg: DemoConfig, spec: dict) -> bool:
    """Whether a prompt names what the base data held out (the concept's colour): such prompts are the concept's, not
    the 'other tags' that fine-tuning must not lose."""
    held = held_out(cfg) or concept(cfg)
    words = [w.rstrip("s") for w in spec["prompt"].split()]
    return any(w == held[0] for w in words) if held[1] is None else f"{held[0]} {held[1]}" in " ".join(words)


def summarize(cfg: DemoConfig, rows: list[tuple[dict, bool]]) -> dict:
    """A model's row of the table from its scored images: the concept score (accuracy per seed, their mean and
    spread) and the per-tag accuracy (mean over the seeds) of the benchmark prompts not naming what was held out."""
    concept_hits: dict[int, list[bool]] = {}
    tag_hits: dict[int, dict[str, list[bool]]] = {}
    for spec, ok in rows:
        if spec["set"] == "concept":
            concept_hits.setdefault(spec["seed"], []).append(ok)
        elif not names_held_out(cfg, spec):
            tag_hits.setdefault(spec["seed"], {}).setdefault(spec["tag"], []).append(ok)
    accs = [float(np.mean(v)) for _, v in sorted(concept_hits.items())]
    per_seed = [{t: float(np.mean(v)) for t, v in tags.items()} for tags in tag_hits.values()]
    tags = dict.fromkeys(t for s in per_seed for t in s)
    return {
        "concept": {
            "score": float(np.mean(accs)),
            "sd": float(np.std(accs)),
            "per_seed": accs,
            "prompts": cfg.finetune_concept_prompts,
        },  # fmt: skip
        "per_tag": {t: float(np.mean([s[t] for s in per_seed if t in s])) for t in tags},
    }


def base_benchmark(cfg: DemoConfig, out: Path) -> list[tuple[dict, bool]]:
    """The base's scored images of the benchmark (the sample stage's folders, one per seed) as benchmark rows."""
    folders = enumerate(seed_dirs(out / "samples", cfg.seeds))
    return [(spec | {"seed": k, "set": "benchmark"}, ok) for k, folder in folders for spec, ok in scored(folder)]


def concept_chance(cfg: DemoConfig, n: int) -> float:
    """Accuracy of `n` random base-data renders (`make_scene`, nothing held out) against random concept prompts: the
    concept score's chance level."""
    from data_pipeline.shapes import make_scene, render
    from eval.shapes_bench import score_image

    specs, rng = concept_prompts(cfg), np.random.default_rng([cfg.seed, 28])
    hits = [score_image(render(make_scene(rng, cfg.image_size, cfg.image_size)), specs[i % len(specs)])[0]
            for i in range(n)]  # fmt: skip
    return float(np.mean(hits))


def run_ft_eval(cfg: DemoConfig, out: Path) -> dict:
    """The concept and the other tags scored for the base (its benchmark samples and the concept prompts), the adapters
    (unmerged: `eval.generate --lora`) and the full fine-tune: one sampling call per model, every seed's prompts."""
    base, adapter = out / "t2i" / "export", out / "ft_lora" / "export" / "adapter"
    rows = {
        "base": base_benchmark(cfg, out) + sample_and_score(cfg, out, base, "ft_base", eval_prompts(cfg, False)),
        "lora": sample_and_score(cfg, out, base, "ft_lora_samples", eval_prompts(cfg), ("--lora", str(adapter))),
        "full": sample_and_score(cfg, out, out / "ft_full" / "export", "ft_full_samples", eval_prompts(cfg)),
    }
    return {
        "concept": cfg.finetune_concept,
        "held_out": " ".join(w for w in held_out(cfg) if w),
        "rows": {m: summarize(cfg, rows[m]) for m in MODELS},
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
        owns=(*(f"{d}{x}" for d in ("ft_base", "ft_lora_samples", "ft_full_samples") for x in ("", ".jsonl")),),
    ),
)
