"""Every shipped training config and the dataclass defaults, resolved as on a GPU machine (`torch.cuda.is_available`
and `device_count` reported as 1 and 8 devices): each loads, `engine.precision=auto` resolves to a precision its engine
trains with, the engine's own checks pass at load time (so nothing is refused after the processes started), and the
launch layout (world size = the GPUs) either works or is refused at once in one line naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.config import grad_accumulation, load_config
from training.engines import engine_class, precision

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "training" / "configs").glob("*.yaml"))
RUNS_ON_ONE_NODE = {"t2i_14b_16x.yaml", "t2i_14b_64x.yaml"} | {p.name for p in CONFIGS if p.name.startswith("imagenet")}


@pytest.fixture(params=[1, 8], ids=lambda n: f"{n}gpu")
def gpus(request, monkeypatch) -> int:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: request.param)
    return request.param


@pytest.mark.parametrize("config", [None, *CONFIGS], ids=lambda p: "defaults" if p is None else p.name)
def test_config_resolves_on_a_gpu_machine(config, gpus):
    cfg = load_config(config)
    engine = engine_class(cfg)
    resolved = precision(cfg)
    assert resolved in engine.precisions, f"{config}: precision auto -> {resolved}, which {engine.kind} refuses"
    assert all(ok for ok, _ in engine.check(cfg))
    if config is None or (gpus == 8 and config.name in RUNS_ON_ONE_NODE):
        assert grad_accumulation(cfg, gpus) >= 1  # the layout the README launches on 8 GPUs (the defaults: on 1)
    else:
        try:
            grad_accumulation(cfg, gpus)
        except ValueError as err:  # refused before any model is built, in one line that says what to change
            message = str(err)
            assert "\n" not in message and any(w in message for w in ("change", "launch a multiple")), message


def test_the_defaults_train_in_bf16_where_the_engine_can(gpus):
    assert precision(load_config(None)) == "fp32"  # DeepSpeed ZeRO-0 keeps no fp32 master weights
    assert precision(load_config(None, ["engine.zero_stage=1"])) == "bf16"
    assert precision(load_config(REPO / "training" / "configs" / "t2i_14b_16x.yaml")) == "bf16"
