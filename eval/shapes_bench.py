"""The CPU-scale GenEval of the project: a prompt set in the shapes-caption language and a programmatic scorer.

Prompts (`shapes_prompts`) use only captions that `data_pipeline.shapes` itself writes, so a model trained on that
dataset can follow them; every caption names colours, so the tag alone says what is checked:

  tag            example prompt                                  checked
  single_object  "a red circle"                                  >= 1 circle (any colour)
  two_object     "a red circle to the left of a green triangle"  >= 1 circle and >= 1 triangle (any colour, anywhere)
  counting       "three yellow triangles"                        exactly 3 yellow triangles (other objects ignored)
  colors         "a blue square"                                 >= 1 blue square
  position       "a red circle above a green triangle"           a circle and a triangle, the circle above (any colour)
  color_attr     "a red circle below a green triangle"           >= 1 red circle and >= 1 green triangle (anywhere)

There is no "A and B" caption in the dataset, so two_object and color_attr reuse relation captions and ignore the
relation. single_object and colors share the 18 colour-shape captions (9 each); no prompt string repeats, and no two
two-object prompts name the same pair of objects.

Scoring (`score_image`): every pixel goes to its nearest palette colour (COLORS and BACKGROUND) if it lies within
COLOR_TOLERANCE of it (RGB distance), else to "other"; 4-connected components of each colour smaller than
MIN_AREA of the image are dropped as noise; each component's shape comes from its bounding box: aspect ratio
(width / height) within ASPECT_RANGE, then fill ratio (area / box area) >= 0.9 square (1.0 when drawn),
>= 0.65 circle (~0.785), >= 0.3 triangle (~0.5), else unknown. A relation compares the pixel centroids of the largest
matching components: the offset along the relation's axis must point the right way, exceed POSITION_MARGIN of the
short side and be larger than the offset across it.

Chance level (`chance_level`): the accuracy of an untrained "model" that outputs a random training image. Analytic
values under `make_scene`'s distribution (kinds 1/3 each; shapes and colours uniform; relation objects differ in
both): single_object 4/9 = 0.444, two_object 1/9 = 0.111, counting 1/108 = 0.009, colors 2/27 = 0.074,
position 1/36 = 0.028, color_attr 1/270 = 0.004 (mean 0.112). `chance_level` estimates them empirically by scoring
`n` random `make_scene` renders per tag against random prompts of that tag (fixed seed), which also exercises the
scorer on images that mostly do not match.

Ceiling (`ceiling_level`): the accuracy on the image tokenizer's reconstructions of correct renders of each prompt,
i.e. what a perfect autoregressive model could reach through that tokenizer (it separates the tokenizer's limit,
e.g. squares rounded into circles at 32x32, from the model's).

Output layout read by `score_folder` (as GenEval): <out>/<index:05d>/metadata.jsonl (the prompt's JSON dict on one
line) and <out>/<index:05d>/samples/<k:04d>.png; it writes <out>/shapes_results.jsonl.

CLI: python -m eval.shapes_bench OUT_DIR [--chance-samples N]   (score a folder, print the per-tag table)
     python -m eval.shapes_bench --write-prompts FILE [--seed S] [--per-tag N]   (the prompt set as JSON lines)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.shapes import (
    BACKGROUND,
    COLORS,
    RELATIONS,
    SHAPES,
    Scene,
    _count_layout,
    _relation_layout,
    _single_layout,
    make_scene,
    phrase,
    relation_caption,
    render,
)

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLOR_TAGS: frozenset[str] = frozenset({"counting", "colors", "color_attr"})  # tags whose colours are checked
COLOR_TOLERANCE = 60.0  # RGB distance beyond which a pixel is "other" (palette colours are >= 82 apart)
MIN_AREA = 0.01  # components below this fraction of the image are noise
ASPECT_RANGE = (0.6, 1 / 0.6)  # bounding-box width / height of a recognisable shape
POSITION_MARGIN = 0.05  # least centroid offset along a relation's axis, as a fraction of the short side
_PALETTE_NAMES: tuple[str, ...] = (*COLORS, "background")
_PALETTE = np.array([*COLORS.values(), BACKGROUND], dtype=np.float32)
_AXIS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # (0 = x, 1 = y), sign


# ---------------------------------------------------------------- prompts


def _entry(tag: str, objects: list[tuple[str, str, int]], relation: str | None = None, checked: bool = False) -> dict:
    """A prompt dict; `relation` sets the caption, `checked` also makes it part of what is scored."""
    if relation is None:
        ((color, shape, count),) = objects
        text = phrase(color, shape, count)
    else:
        text = relation_caption(objects[0][:2], relation, objects[1][:2])
    include = [{"shape": shape, "color": color, "count": count} for color, shape, count in objects]
    rel = {"subject": 0, "relation": relation, "reference": 1} if checked else None
    return {"prompt": text, "tag": tag, "include": include, "relation": rel}


def check_spec(spec: dict, where: str) -> None:
    """A one-line ValueError naming `where` unless `spec` is a prompt dict the scorer can read (`_entry`'s keys)."""
    include, rel = spec.get("include"), spec.get("relation")
    objects_ok = isinstance(include, list) and include and all(
        isinstance(o, dict) and o.get("shape") in SHAPES and o.get("color") in (None, *COLORS)
        and isinstance(o.get("count"), int) and o["count"] >= 1 for o in include
    )  # fmt: skip
    rel_ok = rel is None or (
        isinstance(rel, dict) and rel.get("relation") in RELATIONS
        and all(isinstance(rel.get(k), int) and 0 <= rel[k] < len(include or ()) for k in ("subject", "reference"))
    )  # fmt: skip
    if spec.get("tag") not in TAGS or not objects_ok or not rel_ok:
        raise ValueError(
            f"{where} is no shapes prompt: it needs a tag of {', '.join(TAGS)}, include [{{shape, color, count}}] "
            f"(shapes {', '.join(SHAPES)}) and a relation of null or {{subject, relation, reference}}"
        )


def shapes_prompts(seed: int = 0, per_tag: int = 12) -> list[dict]:
    """The benchmark prompts: `per_tag` (<= 30) per tag of TAGS (single_object and colors at most 9), in TAGS order.

    Deterministic in `seed`. Counting alternates 2 and 3; the three two-object tags cycle through the four relations
    (so layouts are balanced) and never name the same unordered pair of objects twice.
    """
    singles = [(c, s) for c in COLORS for s in SHAPES]
    if not 1 <= per_tag <= 30:  # the three two-object tags share 90 unordered pairs of objects
        raise ValueError(f"per_tag must be in [1, 30], got {per_tag}")
    n_single = min(per_tag, len(singles) // 2)
    halves: list[list[tuple[str, str]]] = [[], []]  # a checkerboard split: every shape 3 times in each half
    for ci, color in enumerate(COLORS):
        for si, shape in enumerate(SHAPES):
            halves[(ci + si + seed) % 2].append((color, shape))
    by_tag: dict[str, list[dict]] = {tag: [] for tag in TAGS}
    for tag, half, k in (("single_object", halves[0], 0), ("colors", halves[1], 1)):
        order = np.random.default_rng([seed, k]).permutation(len(half))[:n_single]
        by_tag[tag] = [_entry(tag, [(*half[i], 1)]) for i in order]
    count_orders = [np.random.default_rng([seed, 2 + n]).permutation(len(singles)) for n in range(2)]
    for j in range(per_tag):
        count = 2 + j % 2
        by_tag["counting"].append(_entry("counting", [(*singles[count_orders[j % 2][j // 2]], count)]))
    pairs = [(a, b) for a in singles for b in singles if a[0] != b[0] and a[1] != b[1]]
    pair_orders = [list(np.random.default_rng([seed, 4 + r]).permutation(len(pairs))) for r in range(len(RELATIONS))]
    used: set[frozenset[tuple[str, str]]] = set()
    for tag in ("position", "two_object", "color_attr"):
        for j in range(per_tag):
            r = j % len(RELATIONS)
            while frozenset(pairs[pair_orders[r][0]]) in used:
                pair_orders[r].pop(0)
            a, b = pairs[pair_orders[r].pop(0)]
            used.add(frozenset((a, b)))
            by_tag[tag].append(_entry(tag, [(*a, 1), (*b, 1)], list(RELATIONS)[r], checked=tag == "position"))
    prompts = [p for tag in TAGS for p in by_tag[tag]]
    return [{"index": i, **p} for i, p in enumerate(prompts)]


# ---------------------------------------------------------------- ground-truth renders


def _prompt_relation(spec: dict) -> str | None:
    """The relation a prompt's caption states (checked or not), or None for a one-object caption."""
    if spec.get("relation"):
        return spec["relation"]["relation"]
    for key, words in RELATIONS.items():
        if f" {words} " in spec["prompt"]:
            return key
    return None


def render_prompt(spec: dict, rng: np.random.Generator, size: int | tuple[int, int] = 64) -> Image.Image:
    """An image that satisfies `spec` (and its caption), laid out as `make_scene` would; size is side or (h, w).

    Handles one include (any count 0-4, in a 2x2 grid when > 1) or two includes of count 1 (placed by the
    caption's relation, or a random one); used for ground truth and, with edited specs, for wrong renders.
    """
    height, width = (size, size) if isinstance(size, int) else size
    include = spec["include"]
    pairs = [(o["color"], o["shape"]) for o in include for _ in range(o["count"])]
    if len(include) == 2:
        relation = _prompt_relation(spec) or list(RELATIONS)[int(rng.integers(len(RELATIONS)))]
        boxes = _relation_layout(rng, height, width, relation)
        if spec.get("relation") and spec["relation"]["subject"] == 1:  # subject listed second
            boxes = boxes[::-1]
    elif len(include) == 1 and len(pairs) == 1:
        boxes = _single_layout(rng, height, width)
    elif len(include) == 1 and len(pairs) <= 4:
        boxes = _count_layout(rng, height, width, len(pairs)) if pairs else []
    else:
        raise ValueError(f"cannot render include {include}: need one object (count 0-4) or two objects of count 1")
    objects = [{"shape": s, "color": c, "bbox": box} for (c, s), box in zip(pairs, boxes, strict=True)]
    return render(Scene(spec["prompt"], objects, None, "custom", (height, width)))


# ---------------------------------------------------------------- scoring


@dataclass
class Blob:
    """One detected object: a connected component of one palette colour."""

    color: str
    shape: str | None  # None when the geometry fits no shape
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    centroid: tuple[float, float]  # x, y

    def describe(self) -> str:
        return f"{self.color} {self.shape or 'blob'}"


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """float32 [H, W, 3] on the 0-255 scale from a PIL image or a uint8 / 0-255 array [H, W, 3 or 4]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an image array [H, W, 3], got shape {arr.shape}")
    return np.clip(arr[..., :3].astype(np.float32), 0, 255)


def segment(image: Image.Image | np.ndarray) -> np.ndarray:
    """[H, W] palette index (into COLORS then BACKGROUND) of every pixel, -1 where none is within COLOR_TOLERANCE."""
    rgb = _to_array(image)
    d2 = (rgb**2).sum(-1, keepdims=True) - 2 * rgb @ _PALETTE.T + (_PALETTE**2).sum(-1)  # squared distances
    labels = d2.argmin(-1)
    labels[d2.min(-1) > COLOR_TOLERANCE**2] = -1
    return labels


def _components(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(palette index, flat pixel indices) of each 4-connected component of the object colours."""
    height, width = labels.shape
    flat = labels.ravel().tolist()
    background = len(COLORS)
    seen = bytearray(height * width)
    out = []
    for start in np.flatnonzero((labels >= 0) & (labels != background)).tolist():
        if seen[start]:
            continue
        color, stack, members = flat[start], [start], []
        seen[start] = 1
        while stack:
            p = stack.pop()
            members.append(p)
            y, x = divmod(p, width)
            for q, inside in ((p - 1, x > 0), (p + 1, x < width - 1), (p - width, y > 0), (p + width, y < height - 1)):
                if inside and not seen[q] and flat[q] == color:
                    seen[q] = 1
                    stack.append(q)
        out.append((color, np.array(members)))
    return out


def classify(fill: float, aspect: float) -> str | None:
    """Shape from the bounding-box fill ratio and aspect ratio (see the module docstring), None if none fits."""
    if not ASPECT_RANGE[0] <= aspect <= ASPECT_RANGE[1]:
        return None
    if fill >= 0.9:
        return "square"
    if fill >= 0.65:
        return "circle"
    return "triangle" if fill >= 0.3 else None


def detect(image: Image.Image | np.ndarray) -> list[Blob]:
    """The objects in an image, largest first."""
    labels = segment(image)
    height, width = labels.shape
    blobs = []
    for color, pixels in _components(labels):
        if len(pixels) < MIN_AREA * height * width:
            continue
        ys, xs = np.divmod(pixels, width)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        fill, aspect = len(pixels) / ((x1 - x0) * (y1 - y0)), (x1 - x0) / (y1 - y0)
        blobs.append(
            Blob(
                _PALETTE_NAMES[color],
                classify(fill, aspect),
                len(pixels),
                (x0, y0, x1, y1),
                (float(xs.mean()), float(ys.mean())),
            )
        )
    return sorted(blobs, key=lambda b: -b.area)


def _name(shape: str, color: str | None, count: int) -> str:
    noun = shape if count == 1 else shape + "s"
    return f"{count} {color} {noun}" if color else f"{count} {noun}"


def _summary(blobs: list[Blob]) -> str:
    if not blobs:
        return "nothing"
    counts: dict[str, int] = {}
    for b in blobs:
        counts[b.describe()] = counts.get(b.describe(), 0) + 1
    return ", ".join(f"{n} {d}" for d, n in counts.items())


def _holds(subject: Blob, relation: str, reference: Blob, short_side: int) -> bool:
    axis, sign = _AXIS[relation]
    along = sign * (subject.centroid[axis] - reference.centroid[axis])
    across = abs(subject.centroid[1 - axis] - reference.centroid[1 - axis])
    return along > POSITION_MARGIN * short_side and along > across


def score_image(image: Image.Image | np.ndarray, spec: dict) -> tuple[bool, str]:
    """(correct, reason) of one image for a prompt dict of `shapes_prompts`; reason is "ok" or what was wrong."""
    rgb = _to_array(image)
    blobs, short_side = detect(rgb), min(rgb.shape[:2])
    with_color = spec["tag"] in COLOR_TAGS
    exact = spec["tag"] == "counting"
    problems, matched = [], []
    for obj in spec["include"]:
        color = obj["color"] if with_color else None
        found = [b for b in blobs if b.shape == obj["shape"] and (color is None or b.color == color)]
        matched.append(found)
        if len(found) != obj["count"] if exact else len(found) < obj["count"]:
            problems.append(f"expected {_name(obj['shape'], color, obj['count'])}, found {len(found)}")
    rel = spec.get("relation")
    if rel and not problems:
        subject, reference = matched[rel["subject"]][0], matched[rel["reference"]][0]
        if not _holds(subject, rel["relation"], reference, short_side):
            problems.append(f"{subject.describe()} is not {rel['relation']} {reference.describe()}")
    if problems:
        return False, "; ".join(problems) + f" (image has {_summary(blobs)})"
    return True, "ok"


# ---------------------------------------------------------------- folders and chance


@functools.lru_cache(maxsize=8)
def chance_level(n: int = 500, seed: int = 0, size: int = 64) -> dict[str, float]:
    """Per-tag accuracy of random `make_scene` renders scored against random prompts of the tag (module docstring)."""
    prompts = shapes_prompts(seed)
    out = {}
    for t, tag in enumerate(TAGS):
        pool = [p for p in prompts if p["tag"] == tag]
        rng = np.random.default_rng([seed, 100 + t])
        hits = 0
        for _ in range(n):
            scene = make_scene(rng, size, size)
            hits += score_image(render(scene), pool[int(rng.integers(len(pool)))])[0]
        out[tag] = hits / n
    return out


def ceiling_level(
    reconstruct: Callable[[np.ndarray], np.ndarray],
    prompts: list[dict],
    renders: int = 4,
    seed: int = 0,
    size: int = 32,
    batch: int = 64,
) -> dict[str, float]:
    """Per-tag accuracy of the image tokenizer's reconstructions of correct renders of each prompt: what a perfect
    autoregressive model could reach through that tokenizer. `reconstruct` maps uint8 [B, H, W, 3] to the same."""
    rng = np.random.default_rng([seed, 200])
    specs = [p for p in prompts for _ in range(renders)]
    truth = np.stack([np.asarray(render_prompt(p, rng, size)) for p in specs])
    recon = np.concatenate([reconstruct(truth[i : i + batch]) for i in range(0, len(truth), batch)])
    hits: dict[str, list[bool]] = {}
    for spec, image in zip(specs, recon, strict=True):
        hits.setdefault(spec["tag"], []).append(score_image(image, spec)[0])
    return {tag: float(np.mean(v)) for tag, v in hits.items()}


def scored_images(root: Path) -> Iterator[tuple[int, dict, int | str, bool, str]]:
    """(index, prompt spec, sample, correct, reason) of every image of a GenEval-layout folder, in index order."""
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        meta = folder / "metadata.jsonl"
        if not meta.is_file():
            continue
        spec = json.loads(meta.read_text().splitlines()[0])
        for png in sorted((folder / "samples").glob("*.png")):
            with Image.open(png) as image:
                correct, reason = score_image(image, spec)
            yield int(folder.name), spec, int(png.stem) if png.stem.isdigit() else png.stem, correct, reason


def score_folder(out_dir: str | os.PathLike, chance_samples: int = 500, size: int = 64) -> dict:
    """Score a GenEval-layout folder, write <out>/shapes_results.jsonl, return per-tag and overall accuracy.

    Returns {"per_tag": {tag: accuracy}, "overall": unweighted mean over the tags present, "images": count,
    "chance": {"per_tag": ..., "overall": ...}, "counts": {tag: images}}, chance from `chance_level(chance_samples)`
    on the same tags at image side `size` (an empty dict and NaN with chance_samples=0).
    """
    root = Path(out_dir)
    rows = [
        {"index": index, "sample": sample, "tag": spec["tag"], "correct": correct, "reason": reason}
        for index, spec, sample, correct, reason in scored_images(root)
    ]
    if not rows:
        raise ValueError(f"no <index>/metadata.jsonl + samples/*.png under {root}")
    with (root / "shapes_results.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tags = [t for t in TAGS if any(r["tag"] == t for r in rows)]
    tags += sorted({r["tag"] for r in rows} - set(tags))
    per_tag = {t: float(np.mean([r["correct"] for r in rows if r["tag"] == t])) for t in tags}
    chance_all = chance_level(chance_samples, size=size) if chance_samples > 0 else {}
    chance = {t: chance_all[t] for t in tags if t in chance_all}
    chance_overall = float(np.mean(list(chance.values()))) if chance else math.nan
    return {
        "per_tag": per_tag,
        "overall": float(np.mean(list(per_tag.values()))),
        "images": len(rows),
        "chance": {"per_tag": chance, "overall": chance_overall},
        "counts": {t: sum(r["tag"] == t for r in rows) for t in tags},
    }


# ---------------------------------------------------------------- CLI


def format_table(result: dict) -> str:
    """The per-tag table printed by the CLI."""
    counts = result["counts"]
    lines = [f"{'tag':<14} {'accuracy':>8} {'chance':>8} {'images':>7}"]
    chance = result["chance"]["per_tag"]
    for tag, acc in result["per_tag"].items():
        lines.append(f"{tag:<14} {acc:>8.3f} {chance.get(tag, math.nan):>8.3f} {counts[tag]:>7}")
    lines.append(f"{'overall':<14} {result['overall']:>8.3f} {result['chance']['overall']:>8.3f} {result['images']:>7}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m eval.shapes_bench", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", help="generation output: <index:05d>/metadata.jsonl + samples/<k:04d>.png")
    p.add_argument("--chance-samples", type=int, default=500, help="random renders per tag for the chance level")
    p.add_argument("--write-prompts", metavar="FILE", help="write the prompt set as JSON lines and exit")
    p.add_argument("--seed", type=int, default=0, help="prompt-set seed (with --write-prompts)")
    p.add_argument("--per-tag", type=int, default=12, help="prompts per tag (with --write-prompts)")
    args = p.parse_args(argv)
    if args.write_prompts:
        prompts = shapes_prompts(args.seed, args.per_tag)
        Path(args.write_prompts).write_text("".join(json.dumps(q) + "\n" for q in prompts))
        print(f"wrote {len(prompts)} prompts to {args.write_prompts}")
        return None
    if not args.out_dir:
        p.error("give OUT_DIR to score, or --write-prompts FILE")
    try:
        result = score_folder(args.out_dir, args.chance_samples)
    except (OSError, ValueError) as e:
        raise SystemExit(f"shapes_bench: {e}") from None
    from eval.scorers import write_summary

    write_summary(args.out_dir, "shapes", result)
    print(format_table(result))
    print(f"per-image results: {Path(args.out_dir) / 'shapes_results.jsonl'}; summary: summary.json, summary.md")
    return result


if __name__ == "__main__":
    main()
