"""The extension points are registries: a toy model family, a toy engine, a toy data source and a toy benchmark are
each added by one new module (tests/helpers/toys/) plus one registration line, and run through the real entry points
(`training.train`, `data_pipeline.tokenize`, `eval.generate`) with no other file touched."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from models.family import FAMILIES
from training.config import load_config
from training.engines import ENGINES, shutdown_distributed


@pytest.fixture
def single_process(monkeypatch):
    """The env torchrun gives one process, restored afterwards; the process group is torn down at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    yield
    shutdown_distributed()


@pytest.fixture
def toy_family_and_engine():
    FAMILIES.register("toy", "helpers.toys.toy_family:FAMILY")  # the family's one registry line
    ENGINES.register("plain", "helpers.toys.toy_engine:PlainEngine")  # the engine's one registry line
    yield
    FAMILIES.unregister("toy")
    ENGINES.unregister("plain")


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def toy_config(run_dir: Path, steps: int, *extra: str):
    overrides = [
        "model.kind=toy",
        "model.name=toy-8",
        "engine.kind=plain",
        f"run_dir={run_dir}",
        f"schedule.total_steps={steps}",
        "data.global_batch=2",
        "optim.lr=1e-2",
        "logging.every=1",
        "logging.wandb=disabled",
        "checkpoint.every=3",
        *extra,
    ]
    return load_config(None, overrides)


def test_toy_family_and_toy_engine_train_and_resume_exactly(tmp_path, single_process, toy_family_and_engine):
    from training.train import train

    state = train(toy_config(tmp_path / "full", 6))
    full = losses(tmp_path / "full")
    assert state.step == 6 and sorted(full) == list(range(1, 7)) and full[6] < full[1]
    assert (tmp_path / "full" / "checkpoints" / "step_00000006" / "model.safetensors").is_file()
    # stopped at 3, resumed to 6: the same losses bit for bit (model, optimizer, EMA and data position restored)
    train(toy_config(tmp_path / "split", 3))
    train(toy_config(tmp_path / "split", 6))
    split = losses(tmp_path / "split")
    assert [split[s] for s in range(4, 7)] == [full[s] for s in range(4, 7)]


def test_registries_refuse_unknown_names_in_one_line():
    with pytest.raises(ValueError, match=r"unknown model.kind 'toy'; choose one of t2i, c2i, tokenizer"):
        load_config(None, ["model.kind=toy"])
    with pytest.raises(ValueError, match=r"unknown engine.kind 'plain'; choose one of deepspeed, megatron"):
        load_config(None, ["engine.kind=plain"])


def test_engine_checks_run_at_config_time(toy_family_and_engine):
    with pytest.raises(ValueError, match="engine.kind=plain trains in fp32 only"):
        load_config(None, ["model.kind=toy", "model.name=toy-8", "engine.kind=plain", "engine.precision=bf16"])


@pytest.fixture
def tiny_c2i_checkpoint(tmp_path) -> Path:
    import torch

    from models.c2i.io import save_c2i_checkpoint
    from models.c2i.model import ClassConditionalBitDance, get_c2i_config
    from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config

    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    save_c2i_checkpoint(
        path, ClassConditionalBitDance(get_c2i_config("tiny-16x")), BinaryAutoencoder(get_tokenizer_config("tiny"))
    )
    return path


def test_toy_benchmark_generates_through_eval_generate(tmp_path, tiny_c2i_checkpoint):
    from eval.benchmarks import BENCHMARKS
    from eval.generate import main

    BENCHMARKS.register("toy", "helpers.toys.toy_benchmark:EvenClasses")  # the benchmark's one registry line
    try:
        out = tmp_path / "toy"
        args = ["--task", "toy", "--model", str(tiny_c2i_checkpoint), "--model-config", "tiny-16x", "--out", str(out)]
        main([*args, "--steps", "2", "--toy-classes", "5", "--images-per-prompt", "1"])
    finally:
        BENCHMARKS.unregister("toy")
    assert sorted(p.name for p in out.glob("*.png")) == ["class_0.png", "class_2.png", "class_4.png"]
    assert json.loads((out / "run.json").read_text())["task"] == "toy"


def test_toy_source_tokenizes_through_data_pipeline_tokenize(tmp_path):
    from helpers.data import make_tokenizers
    from PIL import Image

    from data_pipeline.sources import SOURCES
    from data_pipeline.tokenize import TokenizeConfig, run_tokenize

    text, ae = make_tokenizers(tmp_path / "tok")
    raw = tmp_path / "raw"
    raw.mkdir()
    captions = ["a red circle", "two blue squares", "a red circle", "two blue squares", "a red circle"]
    for i in range(len(captions)):
        Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)).save(raw / f"{i}.png")
    (raw / "part_a.tsv").write_text("".join(f"{i}.png\t{c}\n" for i, c in enumerate(captions[:3])))
    (raw / "part_b.tsv").write_text("".join(f"{i}.png\t{c}\n" for i, c in enumerate(captions) if i >= 3))
    SOURCES.register("toy", "helpers.toys.toy_source:CaptionListSource")  # the source's one registry line
    try:
        cfg = TokenizeConfig(
            source="toy",
            input=str(raw),
            output=str(tmp_path / "tokens"),
            tokenizer=str(ae),
            text_tokenizer=str(text),
            parallel_num=4,
            sizes=[(32, 32)],
        )
        manifest = run_tokenize(cfg, local=True)
    finally:
        SOURCES.unregister("toy")
    assert manifest["samples"] == 5 and manifest["skipped"] == {}
    assert {s["name"]: s["samples"] for s in manifest["shards"]} == {"part_a.tar": 3, "part_b.tar": 2}
