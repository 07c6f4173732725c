"""The published sampling settings of the released class-conditional ImageNet models (official
`imagenet_gen/README.md` commands and `sample_ddp*.py` defaults: 100 head steps, guidance growing linearly from 1 at
the first AR step to a per-model scale), and the recognition of a checkpoint file as one of the named configs."""

from __future__ import annotations

from pathlib import Path

import torch

from models.core.sampling import Preset, SamplingConfig


def _imagenet(name: str, cfg_scale: float) -> Preset:
    size, par = name.split("-")
    release = f"BitDance_{size}_{par.upper()}.pt"
    return Preset(name, "c2i", release, SamplingConfig(steps=100, cfg_scale=cfg_scale, cfg_schedule="linear"))


PRESETS = (
    _imagenet("B-1x", 3.2),
    _imagenet("B-4x", 3.9),
    _imagenet("B-16x", 6.1),
    _imagenet("L-1x", 4.0),
    _imagenet("H-1x", 4.55),
)


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
