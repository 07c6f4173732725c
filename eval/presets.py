"""The published sampling settings of every released BitDance model (`eval.generate --preset NAME`), and the
recognition of a checkpoint as one of them, so that its published settings apply by default.

ImageNet (official `imagenet_gen/README.md` commands and `sample_ddp*.py` defaults): 100 head steps, guidance
growing linearly from 1 at the first AR step to a per-model scale. Text-to-image (official `t2i_pipeline.py` and
the paper): 50 head steps, constant guidance 7.5 (DPG-Bench), 13.0 for GenEval with the rewritten long prompts.
Explicit `--steps`, `--cfg-scale` and `--cfg-schedule` flags override a preset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from models.core.sampling import SamplingConfig


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "c2i" (a class-conditional checkpoint file) or "t2i" (an official-layout folder)
    release: str  # the released checkpoint the settings belong to
    sampling: SamplingConfig
    task_cfg_scale: dict[str, float] = field(default_factory=dict)  # guidance of a benchmark that differs

    def sampling_for(self, task: str, long_prompts: bool = False) -> SamplingConfig:
        key = f"{task}_long" if long_prompts else task
        if key in self.task_cfg_scale:
            return replace(self.sampling, cfg_scale=self.task_cfg_scale[key])
        return self.sampling


def _imagenet(name: str, cfg_scale: float) -> Preset:
    size, par = name.split("-")
    release = f"BitDance_{size}_{par.upper()}.pt"
    return Preset(name, "c2i", release, SamplingConfig(steps=100, cfg_scale=cfg_scale, cfg_schedule="linear"))


def _t2i(name: str) -> Preset:
    sampling = SamplingConfig(steps=50, cfg_scale=7.5, cfg_schedule="constant")
    return Preset(name, "t2i", f"BitDance-{name}", sampling, {"geneval_long": 13.0})


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _imagenet("B-1x", 3.2),
        _imagenet("B-4x", 3.9),
        _imagenet("B-16x", 6.1),
        _imagenet("L-1x", 4.0),
        _imagenet("H-1x", 4.55),
        _t2i("14B-16x"),
        _t2i("14B-64x"),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def recognise_c2i_checkpoint(path: str | Path) -> str | None:
    """The named config (e.g. "B-1x", "tiny-16x") of a class-conditional checkpoint file, or None. Reads the file
    memory-mapped: only the shapes are looked at."""
    from models.c2i.io import WRAPPER_PREFIXES
    from models.core.state_dict import strip_prefixes

    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = (obj.get("ema") or obj.get("model")) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        return None
    return recognise_c2i_shapes({k: tuple(v.shape) for k, v in strip_prefixes(state, WRAPPER_PREFIXES).items()})


def recognise_c2i_shapes(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The named config whose model has exactly these parameter names and shapes (`vae.*` ignored), or None."""
    from models.c2i.model import C2I_CONFIGS, ClassConditionalBitDance, get_c2i_config

    shapes = {k: tuple(v) for k, v in shapes.items() if not k.startswith("vae.")}
    if shapes.get("query_token", (1,))[1:2] == (0,):
        shapes.pop("query_token")  # the patch-parallel code's empty query tensor of P = 1
    for base in C2I_CONFIGS:
        for par in (1, 4, 16):
            name = f"{base}-{par}x"
            try:
                cfg = get_c2i_config(name)
            except ValueError:
                continue  # P does not tile this config's grid
            if (cfg.grid**2, cfg.dim) != shapes.get("pos_for_diff.weight"):
                continue
            with torch.device("meta"):
                model = ClassConditionalBitDance(cfg)
            if {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes:
                return name
    return None


def recognise_t2i_folder(folder: str | Path) -> str | None:
    """ "14B-16x" / "14B-64x" for an official-layout folder with the Qwen3-14B backbone and a 16/64-token head."""
    folder = Path(folder)
    try:
        llm = json.loads((folder / "config.json").read_text())
        head = json.loads((folder / "vision_head_config.json").read_text())
    except (OSError, ValueError):
        return None
    if (llm.get("hidden_size"), llm.get("num_hidden_layers")) != (5120, 40):
        return None
    name = f"14B-{head.get('parallel_num')}x"
    return name if name in PRESETS else None
