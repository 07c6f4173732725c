"""What the sources share to make a sample: which files are images, captions (and scores) from json metadata, and
the usable sample with its empty_caption note."""

from __future__ import annotations

import json
import math

from data_pipeline.sources.base import RawSample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("caption", "text", "prompt", "txt")


def is_image(name: str) -> bool:
    """Whether a file name has an image extension (any case)."""
    return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


def caption_from_json(raw: bytes) -> tuple[str | None, int | None, dict[str, float]]:
    """(caption, class label, scores: the json's other top-level numbers, e.g. an aesthetic or CLIP score)."""
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, None, {}
    if not isinstance(meta, dict):
        return None, None, {}
    caption = next((meta[k] for k in CAPTION_KEYS if isinstance(meta.get(k), str)), None)
    label = meta.get("label", meta.get("cls"))
    scores = {
        k: float(v)
        for k, v in meta.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("label", "cls") and math.isfinite(v)
    }
    return caption, label if isinstance(label, int) else None, scores


def captioned(
    key: str, image: bytes, caption: str | None, label: int | None, need_caption: bool, scores: dict | None = None
) -> RawSample:
    """A usable sample; an empty caption is kept (an unconditional sample) and noted as empty_caption."""
    caption = (caption or "").strip()
    note = "empty_caption" if need_caption and not caption else None
    return RawSample(key, image=image, caption=caption, label=label, note=note, scores=scores or {})
