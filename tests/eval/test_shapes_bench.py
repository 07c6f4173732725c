"""The shapes benchmark: prompt set, scorer accuracy on true and corrupted renders, noise, folders, chance, CLI."""

import copy
import json
import math
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from data_pipeline.shapes import COLORS, RELATIONS, SHAPES, phrase, relation_caption
from eval.shapes_bench import (
    COLOR_TAGS,
    TAGS,
    chance_level,
    main,
    render_prompt,
    score_folder,
    score_image,
    shapes_prompts,
)

SEEDS = range(5)
PROMPTS = shapes_prompts()
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PERPENDICULAR = {"left of": "above", "right of": "below", "above": "right of", "below": "left of"}


def _accuracy(make_image, tags=TAGS, expect=True) -> dict[str, float]:
    """Per tag, the fraction of (seed, prompt) renders whose score equals `expect`; make_image -> image or None."""
    hits, totals = defaultdict(int), defaultdict(int)
    for seed in SEEDS:
        rng = np.random.default_rng([seed, 7])
        for spec in PROMPTS:
            if spec["tag"] not in tags:
                continue
            image = make_image(spec, rng)
            hits[spec["tag"]] += score_image(image, spec)[0] == expect
            totals[spec["tag"]] += 1
    assert set(totals) == set(tags)
    return {tag: hits[tag] / totals[tag] for tag in tags}


def _other(rng: np.random.Generator, options, current):
    choices = [o for o in options if o != current]
    return choices[int(rng.integers(len(choices)))]


def _with(spec: dict, **changes) -> dict:
    out = copy.deepcopy(spec)
    out.update(changes)
    return out


# ---------------------------------------------------------------- prompts


def test_prompt_set_is_unique_deterministic_and_in_caption_language():
    assert PROMPTS == shapes_prompts(seed=0) and PROMPTS != shapes_prompts(seed=1)
    assert [p["index"] for p in PROMPTS] == list(range(len(PROMPTS)))
    assert len({p["prompt"] for p in PROMPTS}) == len(PROMPTS)
    counts = {tag: sum(p["tag"] == tag for p in PROMPTS) for tag in TAGS}
    assert counts == {
        "single_object": 9,
        "two_object": 12,
        "counting": 12,
        "colors": 9,
        "position": 12,
        "color_attr": 12,
    }
    pairs = set()
    for p in PROMPTS:
        inc = p["include"]
        if len(inc) == 1:
            assert p["prompt"] == phrase(inc[0]["color"], inc[0]["shape"], inc[0]["count"])
            assert p["relation"] is None and (inc[0]["count"] in (2, 3)) == (p["tag"] == "counting")
        else:
            a, b = (inc[0]["color"], inc[0]["shape"]), (inc[1]["color"], inc[1]["shape"])
            assert a[0] != b[0] and a[1] != b[1]  # as in the training relation captions
            assert any(p["prompt"] == relation_caption(a, r, b) for r in RELATIONS)
            assert frozenset((a, b)) not in pairs
            pairs.add(frozenset((a, b)))
            if p["tag"] == "position":
                assert p["relation"]["subject"] == 0 and p["relation"]["reference"] == 1
                assert p["prompt"] == relation_caption(a, p["relation"]["relation"], b)
            else:
                assert p["relation"] is None
    positions = [p["relation"]["relation"] for p in PROMPTS if p["tag"] == "position"]
    assert sorted(set(positions)) == sorted(RELATIONS) and len(positions) == 12
    assert [p["include"][0]["count"] for p in PROMPTS if p["tag"] == "counting"] == [2, 3] * 6
    colors_seen = {p["include"][0]["color"] for p in PROMPTS if p["tag"] == "colors"}
    assert colors_seen == set(COLORS)
    assert len(shapes_prompts(per_tag=3)) == 18 and len(shapes_prompts(per_tag=30)) == 9 + 9 + 4 * 30
    with pytest.raises(ValueError):
        shapes_prompts(per_tag=31)


# ---------------------------------------------------------------- scorer on ground truth and corruptions


def test_ground_truth_renders_are_scored_correct():
    acc = _accuracy(render_prompt)
    assert all(a >= 0.99 for a in acc.values()), acc


def test_ground_truth_other_sizes_and_array_input():
    rng = np.random.default_rng(3)
    for spec in PROMPTS:
        for size in ((64, 96), (96, 64), 128):
            image = render_prompt(spec, rng, size)
            assert score_image(np.asarray(image), spec) == (True, "ok"), (spec["prompt"], size)


def test_noisy_ground_truth_is_scored_correct():
    def noisy(spec, rng):
        arr = np.asarray(render_prompt(spec, rng), dtype=np.float64)
        return np.clip(np.rint(arr + rng.normal(0, 8, arr.shape)), 0, 255).astype(np.uint8)

    acc = _accuracy(noisy)
    assert all(a >= 0.97 for a in acc.values()), acc


def test_rejects_wrong_colour():
    def wrong_colour(spec, rng):
        include = copy.deepcopy(spec["include"])
        j = int(rng.integers(len(include)))
        include[j]["color"] = _other(rng, COLORS, include[j]["color"])
        return render_prompt(_with(spec, include=include), rng)

    def swapped_colours(spec, rng):  # binding: each colour on the other shape
        include = copy.deepcopy(spec["include"])
        include[0]["color"], include[1]["color"] = include[1]["color"], include[0]["color"]
        return render_prompt(_with(spec, include=include), rng)

    acc = _accuracy(wrong_colour, tags=tuple(COLOR_TAGS), expect=False)
    assert all(a >= 0.99 for a in acc.values()), acc
    assert _accuracy(swapped_colours, tags=("color_attr",), expect=False)["color_attr"] >= 0.99


def test_rejects_wrong_count_and_missing_objects():
    def wrong_count(spec, rng):
        include = copy.deepcopy(spec["include"])
        if spec["tag"] == "counting":
            include[0]["count"] += int(rng.choice([-1, 1]))
        elif len(include) == 1:
            include[0]["count"] = 0
        else:
            del include[int(rng.integers(2))]
        return render_prompt(_with(spec, include=include, relation=None, prompt=""), rng)

    acc = _accuracy(wrong_count, expect=False)
    assert all(a >= 0.99 for a in acc.values()), acc


def test_rejects_wrong_shape():
    def wrong_shape(spec, rng):
        include = copy.deepcopy(spec["include"])
        j = int(rng.integers(len(include)))
        include[j]["shape"] = _other(rng, SHAPES, include[j]["shape"])
        return render_prompt(_with(spec, include=include), rng)

    acc = _accuracy(wrong_shape, expect=False)
    assert all(a >= 0.99 for a in acc.values()), acc


@pytest.mark.parametrize("swap", [OPPOSITE, PERPENDICULAR], ids=["opposite", "perpendicular"])
def test_rejects_wrong_position(swap):
    def wrong_position(spec, rng):
        relation = dict(spec["relation"], relation=swap[spec["relation"]["relation"]])
        return render_prompt(_with(spec, relation=relation), rng)

    assert _accuracy(wrong_position, tags=("position",), expect=False)["position"] >= 0.99


def test_unchecked_attributes_are_ignored_and_reasons_name_the_error():
    rng = np.random.default_rng(0)
    single = next(p for p in PROMPTS if p["tag"] == "single_object")
    recoloured = [dict(single["include"][0], color=_other(rng, COLORS, single["include"][0]["color"]))]
    assert score_image(render_prompt(_with(single, include=recoloured), rng), single) == (True, "ok")
    position = next(p for p in PROMPTS if p["tag"] == "position")
    swapped = copy.deepcopy(position["include"])
    swapped[0]["color"], swapped[1]["color"] = swapped[1]["color"], swapped[0]["color"]
    assert score_image(render_prompt(_with(position, include=swapped), rng), position)[0]

    three = {
        "prompt": "three red circles",
        "tag": "counting",
        "relation": None,
        "include": [{"shape": "circle", "color": "red", "count": 3}],
    }
    two = _with(three, include=[{"shape": "circle", "color": "red", "count": 2}])
    ok, reason = score_image(render_prompt(two, rng), three)
    assert not ok and reason.startswith("expected 3 red circles, found 2"), reason
    objects = [{"shape": "square", "color": "blue", "count": 1}, {"shape": "circle", "color": "red", "count": 1}]
    spec = {
        "prompt": "a blue square to the left of a red circle",
        "tag": "position",
        "include": objects,
        "relation": {"subject": 0, "relation": "left of", "reference": 1},
    }
    flipped = _with(spec, relation=dict(spec["relation"], relation="right of"))
    ok, reason = score_image(render_prompt(flipped, rng), spec)
    assert not ok and reason.startswith("blue square is not left of red circle"), reason
    blank = Image.new("RGB", (64, 64), (16, 16, 20))
    assert score_image(blank, spec)[1].startswith("expected 1 square, found 0; expected 1 circle, found 0")


# ---------------------------------------------------------------- chance, folders, CLI


def test_chance_level_matches_the_analytic_values():
    analytic = {
        "single_object": 4 / 9,
        "two_object": 1 / 9,
        "counting": 1 / 108,
        "colors": 2 / 27,
        "position": 1 / 36,
        "color_attr": 1 / 270,
    }
    n = 300
    chance = chance_level(n)
    assert chance == chance_level(n)
    for tag, p in analytic.items():
        assert abs(chance[tag] - p) <= 4 * math.sqrt(p * (1 - p) / n) + 0.01, (tag, chance[tag], p)


def _write_layout(root, plan: dict[int, list[bool]]) -> None:
    """For PROMPTS[index], samples that are right (True) or have a wrong shape (False)."""
    rng = np.random.default_rng(0)
    for index, outcomes in plan.items():
        spec = PROMPTS[index]
        folder = root / f"{index:05d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps(spec) + "\n")
        for k, right in enumerate(outcomes):
            include = copy.deepcopy(spec["include"])
            if not right:
                include[0]["shape"] = _other(rng, SHAPES, include[0]["shape"])
            render_prompt(_with(spec, include=include), rng).save(folder / "samples" / f"{k:04d}.png")


def test_score_folder(tmp_path):
    first = {tag: next(p["index"] for p in PROMPTS if p["tag"] == tag) for tag in TAGS}
    plan = {
        first["single_object"]: [True] * 4,
        first["counting"]: [True, False, True, False],
        first["position"]: [False] * 4,
        first["position"] + 1: [True] * 4,
    }
    _write_layout(tmp_path, plan)
    (tmp_path / "notes").mkdir()  # ignored: not an index folder
    result = score_folder(tmp_path, chance_samples=0)
    assert result["per_tag"] == {"single_object": 1.0, "counting": 0.5, "position": 0.5}
    assert result["overall"] == pytest.approx(2 / 3) and result["images"] == 16
    assert result["counts"] == {"single_object": 4, "counting": 4, "position": 8}
    assert result["chance"]["per_tag"] == {} and math.isnan(result["chance"]["overall"])
    rows = [json.loads(line) for line in (tmp_path / "shapes_results.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and set(rows[0]) == {"index", "sample", "tag", "correct", "reason"}
    assert [(r["index"], r["sample"]) for r in rows[:4]] == [(first["single_object"], k) for k in range(4)]
    assert [r["correct"] for r in rows if r["tag"] == "counting"] == [True, False, True, False]
    assert all((r["reason"] == "ok") == r["correct"] for r in rows)
    with pytest.raises(ValueError, match="no <index>"):
        score_folder(tmp_path / "notes", chance_samples=0)


def test_cli(tmp_path, capsys):
    prompts_file = tmp_path / "prompts.jsonl"
    main(["--write-prompts", str(prompts_file)])
    assert [json.loads(line) for line in prompts_file.read_text().splitlines()] == PROMPTS
    _write_layout(tmp_path / "out", {0: [True, False]})
    result = main([str(tmp_path / "out"), "--chance-samples", "20"])
    table = capsys.readouterr().out
    assert result["per_tag"] == {"single_object": 0.5} and 0 <= result["chance"]["overall"] <= 1
    assert "single_object" in table and "0.500" in table and "overall" in table
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])


def test_ceiling_is_one_for_perfect_reconstructions_and_falls_with_blur():
    """The ceiling scores reconstructions of correct renders: an identity "tokenizer" reaches 1.0 on every tag, a
    blurring one loses the small shapes (the 2x tokenizer's failure the ceiling column shows)."""
    from PIL import ImageFilter

    from eval.shapes_bench import ceiling_level

    prompts = shapes_prompts(0, 4)
    perfect = ceiling_level(lambda x: x, prompts, renders=2, size=32)
    assert perfect == {tag: 1.0 for tag in TAGS}

    def blur(images):
        return np.stack([np.asarray(Image.fromarray(i).filter(ImageFilter.GaussianBlur(1.2))) for i in images])

    blurred = ceiling_level(blur, prompts, renders=2, size=32)
    assert set(blurred) == set(TAGS) and np.mean(list(blurred.values())) < 0.9


def test_scores_over_seeds_are_their_mean_and_spread_and_make_the_report_table(tmp_path, capsys):
    from eval.shapes_seeds import benchmark_section, score_seeds
    from models.core.sampling import SamplingConfig

    first = {tag: next(p["index"] for p in PROMPTS if p["tag"] == tag) for tag in ("single_object", "counting")}
    _write_layout(tmp_path / "seed_0", {first["single_object"]: [True, True], first["counting"]: [True, False]})
    _write_layout(tmp_path / "seed_1", {first["single_object"]: [True, False], first["counting"]: [False, False]})
    result = score_seeds(tmp_path, seeds=2, chance_samples=20, size=64)
    assert result["per_tag"] == {"single_object": 0.75, "counting": 0.25}
    assert result["sd"] == {"single_object": 0.25, "counting": 0.25}
    assert result["per_seed"] == [0.75, 0.25] and result["overall"] == 0.5 and result["overall_sd"] == 0.25
    assert result["images"] == 8 and result["counts"] == {"single_object": 4, "counting": 4}
    assert json.loads((tmp_path / "seed_1" / "summary.json").read_text())["shapes"]["overall"] == 0.25
    assert "seed_0:" in capsys.readouterr().out

    result["ceiling"] = {"per_tag": {"single_object": 1.0, "counting": 0.5}, "overall": 0.75}
    table = "\n".join(benchmark_section(result, 2, SamplingConfig(steps=20, cfg_scale=2.0)))
    assert "**0.500 ± 0.250**" in table and "2 per prompt per seed, 20 head steps, CFG 2.0" in table
    assert "| single_object | 0.750 ± 0.250 |" in table and "| 0.750 | >= 0.375 | yes | 8 |" in table
