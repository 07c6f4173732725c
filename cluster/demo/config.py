"""The demo's settings: `DemoConfig` (dotted overrides on the command line, e.g. `t2i_steps=50 out=runs/demo_short`)
and `load_demo_config`, which checks them and fixes the process count for this machine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from cluster.demo.launch import plan_launch
from models.core.sampling import SamplingConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "training" / "configs"


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    seed: int = 0
    nproc: int | None = None  # training and sampling processes (torchrun): unset, one per GPU, else 2 on CPU
    # data
    samples: int = 4000
    image_size: int = 32
    samples_per_shard: int = 500
    val_fraction: float = 0.05  # held out at tokenization (by sample key) for the validation curve
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
    watch_per_tag: int = 2  # prompts per tag the checkpoint watcher (eval.watch) scores at every checkpoint
    # optional stages: distil the P=4 model into a P'-token student (cluster/demo/distill.py)
    distill: bool = False
    distill_parallel_num: int = 16
    distill_steps: int = 1000
    distill_min_object_area: float = 0.0  # curated subset: data.subset.score=min_object_area (0 keeps everything)
    speed_images: int = 32  # images each model samples for the time-per-image figure
    # optional stages: a held-out concept taught by LoRA and by full fine-tuning (cluster/demo/finetune.py)
    finetune: bool = False  # also holds `finetune_concept`'s colour out of the base data
    finetune_concept: str = "purple circle"  # a colour-shape pair
    finetune_samples: int = 300  # generated scenes with the concept as their subject
    finetune_steps: int = 150
    finetune_lora_rank: int = 16
    finetune_concept_prompts: int = 12  # prompts naming the concept (its score), each sampled images_per_prompt times


def concept(cfg: DemoConfig) -> tuple[str, str]:
    """The fine-tuning concept's (color, shape)."""
    from data_pipeline.shapes import parse_pair

    return parse_pair(cfg.finetune_concept)


def held_out(cfg: DemoConfig):
    """What the base data holds out with `finetune=true` (else None): every object of the concept's colour, so that the
    base cannot compose the concept from that colour on other shapes and the shape in other colours (which it does
    for a pair held out alone), and the concept is new to it."""
    return (concept(cfg)[0], None) if cfg.finetune else None


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
    cfg.nproc = plan_launch(cfg.nproc).nproc
    counts = (cfg.nproc, cfg.t2i_steps, cfg.tokenizer_steps, cfg.seeds, cfg.distill_steps, cfg.speed_images)
    if min(*counts, cfg.watch_per_tag) < 1:
        raise ValueError(
            "nproc, t2i_steps, tokenizer_steps, seeds, distill_steps, speed_images and watch_per_tag must be >= 1"
        )
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.finetune:
        concept(cfg)  # a ValueError naming the choices
        if min(cfg.finetune_samples, cfg.finetune_steps, cfg.finetune_lora_rank, cfg.finetune_concept_prompts) < 1:
            raise ValueError(
                "finetune_samples, finetune_steps, finetune_lora_rank and finetune_concept_prompts must be >= 1"
            )
    if cfg.samples < 16:
        raise ValueError(f"samples must be >= 16, got {cfg.samples}")
    return cfg
