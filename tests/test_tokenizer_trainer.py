"""The tokenizer trainer improves held-out PSNR on shapes within a short CPU run; GAN and LPIPS parts work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.shapes import write_shapes_dataset
from training.perceptual import LPIPS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tokenizer_trainer_improves_psnr_and_runs_the_gan(tmp_path):
    write_shapes_dataset(tmp_path / "raw", 240, sizes=((32, 32),), samples_per_shard=60)
    lpips_file = tmp_path / "lpips.pt"
    torch.manual_seed(0)
    torch.save(LPIPS().state_dict(), lpips_file)
    cmd = [
        sys.executable,
        "-m",
        "training.tokenizer_trainer",
        "--config",
        "training/configs/tiny_tokenizer.yaml",
        f"run_dir={tmp_path / 'run'}",
        f"data.data_dir={tmp_path / 'raw'}",
        "logging.wandb=disabled",
        "schedule.total_steps=40",
        "model.disc_start=30",
        f"model.lpips_weights={lpips_file}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/psnr" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["eval/psnr"] > evals[0]["eval/psnr"] + 5.0, evals
    assert evals[-1]["eval/ssim"] > evals[0]["eval/ssim"]
    assert any("loss/disc" in r for r in rows if r["step"] > 30) and not any("loss/disc" in r for r in rows[:3])
    assert (tmp_path / "run" / "export" / "ae_tiny.safetensors").is_file()
    assert "held-out PSNR" in proc.stdout


def test_lpips_is_zero_for_identical_images_and_loads_strictly(tmp_path):
    torch.manual_seed(0)
    model = LPIPS()
    for k in range(5):  # LPIPS heads are non-negative weights
        getattr(model, f"lin{k}").model[1].weight.data.abs_()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded = LPIPS.from_file(tmp_path / "w.pt")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loaded(x, x).item() == 0.0 and loaded(x, -x).item() > 0.0
    bad = {k.replace("lin0", "lin9"): v for k, v in model.state_dict().items()}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="lin0.model.1.weight"):
        LPIPS.from_file(tmp_path / "bad.pt")
