"""The files a request leaves for download: one folder per request under the output folder, each image a PNG whose
text chunks hold its settings (`bitdance`: JSON; `parameters`: the caption line), and `settings.json` beside them
listing every image's settings."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from eval.app.session import Result

SETTINGS_KEY = "bitdance"  # the PNG text chunk holding an image's settings as JSON
_COUNTER = itertools.count()


def request_folder(out: Path) -> Path:
    """A new folder for one request's files: <out>/<date-time>-<n>."""
    folder = Path(out) / f"{time.strftime('%Y%m%d-%H%M%S')}-{next(_COUNTER):04d}"
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def save_results(results: list[Result], out: Path) -> list[Path]:
    """The PNG of every result (settings in its text chunks) and `settings.json`, in a new request folder."""
    folder = request_folder(out)
    paths = []
    for result in results:
        info = PngInfo()
        info.add_text(SETTINGS_KEY, json.dumps(result.settings))
        info.add_text("parameters", result.caption)
        path = folder / f"seed{result.settings['seed']}_{result.settings['image']:02d}.png"
        Image.fromarray(result.pixels).save(path, pnginfo=info)
        paths.append(path)
    listing = folder / "settings.json"
    listing.write_text(
        json.dumps([{"file": p.name, **r.settings} for p, r in zip(paths, results, strict=True)], indent=2)
    )
    return [*paths, listing]


def read_settings(png: Path) -> dict:
    """The settings a PNG it wrote carries."""
    with Image.open(png) as img:
        return json.loads(img.text[SETTINGS_KEY])
