"""Elastic resume under DeepSpeed: a run saved on 2 ranks resumes on 1, and one saved on 1 resumes on 2. The ZeRO
optimizer partitions are re-cut for the new world size (checked against the partitions of the saving run), the
data stream is resized (every sample of the epoch seen exactly once: tests/data_pipeline/test_loader_resize.py at
loader level, here through the training loop's own checkpoints), and training goes on."""

from pathlib import Path

import pytest
import torch
from helpers.data import make_c2i_data, make_t2i_data
from helpers.train_runs import launch, losses

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "training" / "configs" / "tiny_c2i.yaml"

PROBE = """
import sys, torch
from pathlib import Path
from training.config import load_config, grad_accumulation
from training.engines import build_engine, init_distributed
from training.tasks import build_task
from training.checkpoint import load_checkpoint

cfg = load_config(sys.argv[1], sys.argv[3:])
rank, world, device = init_distributed(cfg.engine.kind)
Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
task = build_task(cfg, device)
engine = build_engine(cfg, task, grad_accumulation(cfg, world))
ema = engine.new_ema(cfg.ema_decay)
trainer, loader_state, states = load_checkpoint(Path(sys.argv[2]), engine, ema)
numels = [sum(p.numel() for p in group) for group in engine.optimizer.bit16_groups]
out = {"opt": engine.optimizer_state(), "numels": numels, "resized": states is not None}
torch.save(out, Path(cfg.run_dir) / f"probe_{rank}.pt")
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    return make_c2i_data(root / "c2i", make_t2i_data(root / "t2i", samples=24)["ae"])


def overrides(run_dir, data_dir, *extra):
    return [
        f"run_dir={run_dir}",
        f"data.data_dir={data_dir}",
        "data.global_batch=8",
        "data.micro_batch=4",
        "engine.zero_stage=1",
        "logging.every=1",
        "logging.wandb=disabled",
        "checkpoint.export_official=false",
        "schedule.warmup_steps=1",
        *extra,
    ]


def train(nproc: int, run_dir: Path, data_dir: Path, *extra):
    return launch(["--config", str(CONFIG), *overrides(run_dir, data_dir, *extra)], nproc)


def probe(nproc: int, run_dir: Path, data_dir: Path, ckpt: Path, tmp_path: Path) -> list[dict]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    launch([str(CONFIG), str(ckpt), *overrides(run_dir, data_dir)], nproc, [str(script)])
    return [torch.load(run_dir / f"probe_{r}.pt", weights_only=True) for r in range(nproc)]


def joined(parts: list[torch.Tensor], total: int) -> torch.Tensor:
    return torch.cat(parts)[:total]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)], ids=["2->1", "1->2"])
def test_resume_on_another_world_size(data, tmp_path, before, after):
    run = tmp_path / "run"
    train(before, run, data, "schedule.total_steps=6", "checkpoint.every=3")
    ckpt = run / "checkpoints" / "step_00000003"
    saved = [torch.load(ckpt / f"rank_{r:05d}.pt", weights_only=True)["optimizer"] for r in range(before)]
    got = probe(after, tmp_path / "probe", data, ckpt, tmp_path)
    assert all(g["resized"] for g in got)
    for g, numel in enumerate(got[0]["numels"]):  # each group: one flat buffer, partitioned over the ranks
        old = [s["fp32_partitions"][g] for s in saved]
        new = [x["opt"]["fp32_partitions"][g] for x in got]
        assert torch.equal(joined(old, numel), joined(new, numel)), g
        for key in ("exp_avg", "exp_avg_sq"):
            o = [s["base"]["state"][g][key] for s in saved]
            n = [x["opt"]["base"]["state"][g][key] for x in got]
            assert torch.equal(joined(o, numel), joined(n, numel)), (g, key)
            assert o[0].abs().sum() > 0  # a trained state, not zeros on both sides
        steps = {int(x["opt"]["base"]["state"][g]["step"]) for x in got}
        assert steps == {int(saved[0]["base"]["state"][g]["step"])}
    # and the loop resumes there on the new world size and trains on
    resumed = tmp_path / "resumed"
    train(after, resumed, data, "schedule.total_steps=6", f"checkpoint.resume={ckpt}", "checkpoint.every=0")
    curve = losses(resumed)
    assert sorted(curve) == [4, 5, 6] and all(0 < v < 10 for v in curve.values())
