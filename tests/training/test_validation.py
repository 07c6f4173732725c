"""Held-out validation (`training.validation`): the validation loss of one set of weights is the same under DeepSpeed
ZeRO-0 / ZeRO-3 and megatron TP=2, PP=2 and PP=2 x VPP=2 (2 gloo ranks each, megatron inside the CPU harness);
training losses are bit for bit those of a run without validation, and a resumed run validates as the uninterrupted
one did."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from helpers.megatron_cpu import save_result, spawn  # noqa: E402

pytestmark = pytest.mark.slow

ENGINES = {
    "zero0": ["engine.kind=deepspeed", "engine.zero_stage=0"],
    "zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"],
    "tp2": ["engine.kind=megatron", "parallel.tp=2"],
    "pp2": ["engine.kind=megatron", "parallel.pp=2"],
    "pp2_vpp2": ["engine.kind=megatron", "parallel.pp=2", "parallel.virtual_pp=2", "data.global_batch=4"],
}


def _worker(rank, out_dir, data, run_dir, overrides):
    from training.config import load_config
    from training.train import train

    base = [
        f"run_dir={run_dir}",
        f"data.data_dir={data['tokens']}",
        f"data.val_dir={data['val']}",
        "eval.val_samples=11",  # 11 samples: a short last batch and batches that do not split evenly over ranks
        "data.micro_batch=2",
        "data.global_batch=4",
        "model.attention=dense",
        "schedule.total_steps=3",
        "schedule.warmup_steps=0",
        "checkpoint.every=2",
        "logging.every=1",
        "logging.wandb=disabled",
        "checkpoint.export_official=false",
    ]
    cfg = load_config(REPO / "training" / "configs" / "tiny_t2i.yaml", base + overrides)
    save_result(out_dir, rank, vars(train(cfg)))


def rows(run_dir: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["step"], {}).update(row)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny shapes data, a second tokenized set as the validation set, and an official folder of seeded weights (the
    `one checkpoint` every engine starts from)."""
    from helpers.data import make_t2i_data

    from models.t2i.io import export_t2i_folder
    from models.t2i.model import TextToImageBitDance, get_t2i_config
    from models.t2i.text_tokenizer import T2ITextTokenizer
    from models.tokenizer.io import load_tokenizer

    root = tmp_path_factory.mktemp("validation")
    data = make_t2i_data(root / "train", samples=48)
    val = make_t2i_data(root / "val", samples=24)
    text = T2ITextTokenizer.from_folder(data["text"], 4)
    cfg = get_t2i_config("tiny-4x", attention="dense", image_sizes=((32, 32), (32, 64)))
    cfg.llm.num_hidden_layers = 4  # pp=2 x vpp=2 needs a layer per chunk
    cfg.llm.vocab_size = -(-len(text) // 2) * 2  # the tokenizer's, even: tp=2 pads nothing
    torch.manual_seed(3)
    folder = export_t2i_folder(TextToImageBitDance(cfg), text, load_tokenizer(data["ae"]), root / "folder")
    return {**data, "val": val["tokens"], "folder": folder}


def run(tmp_path: Path, data: dict, name: str, overrides: list[str]) -> dict[int, dict]:
    run_dir = tmp_path / name
    spawn(_worker, 2, 0, 0, tmp_path, data, run_dir, overrides)
    return rows(run_dir)


def test_validation_loss_is_the_same_under_every_engine_and_layout(tmp_path, data):
    start = [f"model.init_from={data['folder']}", "eval.every=2"]
    logged = {name: run(tmp_path, data, name, start + extra) for name, extra in ENGINES.items()}
    reference = logged["zero0"][0]
    assert reference["val/tokens"] > 0 and 0 < reference["val/text_ce"] and 0 < reference["val/vision"]
    for name, steps in logged.items():
        print(f"{name:9s} val/loss {steps[0]['val/loss']:.8f} text_ce {steps[0]['val/text_ce']:.8f} "
              f"vision {steps[0]['val/vision']:.8f}")  # fmt: skip
        for key in ("val/loss", "val/text_ce", "val/vision"):
            assert steps[0][key] == pytest.approx(reference[key], abs=1e-5), (name, key)
        assert steps[0]["val/tokens"] == reference["val/tokens"], name
        assert {s for s, r in steps.items() if "val/loss" in r} == {0, 2, 3}, name  # every 2 steps and the last


@pytest.mark.parametrize("engine", ["zero0", "pp2"])
def test_validation_leaves_training_and_resume_unchanged(tmp_path, data, engine):
    on = run(tmp_path, data, "on", ENGINES[engine] + ["eval.every=2"])
    off = run(tmp_path, data, "off", ENGINES[engine] + ["eval.every=0"])
    assert [on[s]["loss"] for s in (1, 2, 3)] == [off[s]["loss"] for s in (1, 2, 3)]  # bit for bit
    assert all("val/loss" not in r for r in off.values())
    root = tmp_path / "on" / "checkpoints"
    shutil.rmtree(root / "step_00000003")  # as if the run had died after step 2
    (root / "latest").write_text("step_00000002\n")
    (tmp_path / "on" / "metrics.jsonl").write_text("")
    resumed = run(tmp_path, data, "on", ENGINES[engine] + ["eval.every=2"])
    assert 0 not in resumed  # no step-0 validation on a resumed run
    assert resumed[3]["loss"] == on[3]["loss"] and resumed[3]["val/loss"] == on[3]["val/loss"]
