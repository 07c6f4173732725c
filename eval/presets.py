"""The published sampling settings of every released BitDance model (`eval.generate --preset NAME`), gathered from
the model families (`models/<family>/presets.py`), and the recognition of a checkpoint as one of them, so that its
published settings apply by default. Explicit `--steps`, `--cfg-scale` and `--cfg-schedule` flags override a preset.
"""

from __future__ import annotations

from models.c2i.presets import recognise_c2i_checkpoint, recognise_c2i_shapes
from models.core.sampling import Preset
from models.family import all_presets
from models.t2i.presets import recognise_t2i_folder

PRESETS: dict[str, Preset] = all_presets()

__all__ = [
    "PRESETS",
    "Preset",
    "get_preset",
    "recognise_c2i_checkpoint",
    "recognise_c2i_shapes",
    "recognise_t2i_folder",
]


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
