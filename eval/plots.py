"""Line plots as PNG with Pillow alone (no plotting library): training curves for reports."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def read_metrics(path: str | Path, keys: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """(step, value) series of `keys` from a run's metrics.jsonl (lines without a key or with NaN are skipped)."""
    series: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for k in keys:
            v = row.get(k)
            if isinstance(v, int | float) and math.isfinite(v) and "step" in row:
                series[k].append((float(row["step"]), float(v)))
    return series


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_plot(
    series: dict[str, list[tuple[float, float]]],
    path: str | Path,
    title: str = "",
    x_label: str = "step",
    size: tuple[int, int] = (640, 360),
    log_y: bool = False,
) -> Path:
    """Draw each non-empty series as a coloured line on shared axes with a legend (log10 y axis with `log_y`:
    non-positive values are dropped); returns the PNG path."""
    if log_y:
        series = {k: [(x, math.log10(y)) for x, y in v if y > 0] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        raise ValueError(f"nothing to plot for {path}: every series is empty")
    w, h = size
    left, right, top, bottom = 56, 16, 28, 40
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    for t in _ticks(y0, y1):
        _, y = px(x0, t)
        d.line([(left, y), (w - right, y)], fill=(230, 230, 230))
        d.text((4, y - 6), f"{10**t:.3g}" if log_y else f"{t:.3g}", fill="black")
    for t in _ticks(x0, x1):
        x, _ = px(t, y0)
        d.line([(x, top), (x, h - bottom)], fill=(240, 240, 240))
        d.text((x - 8, h - bottom + 4), f"{t:g}", fill="black")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text((w // 2 - 3 * len(x_label), h - 16), x_label, fill="black")
    d.text((left, 8), title, fill="black")
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        if len(pts) > 1:
            d.line([px(x, y) for x, y in pts], fill=color, width=2)
        else:
            d.point(px(*pts[0]), color)
        lx = w - right - 150
        ly = top + 8 + 14 * i
        d.line([(lx, ly + 6), (lx + 18, ly + 6)], fill=color, width=3)
        d.text((lx + 24, ly), name, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
