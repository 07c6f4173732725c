"""`EngineBase.export_checkpoint` (training/engines/export.py, what eval.watch runs): a checkpoint's EMA weights as an
official T2I folder, for the engine that wrote it: DeepSpeed ZeRO-3 (each rank's EMA partition put together again)
and megatron (the streaming export of the EMA, fp32)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.data import make_t2i_data

from models.t2i.io import load_t2i_folder
from training.engines.export import export_checkpoint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_t2i_data(tmp_path_factory.mktemp("export_data"))


def train(run_dir: Path, data: dict, launcher: list[str], *overrides: str) -> Path:
    args = ["--config", str(REPO / "training" / "configs" / "tiny_t2i.yaml"), f"run_dir={run_dir}"]
    args += [f"data.data_dir={data['tokens']}", "schedule.total_steps=2", "schedule.warmup_steps=1"]
    args += ["logging.wandb=disabled", "checkpoint.export_official=false", *overrides]
    proc = subprocess.run([*launcher, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "checkpoints" / "step_00000002"


def exported(checkpoint: Path, data: dict, dst: Path) -> dict[str, torch.Tensor]:
    out = export_checkpoint(checkpoint, dst, data["text"], data["ae"])
    model, _, _ = load_t2i_folder(out, image_sizes=[(32, 32)])  # every part strictly
    return model.state_dict()


def test_deepspeed_zero3_ema_partitions_export_as_whole_parameters(data, tmp_path):
    """With ema_decay=0 the EMA is the trained weights, which model.safetensors holds gathered: the export equals it."""
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "training.train"]
    overrides = ("engine.zero_stage=3", "ema_decay=0.0", "model.activation_checkpointing=true")  # wrapped EMA names
    checkpoint = train(tmp_path / "run", data, launcher, *overrides)
    assert not (checkpoint / "ema.safetensors").exists()  # the EMA is in rank_00000.pt and rank_00001.pt only
    from safetensors.torch import load_file

    state, trained = exported(checkpoint, data, tmp_path / "export"), load_file(str(checkpoint / "model.safetensors"))
    assert set(state) == set(trained) and all(torch.equal(state[k], trained[k].float()) for k in trained)


def test_megatron_ema_exports_through_the_streaming_tool_in_fp32(data, tmp_path):
    """The EMA (ema_decay=0.5: neither the start nor the trained weights), not the model weights, in fp32."""
    pytest.importorskip("megatron.core")
    from training.engines.checkpoint_tools import export_folder

    launcher = [sys.executable, str(REPO / "tests" / "helpers" / "megatron_train_cpu.py")]
    overrides = ("engine.kind=megatron", "ema_decay=0.5", "data.global_batch=1")
    checkpoint = train(tmp_path / "run", data, launcher, *overrides)
    state = exported(checkpoint, data, tmp_path / "export")
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    for weights, same in (("ema", True), ("model", False)):
        export_folder(checkpoint, tmp_path / weights, data["text"], data["ae"], weights, "fp32")
        other = load_t2i_folder(tmp_path / weights, image_sizes=[(32, 32)])[0].state_dict()
        assert all(torch.equal(state[k], v) for k, v in other.items()) == same, weights
