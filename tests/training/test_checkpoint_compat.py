"""Code from before a refactor, extracted from this repository's git history, against today's: a training checkpoint
and an exported official folder written before the one-house refactor (4571667) still load (the run resumes exactly
where it stopped, the export loads strictly with the EMA weights the old run saved), and since the registries refactor
(main 6008d01) training from scratch gives the same losses and checkpoint tensors bit for bit and sampling the same
images byte for byte."""

import os
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
import torch
from helpers.data import make_c2i_data, make_t2i_data
from helpers.train_runs import losses
from safetensors.torch import load_file

from models.t2i.io import load_t2i_folder

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PINNED = "4571667"  # main before the refactor: training/tokenizer_trainer.py, models/*.py flat


BEFORE_REGISTRIES = "6008d01"  # main before the registries refactor (string-switched families, engines, benchmarks)


def old_tree(dst: Path, commit: str = PINNED) -> Path:
    try:
        blob = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        pytest.fail(f"commit {commit} is not in this checkout's history ({err}); fetch the full history")
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(dst, filter="data")
    return dst


def train(
    code: Path, run_dir: Path, data: dict, steps: int, *extra: str, kind: str = "t2i"
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "training.train",
        "--config",
        str(REPO / "training" / "configs" / f"tiny_{kind}.yaml"),
        f"run_dir={run_dir}",
        f"data.data_dir={data['tokens'] if kind == 't2i' else data[kind]}",
        f"schedule.total_steps={steps}",
        "schedule.warmup_steps=1",
        "checkpoint.every=2",
        "logging.every=1",
        "logging.wandb=disabled",
        f"model.image_tokenizer={data['ae'] / 'ae_tiny.safetensors'}",
        f"model.text_tokenizer={data['text']}",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_old_checkpoint_resumes_exactly_and_old_export_loads(tmp_path):
    data = make_t2i_data(tmp_path / "data")
    old = old_tree(tmp_path / "old")
    # the old code: 4 uninterrupted steps, checkpoints at 2 and 4, export of the EMA weights at the end
    train(old, tmp_path / "old_run", data, 4)
    ckpt = tmp_path / "old_run" / "checkpoints" / "step_00000002"
    # today's code resumes the old step-2 checkpoint and must reproduce the old steps 3 and 4 bit for bit
    proc = train(REPO, tmp_path / "new_run", data, 4, f"checkpoint.resume={ckpt}", "checkpoint.export_official=false")
    assert f"resumed from {ckpt} at step 2" in proc.stdout
    before, after = losses(tmp_path / "old_run"), losses(tmp_path / "new_run")
    assert sorted(after) == [3, 4] and [after[3], after[4]] == [before[3], before[4]]
    # the old export loads strictly and holds the EMA weights of the old run's last checkpoint
    model, text, ae = load_t2i_folder(tmp_path / "old_run" / "export")
    ema = load_file(str(tmp_path / "old_run" / "checkpoints" / "step_00000004" / "ema.safetensors"))
    state = model.state_dict()
    assert ema.keys() <= state.keys()
    for k, v in ema.items():
        torch.testing.assert_close(state[k].float(), v, rtol=0, atol=0, msg=k)


def generate(code: Path, folder: Path, out: Path) -> dict[str, bytes]:
    cmd = [sys.executable, "-m", "eval.generate", "--task", "prompts", "--model", str(folder), "--out", str(out)]
    cmd += ["--prompt", "a red circle", "--prompt", "two blue squares", "--height", "32", "--width", "32"]
    cmd += ["--steps", "3", "--images-per-prompt", "2", "--batch-size", "3", "--image-size", "32x32"]
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def test_training_and_sampling_reproduce_main_before_the_registries_bit_for_bit(tmp_path):
    data = make_t2i_data(tmp_path / "data")
    old = old_tree(tmp_path / "old", BEFORE_REGISTRIES)
    train(old, tmp_path / "old_run", data, 4)
    train(REPO, tmp_path / "new_run", data, 4)
    before, after = losses(tmp_path / "old_run"), losses(tmp_path / "new_run")
    assert sorted(after) == [1, 2, 3, 4] and after == before
    for step in ("step_00000002", "step_00000004"):
        for name in ("model.safetensors", "ema.safetensors"):
            a = load_file(str(tmp_path / "old_run" / "checkpoints" / step / name))
            b = load_file(str(tmp_path / "new_run" / "checkpoints" / step / name))
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{step}/{name}: {k}")
    # the same exported folder sampled by both codes: the same PNG files, byte for byte
    old_images = generate(old, tmp_path / "old_run" / "export", tmp_path / "old_samples")
    new_images = generate(REPO, tmp_path / "old_run" / "export", tmp_path / "new_samples")
    assert len(new_images) == 4 and new_images == old_images
    # the class-conditional family through the other loader kind: the same losses
    data["c2i"] = make_c2i_data(tmp_path / "c2i", data["ae"])
    for code, name in ((old, "old_c2i"), (REPO, "new_c2i")):
        train(code, tmp_path / name, data, 3, "checkpoint.export_official=false", kind="c2i")
    assert losses(tmp_path / "new_c2i") == losses(tmp_path / "old_c2i")
