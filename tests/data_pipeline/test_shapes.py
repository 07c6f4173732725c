"""The synthetic shapes dataset: deterministic shards, captions that match the pixels, readable by webdataset."""

import io
import json
import subprocess
import sys
import tarfile
from itertools import combinations

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipeline.shapes import (
    BACKGROUND,
    BENCHMARK_TAGS,
    COLORS,
    RELATIONS,
    SHAPES,
    Scene,
    benchmark_prompts,
    main,
    make_scene,
    parse_size,
    render,
    sample_members,
    sample_scene,
    write_shapes_dataset,
)

SIZES = [(16, 16), (17, 23), (64, 64), (64, 128), (128, 64), (96, 40)]
WORDS = {1: "a", 2: "two", 3: "three"}


def scenes(n_per_size=60):
    for h, w in SIZES:
        for i in range(n_per_size):
            yield make_scene(np.random.default_rng([7, h, w, i]), h, w)


def centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def tar_members(path):
    with tarfile.open(path) as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar]


def test_constants():
    assert set(SHAPES) == {"circle", "square", "triangle"}
    assert set(COLORS) == {"red", "green", "blue", "yellow", "purple", "orange"}
    rgb = np.array(list(COLORS.values()) + [BACKGROUND], dtype=int)
    dists = [np.abs(a - b).sum() for a, b in combinations(rgb, 2)]
    assert min(dists) >= 80  # distinct, and far from the background


def test_all_kinds_and_json_round_trip():
    seen = [make_scene(np.random.default_rng(i), 64, 64) for i in range(60)]
    assert {s.kind for s in seen} == {"single", "count", "relation"}
    assert {s.relation for s in seen if s.kind == "relation"} == set(RELATIONS)
    for s in seen:
        d = s.to_json()
        assert json.loads(json.dumps(d)) == d
        assert Scene.from_json(d) == s
        assert set(d) == {"caption", "objects", "relation", "kind", "size", "min_object_area"} and d["size"] == [64, 64]
        areas = [(o["bbox"][2] - o["bbox"][0]) * (o["bbox"][3] - o["bbox"][1]) / 64**2 for o in d["objects"]]
        assert d["min_object_area"] == pytest.approx(min(areas), abs=1e-4)


def test_caption_matches_objects():
    for s in scenes(30):
        words = s.caption.split()
        for obj in s.objects:
            assert obj["color"] in words and (obj["shape"] in words or obj["shape"] + "s" in words), s
        if s.kind == "relation":
            a, b = s.objects
            assert s.relation in RELATIONS and (a["color"], a["shape"]) != (b["color"], b["shape"])
            assert s.caption.startswith(f"a {a['color']} {a['shape']}") or s.caption.startswith(f"an {a['color']}")
            assert f" {RELATIONS[s.relation]} " in s.caption and s.caption.endswith(f"{b['color']} {b['shape']}")
        else:
            assert s.relation is None and len({(o["color"], o["shape"]) for o in s.objects}) == 1
            assert words[0] in {"a", "an"} if len(s.objects) == 1 else words[0] == WORDS[len(s.objects)]
            assert (s.kind == "single") == (len(s.objects) == 1) and len(s.objects) <= 3


def test_geometry():
    for s in scenes():
        h, w = s.size
        m = min(h, w)
        for obj in s.objects:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, s
            assert x1 - x0 == y1 - y0 and 0.25 * m <= x1 - x0 <= 0.45 * m, s  # square box, large object
        for a, b in combinations([o["bbox"] for o in s.objects], 2):
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], f"objects touch in {s}"
        if s.kind == "relation":
            (ax, ay), (bx, by) = centre(s.objects[0]["bbox"]), centre(s.objects[1]["bbox"])
            gaps = {
                "left of": (bx - ax, ay - by, w),
                "right of": (ax - bx, ay - by, w),
                "above": (by - ay, ax - bx, h),
                "below": (ay - by, ax - bx, h),
            }
            main_gap, off_gap, side = gaps[s.relation]
            assert main_gap >= 0.25 * side, s  # unambiguous: far apart along the relation's axis ...
            assert abs(off_gap) < main_gap, s  # ... and closer along the other one


def test_render_pixels():
    for s in scenes(25):
        img = render(s)
        assert img.mode == "RGB" and img.size == (s.size[1], s.size[0])
        px = np.asarray(img).astype(int)
        covered = np.zeros(px.shape[:2], dtype=bool)
        for obj in s.objects:
            x0, y0, x1, y1 = obj["bbox"]
            rgb = COLORS[obj["color"]]
            assert tuple(px[(y0 + y1) // 2, (x0 + x1) // 2]) == rgb, s
            fill = (px[y0:y1, x0:x1] == rgb).all(-1).mean()
            assert fill >= 0.4, (s, fill)  # a filled shape (the triangle covers about half its box)
            covered[y0:y1, x0:x1] = True
        assert (px[~covered] == BACKGROUND).all(), s
        assert set(map(tuple, px[covered].reshape(-1, 3))) <= {BACKGROUND, *(COLORS[o["color"]] for o in s.objects)}


def test_deterministic_bytes_and_single_sample_regeneration(tmp_path):
    kw = dict(num_samples=11, sizes=((32, 32), (32, 48)), samples_per_shard=4, seed=3)
    a, b = write_shapes_dataset(tmp_path / "a", **kw), write_shapes_dataset(tmp_path / "b", **kw)
    assert [p.name for p in a] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [p.name for p in a]  # no temp files left
    members = tar_members(a[1])
    assert [n for n, _ in members][:3] == ["shapes-00000004.png", "shapes-00000004.txt", "shapes-00000004.json"]
    assert members[3:6] == sample_members(5, seed=3, sizes=((32, 32), (32, 48)))
    with tarfile.open(a[0]) as tar:
        assert all(i.mtime == 0 and i.uid == 0 and i.gid == 0 and i.mode == 0o644 for i in tar)
    other = write_shapes_dataset(tmp_path / "c", **{**kw, "seed": 4})
    assert other[0].read_bytes() != a[0].read_bytes()


def test_multiple_sizes_members_consistent(tmp_path):
    sizes = ((32, 32), (32, 64), (48, 24))
    (path,) = write_shapes_dataset(tmp_path, 24, sizes=sizes, samples_per_shard=64)
    members = dict(tar_members(path))
    used = set()
    for i in range(24):
        key = f"shapes-{i:08d}"
        meta = json.loads(members[f"{key}.json"])
        img = Image.open(io.BytesIO(members[f"{key}.png"]))
        assert img.mode == "RGB" and (img.height, img.width) == tuple(meta["size"])
        assert members[f"{key}.txt"].decode("utf-8") == meta["caption"]
        assert Scene.from_json(meta) == sample_scene(i, 0, sizes)
        used.add(tuple(meta["size"]))
    assert used == set(sizes)


def test_webdataset_reads_every_sample(tmp_path):
    paths = write_shapes_dataset(tmp_path, 10, samples_per_shard=4)
    ds = wds.WebDataset([str(p) for p in paths], shardshuffle=False)
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [f"shapes-{i:08d}" for i in range(10)]
    for s in samples:
        meta = json.loads(s["json"])
        assert s["txt"].decode("utf-8") == meta["caption"]
        assert Image.open(io.BytesIO(s["png"])).size == (64, 64)


def test_benchmark_prompts():
    prompts = benchmark_prompts()
    assert prompts == benchmark_prompts(seed=0) and prompts != benchmark_prompts(seed=1)
    assert len({p["prompt"] for p in prompts}) == len(prompts) == 4 * 8
    assert {p["tag"] for p in prompts} == set(BENCHMARK_TAGS)
    for p in prompts:
        assert set(p) == {"prompt", "tag", "objects", "relation"}
        for o in p["objects"]:
            assert o["color"] in p["prompt"] and o["shape"] in p["prompt"] and o["count"] in (1, 2, 3)
        if p["tag"] == "position":
            assert p["relation"] in RELATIONS and RELATIONS[p["relation"]] in p["prompt"] and len(p["objects"]) == 2
        else:
            assert p["relation"] is None and len(p["objects"]) == 1
            assert (p["objects"][0]["count"] > 1) == (p["tag"] == "counting")
    position = [p["relation"] for p in prompts if p["tag"] == "position"]
    assert sorted(set(position)) == sorted(RELATIONS)
    assert len({p["prompt"] for p in benchmark_prompts(per_kind=9)}) == 36
    with pytest.raises(ValueError, match="per_kind"):
        benchmark_prompts(per_kind=10)


def test_cli(tmp_path, capsys):
    paths = main(["--out", str(tmp_path), "--num-samples", "5", "--per-shard", "2", "--size", "32x48"])
    out = capsys.readouterr().out
    assert len(paths) == 3 and all(str(p) in out for p in paths) and "5 samples in 3 shards" in out
    assert json.loads(tar_members(paths[0])[2][1])["size"] == [32, 48]
    assert parse_size("64x128") == (64, 128)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("64", "expected HEIGHTxWIDTH"),
        ("64x", "expected HEIGHTxWIDTH"),
        ("axb", "expected HEIGHTxWIDTH"),
        ("64x64x3", "expected HEIGHTxWIDTH"),
        ("8x64", "at least 16 px"),
        ("64x15", "at least 16 px"),
    ],
)
def test_cli_bad_size(tmp_path, size, message):
    with pytest.raises(SystemExit, match=message) as exc:
        main(["--out", str(tmp_path), "--num-samples", "1", "--size", size])
    assert "\n" not in str(exc.value.code)
    assert not list(tmp_path.iterdir())


def test_module_entry_point_one_line_error(tmp_path):
    args = ["--out", str(tmp_path), "--num-samples", "1", "--size", "64by64"]
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.shapes", *args], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["--size '64by64': expected HEIGHTxWIDTH in pixels, e.g. 64x64 or 64x128"]


def test_too_small_scene_rejected():
    with pytest.raises(ValueError, match="at least 16 px"):
        make_scene(np.random.default_rng(0), 15, 64)


def test_hold_out_a_colour_a_shape_or_a_pair_and_a_concept_it_holds_out_is_refused():
    from data_pipeline.shapes import matches, parse_held_out

    for text, held in (("purple", ("purple", None)), ("circle", (None, "circle")), ("red circle", ("red", "circle"))):
        assert parse_held_out(text) == held
        objects = [o for i in range(300) for o in sample_scene(i, 0, ((32, 32),), held).objects]
        assert not any(matches(o, held) for o in objects)
        gone_color = {held[0]} if held[1] is None else set()  # only what it names is gone
        gone_shape = {held[1]} if held[0] is None else set()
        assert {o["color"] for o in objects} == set(COLORS) - gone_color
        assert {o["shape"] for o in objects} == set(SHAPES) - gone_shape
    with pytest.raises(ValueError, match="'star' is no colour, shape or colour-shape pair"):
        parse_held_out("star")
    with pytest.raises(SystemExit, match="--concept 'purple circle' is held out by --hold-out 'purple'"):
        main(["--out", "x", "--num-samples", "1", "--hold-out", "purple", "--concept", "purple circle"])
