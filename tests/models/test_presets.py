"""Sampling presets: the published settings of every released model, recognised from the checkpoint and used by
`eval.generate` by default, overridden by explicit flags; the README's table is the same table."""

import json
import re
from pathlib import Path

import pytest
import torch
from test_official_c2i_checkpoint import official_c2i_shapes

from eval.generate import parse_args, sampling_config
from eval.presets import PRESETS, recognise_c2i_checkpoint, recognise_t2i_folder
from models.c2i.io import save_c2i_checkpoint
from models.c2i.model import ClassConditionalBitDance, get_c2i_config
from models.core.sampling import SamplingConfig

REPO = Path(__file__).resolve().parents[2]

# From the official imagenet_gen/README.md sampling commands (--cfg-scale), sample_ddp*.py (--sample-steps 100,
# cfg_schedule "linear"), t2i_pipeline.py (50 steps, 7.5) and the paper (GenEval long prompts 13.0).
OFFICIAL = {
    "B-1x": (100, 3.2, "linear"),
    "B-4x": (100, 3.9, "linear"),
    "B-16x": (100, 6.1, "linear"),
    "L-1x": (100, 4.0, "linear"),
    "H-1x": (100, 4.55, "linear"),
    "14B-16x": (50, 7.5, "constant"),
    "14B-64x": (50, 7.5, "constant"),
}
SIZES = {"B": (768, 24, 6, 2), "L": (1024, 32, 8, 2), "H": (1280, 40, 12, 3)}


def test_presets_equal_the_official_settings():
    assert set(PRESETS) == set(OFFICIAL)
    for name, (steps, cfg, schedule) in OFFICIAL.items():
        s = PRESETS[name].sampling
        assert (s.steps, s.cfg_scale, s.cfg_schedule) == (steps, cfg, schedule), name
    assert PRESETS["14B-16x"].sampling_for("geneval", long_prompts=True).cfg_scale == 13.0
    assert PRESETS["14B-16x"].sampling_for("dpg").cfg_scale == 7.5


def test_readme_table_is_the_preset_table():
    text = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `(\S+)` \| (\S+) \| (\d+) \| ([\d.]+) \| (\w+) \|", text, re.M)
    assert {r[0]: (int(r[2]), float(r[3]), r[4]) for r in rows} == OFFICIAL
    assert {r[0]: r[1] for r in rows} == {n: f"`{p.release}`" for n, p in PRESETS.items()}


def shaped_checkpoint(path: Path, shapes: dict) -> Path:
    """A checkpoint file with these names and shapes at almost no size: each tensor is one stored zero expanded."""
    torch.save({"ema": {k: torch.zeros(1).expand(s) for k, s in shapes.items()}}, path)
    return path


@pytest.mark.parametrize("name", ["B-1x", "B-4x", "B-16x", "L-1x", "H-1x"])
def test_released_imagenet_layouts_are_recognised(name, tmp_path):
    size, par = name.split("-")
    dim, n_layer, depth, adaln = SIZES[size]
    shapes = official_c2i_shapes(dim, n_layer, 1000, 64, int(par[:-1]), 32, 256, depth, adaln)
    assert recognise_c2i_checkpoint(shaped_checkpoint(tmp_path / "c.pt", shapes)) == name


def test_generate_uses_the_recognised_preset_and_explicit_flags_win(tmp_path):
    shapes = official_c2i_shapes(768, 24, 1000, 64, 1, 32, 256, 6, 2)
    ckpt = str(shaped_checkpoint(tmp_path / "BitDance_B_1X.pt", shapes))
    base = ["--task", "imagenet", "--model", ckpt, "--out", "o"]
    args = parse_args(base)
    assert (args.preset, args.model_config) == ("B-1x", "B-1x")
    assert sampling_config(args) == SamplingConfig(steps=100, cfg_scale=3.2, cfg_schedule="linear")
    args = parse_args([*base, "--cfg-scale", "2.5", "--steps", "20"])
    assert sampling_config(args) == SamplingConfig(steps=20, cfg_scale=2.5, cfg_schedule="linear")


def test_unreleased_checkpoint_gets_the_defaults_or_a_named_preset(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    save_c2i_checkpoint(ckpt, ClassConditionalBitDance(get_c2i_config("tiny-1x")))
    args = parse_args(["--task", "imagenet", "--model", str(ckpt), "--out", "o"])
    assert (args.preset, args.model_config) == (None, "tiny-1x") and sampling_config(args) == SamplingConfig()
    args = parse_args(["--task", "imagenet", "--model", str(ckpt), "--out", "o", "--preset", "H-1x"])
    assert sampling_config(args) == SamplingConfig(steps=100, cfg_scale=4.55, cfg_schedule="linear")


def test_t2i_folder_is_recognised(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 5120, "num_hidden_layers": 40}))
    (tmp_path / "vision_head_config.json").write_text(json.dumps({"parallel_num": 64}))
    assert recognise_t2i_folder(tmp_path) == "14B-64x"
    args = parse_args(["--task", "geneval", "--long-prompts", "--model", str(tmp_path), "--out", "o"])
    assert args.preset == "14B-64x" and sampling_config(args) == SamplingConfig(steps=50, cfg_scale=13.0)
    args = parse_args(["--task", "dpg", "--model", str(tmp_path), "--out", "o"])
    assert sampling_config(args) == SamplingConfig(steps=50, cfg_scale=7.5)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2}))
    assert recognise_t2i_folder(tmp_path) is None


def test_preset_of_the_other_family_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--task", "dpg", "--model", str(tmp_path), "--out", "o", "--preset", "B-1x"])
    assert "--preset B-1x is a c2i model; --task dpg needs t2i" in capsys.readouterr().err.splitlines()[-1]
