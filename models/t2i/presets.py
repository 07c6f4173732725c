"""The published sampling settings of the released text-to-image models (official `t2i_pipeline.py` and the paper:
50 head steps, constant guidance 7.5; 13.0 for GenEval with the rewritten long prompts), and the recognition of an
official-layout folder as one of them."""

from __future__ import annotations

import json
from pathlib import Path

from models.core.sampling import Preset, SamplingConfig


def _t2i(name: str) -> Preset:
    sampling = SamplingConfig(steps=50, cfg_scale=7.5, cfg_schedule="constant")
    return Preset(name, "t2i", f"BitDance-{name}", sampling, {"geneval_long": 13.0})


PRESETS = (_t2i("14B-16x"), _t2i("14B-64x"))


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
    return name if name in {p.name for p in PRESETS} else None
