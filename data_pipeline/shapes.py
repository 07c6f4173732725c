"""The built-in synthetic dataset: captioned coloured-shape scenes, their deterministic webdataset shards and prompts.

Every scene is a few large, filled, axis-aligned shapes on a plain dark background, described by one caption:
  single    "a red circle"
  count     "two blue squares", "three yellow triangles"
  relation  "a red circle to the left of a green triangle" (also "to the right of", "above", "below")
All geometry is relative to the image size, so any resolution works (non-square too); sizes are (height, width).
Bounding boxes are [x0, y0, x1, y1] in pixels with x1, y1 exclusive. Sample `i` of a dataset is drawn from
`numpy.random.default_rng([seed, i])` alone, so it can be regenerated without the rest (`sample_scene`).

A colour, a shape or a colour-shape pair can be held out (`hold_out`: no object of any scene matches it; a scene that
has one is drawn again from the same generator), and a colour-shape pair made the subject of every scene (`concept`:
the fine-tuning data of a held-out concept, cluster/demo/finetune.py); both default to None, which leaves the data
unchanged.

CLI: python -m data_pipeline.shapes --out DIR --num-samples N [--size 64x64 ...] [--per-shard 256] [--seed 0]
     [--hold-out "purple" | "circle" | "red circle"] [--concept "purple circle"]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (155, 60, 210),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: dict[str, str] = {  # value for `Scene.relation` -> its words in a caption
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
KINDS: tuple[str, ...] = ("single", "count", "relation")
BENCHMARK_TAGS: tuple[str, ...] = ("single_object", "colors", "counting", "position")
BACKGROUND: tuple[int, int, int] = (16, 16, 20)
MIN_SIDE = 16
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((64, 64),)  # (height, width)
Sizes = Sequence[tuple[int, int]]


@dataclass
class Scene:
    """One captioned scene; `objects` are in caption order (for a relation: subject first, then reference)."""

    caption: str
    objects: list[dict] = field(default_factory=list)  # {"shape", "color", "bbox": [x0, y0, x1, y1]}
    relation: str | None = None  # a key of RELATIONS, for kind == "relation"
    kind: str = "single"
    size: tuple[int, int] = (64, 64)  # (height, width)

    def to_json(self) -> dict:
        """A JSON-ready dict with everything needed to check or redraw the image."""
        objects = [
            {"shape": o["shape"], "color": o["color"], "bbox": [int(v) for v in o["bbox"]]} for o in self.objects
        ]
        return {
            "caption": self.caption,
            "objects": objects,
            "relation": self.relation,
            "kind": self.kind,
            "size": [int(self.size[0]), int(self.size[1])],
            "min_object_area": self.min_object_area,
        }

    @property
    def min_object_area(self) -> float:
        """The smallest object's bounding box as a fraction of the image: a quality score (small objects lose their
        shape through a 2x tokenizer), which the loader's curated subsets (`data.subset.score`) can select on."""
        areas = [(o["bbox"][2] - o["bbox"][0]) * (o["bbox"][3] - o["bbox"][1]) for o in self.objects]
        return round(min(areas) / (self.size[0] * self.size[1]), 4) if areas else 0.0

    @classmethod
    def from_json(cls, d: dict) -> Scene:
        objects = [{"shape": o["shape"], "color": o["color"], "bbox": list(o["bbox"])} for o in d["objects"]]
        return cls(d["caption"], objects, d["relation"], d["kind"], (d["size"][0], d["size"][1]))


# ---------------------------------------------------------------- captions


def phrase(color: str, shape: str, count: int = 1) -> str:
    """E.g. "a red circle", "an orange square", "two blue squares", "three yellow triangles"."""
    article = "an" if color[0] in "aeiou" else "a"
    number = {1: article, 2: "two", 3: "three"}[count]
    return f"{number} {color} {shape if count == 1 else shape + 's'}"


def relation_caption(subject: tuple[str, str], relation: str, reference: tuple[str, str]) -> str:
    """Caption of a relation scene from (color, shape) pairs, e.g. "a red circle above a green triangle"."""
    return f"{phrase(*subject)} {RELATIONS[relation]} {phrase(*reference)}"


# ---------------------------------------------------------------- geometry


def _check_size(height: int, width: int) -> None:
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"image size {height}x{width} is too small: both sides must be at least {MIN_SIDE} px")


def _scale(height: int, width: int) -> tuple[int, int, int]:
    """(short side, border kept clear, least space between two objects), in pixels."""
    m = min(height, width)
    return m, max(1, round(0.02 * m)), max(1, round(0.05 * m))


def _side(rng: np.random.Generator, m: int, lo: float, hi: float, cap: int | None = None) -> int:
    """A side length in [lo * m, hi * m] pixels (and at most `cap`)."""
    return int(rng.integers(math.ceil(lo * m), min(math.floor(hi * m), cap or m) + 1))


def _box(x0: int, y0: int, side: int) -> list[int]:
    return [int(x0), int(y0), int(x0 + side), int(y0 + side)]


def _single_layout(rng: np.random.Generator, height: int, width: int) -> list[list[int]]:
    m, border, _ = _scale(height, width)
    s = _side(rng, m, 0.30, 0.45)
    return [_box(rng.integers(border, width - border - s + 1), rng.integers(border, height - border - s + 1), s)]


def _count_layout(rng: np.random.Generator, height: int, width: int, n: int) -> list[list[int]]:
    """`n` equal objects, each jittered inside its own cell of a 2x2 grid, so they never touch."""
    m, _, pad = _scale(height, width)
    ch, cw = height // 2, width // 2
    s = _side(rng, m, 0.25, 0.40, cap=min(ch, cw) - 2 * pad)
    boxes = []
    for cell in rng.permutation(4)[:n]:
        cy, cx = (0, ch)[cell // 2], (0, cw)[cell % 2]
        ylen, xlen = (ch, height - ch)[cell // 2], (cw, width - cw)[cell % 2]
        boxes.append(_box(cx + rng.integers(pad, xlen - pad - s + 1), cy + rng.integers(pad, ylen - pad - s + 1), s))
    return boxes


def _spread(rng: np.random.Generator, length: int, s1: int, s2: int, border: int, gap: int) -> tuple[int, int]:
    """Starts of two disjoint intervals whose centres are at least length/4 apart, the first before the second."""
    d = max(s1 + gap, math.ceil(0.25 * length + (s1 - s2) / 2))
    a = int(rng.integers(border, length - border - s2 - d + 1))
    return a, int(rng.integers(a + d, length - border - s2 + 1))


def _aligned(rng: np.random.Generator, length: int, s1: int, s2: int, border: int, m: int) -> tuple[int, int]:
    """Starts of two intervals with nearly the same centre (within a few % of the short side)."""
    a = int(rng.integers(border, length - border - s1 + 1))
    centre = a + s1 / 2 + rng.uniform(-0.05, 0.05) * m
    return a, int(np.clip(round(centre - s2 / 2), border, length - border - s2))


def _relation_layout(rng: np.random.Generator, height: int, width: int, relation: str) -> list[list[int]]:
    """Boxes [subject, reference] placed so that `relation` clearly holds between their centres."""
    m, border, gap = _scale(height, width)
    s_subj, s_ref = _side(rng, m, 0.25, 0.38), _side(rng, m, 0.25, 0.38)
    horizontal = relation in ("left of", "right of")
    subject_first = relation in ("left of", "above")
    s1, s2 = (s_subj, s_ref) if subject_first else (s_ref, s_subj)
    main1, main2 = _spread(rng, width if horizontal else height, s1, s2, border, gap)
    off1, off2 = _aligned(rng, height if horizontal else width, s1, s2, border, m)
    b1 = _box(main1, off1, s1) if horizontal else _box(off1, main1, s1)
    b2 = _box(main2, off2, s2) if horizontal else _box(off2, main2, s2)
    return [b1, b2] if subject_first else [b2, b1]


# ---------------------------------------------------------------- scenes


def _pick(rng: np.random.Generator, exclude: tuple[str, str] | None = None) -> tuple[str, str]:
    """A (color, shape); with `exclude`, both the colour and the shape differ from it."""
    colors = [c for c in COLORS if exclude is None or c != exclude[0]]
    shapes = [s for s in SHAPES if exclude is None or s != exclude[1]]
    return colors[int(rng.integers(len(colors)))], shapes[int(rng.integers(len(shapes)))]


def _objects(pairs: Iterable[tuple[str, str]], boxes: list[list[int]]) -> list[dict]:
    return [{"shape": shape, "color": color, "bbox": box} for (color, shape), box in zip(pairs, boxes, strict=True)]


Pair = tuple[str, str]  # (color, shape)


def make_scene(rng: np.random.Generator, height: int, width: int, subject: Pair | None = None) -> Scene:
    """One random scene (single object, a count of 2-3, or two objects in a spatial relation) of size height x width;
    `subject`: this (color, shape) is the (first) object."""
    _check_size(height, width)
    kind = KINDS[int(rng.integers(len(KINDS)))]
    color, shape = subject or _pick(rng)
    if kind == "single":
        objects = _objects([(color, shape)], _single_layout(rng, height, width))
        return Scene(phrase(color, shape), objects, None, kind, (height, width))
    if kind == "count":
        n = int(rng.integers(2, 4))
        objects = _objects([(color, shape)] * n, _count_layout(rng, height, width, n))
        return Scene(phrase(color, shape, n), objects, None, kind, (height, width))
    reference = _pick(rng, exclude=(color, shape))
    relation = list(RELATIONS)[int(rng.integers(len(RELATIONS)))]
    objects = _objects([(color, shape), reference], _relation_layout(rng, height, width, relation))
    return Scene(relation_caption((color, shape), relation, reference), objects, relation, kind, (height, width))


def parse_pair(text: str) -> Pair:
    """'red circle' -> ('red', 'circle'); a ValueError naming the choices otherwise."""
    parts = text.split()
    if len(parts) != 2 or parts[0] not in COLORS or parts[1] not in SHAPES:
        raise ValueError(f"{text!r} is no colour-shape pair; use '<{'|'.join(COLORS)}> <{'|'.join(SHAPES)}>'")
    return parts[0], parts[1]


HeldOut = tuple[str | None, str | None]  # (color or None, shape or None): what no object of the data may be


def parse_held_out(text: str) -> HeldOut:
    """'purple' -> ('purple', None), 'circle' -> (None, 'circle'), 'red circle' -> ('red', 'circle'); a ValueError
    naming the choices otherwise."""
    parts = text.split()
    if len(parts) == 1 and (parts[0] in COLORS or parts[0] in SHAPES):
        return (parts[0], None) if parts[0] in COLORS else (None, parts[0])
    try:
        return parse_pair(text)
    except ValueError:
        raise ValueError(f"{text!r} is no colour, shape or colour-shape pair; use <{'|'.join(COLORS)}>, "
                         f"<{'|'.join(SHAPES)}> or '<colour> <shape>'") from None  # fmt: skip


def matches(obj: dict, held: HeldOut) -> bool:
    """Whether a scene object ({"color", "shape", ...}) is what `held` names."""
    return (held[0] is None or obj["color"] == held[0]) and (held[1] is None or obj["shape"] == held[1])


def sample_scene(
    index: int,
    seed: int = 0,
    sizes: Sizes = DEFAULT_SIZES,
    hold_out: HeldOut | None = None,
    concept: Pair | None = None,
) -> Scene:
    """Sample `index` of the dataset written by `write_shapes_dataset` with the same arguments (module docstring)."""
    rng = np.random.default_rng([seed, index])
    height, width = sizes[int(rng.integers(len(sizes)))]
    scene = make_scene(rng, int(height), int(width), concept)
    while hold_out is not None and any(matches(o, hold_out) for o in scene.objects):
        scene = make_scene(rng, int(height), int(width))
    return scene


def render(scene: Scene) -> Image.Image:
    """The RGB image of a scene: flat background, each object filled with its colour (no anti-aliasing)."""
    height, width = scene.size
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj["shape"], obj["bbox"], COLORS[obj["color"]])
    return image


def _draw(draw: ImageDraw.ImageDraw, shape: str, bbox: Sequence[int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = bbox
    right, bottom = x1 - 1, y1 - 1  # PIL boxes are inclusive
    if shape == "circle":
        draw.ellipse((x0, y0, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, right, bottom), fill=fill)
    elif shape == "triangle":  # apex up, base along the bottom edge
        draw.polygon([(x0, bottom), (right, bottom), ((x0 + right) / 2, y0)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


# ---------------------------------------------------------------- shards


def png_bytes(image: Image.Image) -> bytes:
    """PNG with fixed settings and no metadata, so identical pixels give identical bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def sample_members(
    index: int,
    seed: int = 0,
    sizes: Sizes = DEFAULT_SIZES,
    hold_out: HeldOut | None = None,
    concept: Pair | None = None,
) -> list[tuple[str, bytes]]:
    """The tar members (name, payload) of one sample: `<key>.png`, `<key>.txt`, `<key>.json`."""
    scene = sample_scene(index, seed, sizes, hold_out, concept)
    key = f"shapes-{index:08d}"
    return [
        (f"{key}.png", png_bytes(render(scene))),
        (f"{key}.txt", scene.caption.encode("utf-8")),
        (f"{key}.json", json.dumps(scene.to_json(), sort_keys=True).encode("utf-8")),
    ]


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _write_tar_atomic(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """Write to a temporary name in the same directory, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name, payload in members:
                    _add_member(tar, name, payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_sizes(sizes: Sizes) -> list[tuple[int, int]]:
    if not sizes:
        raise ValueError("sizes must name at least one (height, width)")
    for h, w in sizes:
        _check_size(int(h), int(w))
    return [(int(h), int(w)) for h, w in sizes]


def write_shapes_dataset(
    out_dir: str | os.PathLike,
    num_samples: int,
    sizes: Sizes = DEFAULT_SIZES,
    samples_per_shard: int = 256,
    seed: int = 0,
    hold_out: HeldOut | None = None,
    concept: Pair | None = None,
) -> list[Path]:
    """Write `shapes-000000.tar`, ... to `out_dir`; identical arguments give byte-identical files."""
    sizes = _check_sizes(sizes)
    if num_samples < 0 or samples_per_shard < 1:
        raise ValueError(f"need num_samples >= 0 and samples_per_shard >= 1, got {num_samples}, {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, num_samples, samples_per_shard)):
        indices = range(start, min(start + samples_per_shard, num_samples))
        path = out / f"shapes-{shard:06d}.tar"
        _write_tar_atomic(path, (m for i in indices for m in sample_members(i, seed, sizes, hold_out, concept)))
        paths.append(path)
    return paths


# ---------------------------------------------------------------- benchmark prompts


def _prompt(tag: str, objects: list[tuple[str, str, int]], relation: str | None = None) -> dict:
    if relation is None:
        ((color, shape, count),) = objects
        text = phrase(color, shape, count)
    else:
        text = relation_caption(objects[0][:2], relation, objects[1][:2])
    specs = [{"shape": shape, "color": color, "count": count} for color, shape, count in objects]
    return {"prompt": text, "tag": tag, "objects": specs, "relation": relation}


def benchmark_prompts(seed: int = 0, per_kind: int = 8) -> list[dict]:
    """A fixed GenEval-style prompt set, `per_kind` prompts for each tag in BENCHMARK_TAGS, none repeated.

    Every prompt names colours, as the training captions do; the tag says what an evaluator checks:
    single_object the shape (one instance), colors also its colour, counting the number of instances of the
    coloured shape, position both objects and the relation between their centres. Counting alternates 2 and 3,
    position cycles through the four relations. single_object and colors share the 18 colour-shape pairs
    without overlap, so per_kind is at most 9.
    """
    singles = [(c, s) for c in COLORS for s in SHAPES]
    if not 1 <= per_kind <= len(singles) // 2:
        raise ValueError(f"per_kind must be in [1, {len(singles) // 2}], got {per_kind}")
    perms = [np.random.default_rng([seed, k]).permutation(len(singles)) for k in range(3)]
    pairs = [(a, b) for a in singles for b in singles if a[0] != b[0] and a[1] != b[1]]
    pair_order = np.random.default_rng([seed, 3]).permutation(len(pairs))
    prompts = [_prompt("single_object", [(*singles[i], 1)]) for i in perms[0][:per_kind]]
    prompts += [_prompt("colors", [(*singles[i], 1)]) for i in perms[0][per_kind : 2 * per_kind]]
    for j in range(per_kind):  # counting: per count, distinct colour-shape pairs
        prompts.append(_prompt("counting", [(*singles[perms[1 + j % 2][j // 2]], 2 + j % 2)]))
    for j, p in enumerate(pair_order[:per_kind]):
        (a, b), relation = pairs[p], list(RELATIONS)[j % len(RELATIONS)]
        prompts.append(_prompt("position", [(*a, 1), (*b, 1)], relation))
    return prompts


# ---------------------------------------------------------------- CLI


def parse_size(text: str) -> tuple[int, int]:
    """ "64x128" -> (64, 128) as (height, width); a one-line SystemExit for anything else or sides below MIN_SIDE."""
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip(), flags=re.ASCII)
    if match is None:
        raise SystemExit(f"--size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 64x64 or 64x128")
    height, width = int(match[1]), int(match[2])
    if min(height, width) < MIN_SIDE:
        raise SystemExit(f"--size {text!r}: both sides must be at least {MIN_SIDE} px")
    return height, width


def main(argv: Sequence[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.shapes", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output directory for shapes-*.tar")
    p.add_argument("--num-samples", required=True, type=int)
    p.add_argument("--size", action="append", default=None, help="HEIGHTxWIDTH, repeatable (default 64x64)")
    p.add_argument("--per-shard", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hold-out", help="a colour, shape or colour-shape pair no object is, e.g. 'purple', 'red circle'")
    p.add_argument("--concept", help="a colour-shape pair every scene has as its (first) object")
    args = p.parse_args(argv)
    try:
        hold_out = parse_held_out(args.hold_out) if args.hold_out else None
        concept = parse_pair(args.concept) if args.concept else None
    except ValueError as err:
        raise SystemExit(f"--hold-out/--concept: {err}") from None
    if hold_out and concept and matches({"color": concept[0], "shape": concept[1]}, hold_out):
        raise SystemExit(f"--concept {args.concept!r} is held out by --hold-out {args.hold_out!r}; drop one of them")
    sizes = [parse_size(s) for s in args.size or ["64x64"]]
    if args.num_samples < 0 or args.per_shard < 1 or args.seed < 0:
        raise SystemExit("--num-samples and --seed must be >= 0 and --per-shard >= 1")
    paths = write_shapes_dataset(args.out, args.num_samples, sizes, args.per_shard, args.seed, hold_out, concept)
    for path in paths:
        print(f"wrote {path}")
    size_text = ", ".join(f"{h}x{w}" for h, w in sizes)
    print(f"{args.num_samples} samples in {len(paths)} shards under {args.out} (sizes {size_text}, seed {args.seed})")
    return paths


if __name__ == "__main__":
    main()
