"""`make demo` shortened: the same stages and code path (shapes -> tokenizer -> Ray -> torchrun training ->
sampling -> scoring -> report) with a few steps, then re-runs that reuse and redo the right stages."""

import json

import pytest
from PIL import Image

from cluster.demo import STAGES, load_demo_config, run_demo

SHORT = [
    "samples=64",
    "samples_per_shard=32",
    "tokenizer_steps=3",
    "t2i_steps=2",
    "prompts_per_tag=1",
    "images_per_prompt=1",
    "sampling.steps=2",
    "chance_samples=10",
    "grid_images=6",
]


@pytest.mark.slow
def test_short_demo_runs_end_to_end_and_reuses_stages(tmp_path, capsys):
    out = tmp_path / "demo"
    report = run_demo(load_demo_config([*SHORT, f"out={out}"]))
    text = report.read_text()
    for section in (
        "## Shapes benchmark",
        "| single_object |",
        "chance",
        "PSNR",
        "## Throughput",
        "tokens/s",
        "wandb offline run",
        "## Stage timings",
        "samples_grid.png",
        "loss_curve.png",
    ):
        assert section in text, section
    for png in ("samples_grid.png", "loss_curve.png", "tokenizer_curve.png"):
        assert Image.open(out / png).size[0] > 100
    markers = {s.name: json.loads((out / "stages" / f"{s.name}.json").read_text()) for s in STAGES}
    score = markers["score"]["result"]
    assert score["images"] == 6 and set(score["per_tag"]) == set(score["chance"]["per_tag"])
    assert markers["tokenize"]["result"]["samples"] == 64
    assert json.loads((out / "t2i" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    assert list((out / "t2i" / "wandb").glob("offline-run-*")), "the training run logs to wandb offline"
    capsys.readouterr()

    run_demo(load_demo_config([*SHORT, f"out={out}"]))  # nothing changed: every stage is reused
    printed = capsys.readouterr().out
    assert all(f"== {s.name}: reused" in printed for s in STAGES), printed

    run_demo(load_demo_config([*SHORT, f"out={out}", "t2i_steps=3"]))  # longer training: resume, resample
    printed = capsys.readouterr().out
    assert all(f"== {s}: reused" in printed for s in ("data", "tokenizer", "text", "tokenize")), printed
    assert "resumed from" in printed and "== train: done" in printed and "== score: done" in printed
    assert json.loads((out / "t2i" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_bad_demo_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="known keys"):
        load_demo_config(["t2i_stepz=3"])
    with pytest.raises(ValueError, match="does not exist"):
        load_demo_config([f"t2i_config={tmp_path / 'missing.yaml'}"])
    with pytest.raises(ValueError, match=">= 1"):
        load_demo_config(["nproc=0"])
