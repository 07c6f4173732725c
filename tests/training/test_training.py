"""The training loop end to end on CPU: 2 gloo processes, DeepSpeed, exact resume, atomic checkpoints, ZeRO-2,
NaN skipping, SIGTERM. Runs `torchrun -m training.train` as a user would."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.data import make_c2i_data, make_t2i_data
from helpers.megatron_cpu import free_port
from helpers.train_runs import launch, losses

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    t2i = make_t2i_data(root / "t2i")
    return {**t2i, "c2i": make_c2i_data(root / "c2i", t2i["ae"])}


def run(
    run_dir, data, *overrides, nproc=2, kind="t2i", env=None, check=True, timeout=600, program=("-m", "training.train")
):
    config = REPO / "training" / "configs" / f"tiny_{kind}.yaml"
    data_dir = data["tokens"] if kind == "t2i" else data["c2i"]
    args = [
        f"run_dir={run_dir}",
        f"data.data_dir={data_dir}",
        "logging.every=1",
        "logging.wandb=disabled",
        "checkpoint.export_official=false",
        *overrides,
    ]
    return launch(["--config", str(config), *args], nproc, program, env, check, timeout)


def test_two_processes_loss_falls(data, tmp_path):
    run(tmp_path / "r", data, "schedule.total_steps=40", "checkpoint.every=0")
    curve = losses(tmp_path / "r")
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(36, 41)) / 5
    assert last < 0.75 * first, (first, last)


@pytest.mark.parametrize("kind,nproc,zero", [("t2i", 2, 0), ("c2i", 1, 0), ("t2i", 2, 3)])
def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(data, tmp_path, kind, nproc, zero):
    common = ["schedule.total_steps=12", "checkpoint.every=5", f"engine.zero_stage={zero}"]
    run(tmp_path / "full", data, *common, kind=kind, nproc=nproc)
    killed = run(
        tmp_path / "cut", data, *common, kind=kind, nproc=nproc, env={"BITDANCE_FAULT_KILL": "step:8"}, check=False
    )
    assert killed.returncode != 0
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    resumed = run(tmp_path / "cut", data, *common, kind=kind, nproc=nproc)
    assert "resumed from" in resumed.stdout + resumed.stderr
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(full) == sorted(cut) == list(range(1, 13))
    assert [cut[s] for s in range(1, 13)] == [full[s] for s in range(1, 13)]


def test_kill_during_checkpoint_write_keeps_the_previous_one(data, tmp_path):
    common = ["schedule.total_steps=8", "schedule.warmup_steps=2", "checkpoint.every=3"]
    crashed = run(tmp_path / "r", data, *common, nproc=1, env={"BITDANCE_FAULT_KILL": "after_model:6"}, check=False)
    assert crashed.returncode != 0
    root = tmp_path / "r" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000003"
    assert (root / ".step_00000006.tmp").is_dir() and not (root / "step_00000006").exists()
    resumed = run(tmp_path / "r", data, *common, nproc=1)
    assert "resumed from" in resumed.stdout + resumed.stderr and "step_00000003" in resumed.stdout + resumed.stderr
    assert (root / "latest").read_text().strip() == "step_00000008"


def test_zero2_matches_zero0(data, tmp_path):
    run(
        tmp_path / "z0",
        data,
        "schedule.total_steps=6",
        "schedule.warmup_steps=2",
        "checkpoint.every=0",
        "engine.zero_stage=0",
    )
    run(
        tmp_path / "z2",
        data,
        "schedule.total_steps=6",
        "schedule.warmup_steps=2",
        "checkpoint.every=0",
        "engine.zero_stage=2",
    )
    z0, z2 = losses(tmp_path / "z0"), losses(tmp_path / "z2")
    assert all(abs(z0[s] - z2[s]) <= 1e-4 * max(1.0, abs(z0[s])) for s in range(1, 7)), (z0, z2)


def test_nan_step_is_skipped_and_counted(data, tmp_path):
    run(
        tmp_path / "r",
        data,
        "schedule.total_steps=6",
        "schedule.warmup_steps=2",
        "checkpoint.every=0",
        "fault_nan_at_step=2",
        "engine.zero_stage=2",
    )
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows}
    assert by_step[2]["skipped_steps"] == 0 and by_step[3]["skipped_steps"] == 1 and by_step[6]["skipped_steps"] == 1
    assert all(r["loss"] == r["loss"] for s, r in by_step.items() if s != 3)  # finite (not NaN) elsewhere


def test_consecutive_nan_steps_stop_the_run(data, tmp_path):
    args = ["schedule.total_steps=6", "schedule.warmup_steps=2", "fault_nan_at_step=1", "max_consecutive_skips=1"]
    proc = run(tmp_path / "r", data, *args, nproc=1, check=False)
    assert proc.returncode == 3 and "consecutive steps had non-finite loss" in proc.stderr


def test_sigterm_writes_a_checkpoint_and_exits_zero(data, tmp_path):
    config = REPO / "training" / "configs" / "tiny_t2i.yaml"
    cmd = [
        sys.executable,
        "-m",
        "training.train",
        "--config",
        str(config),
        f"run_dir={tmp_path / 'r'}",
        f"data.data_dir={data['tokens']}",
        "logging.every=1",
        "logging.wandb=disabled",
        "checkpoint.every=0",
        "schedule.total_steps=100000",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: checkpoint written" in out
    latest = (tmp_path / "r" / "checkpoints" / "latest").read_text().strip()
    assert int(latest.split("_")[1]) >= 3


GROUP_THREADS = """
import os
def group_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n or "tcpstore" in n)
"""

TEARDOWN = (
    GROUP_THREADS
    + """
import importlib, sys, weakref
import torch.distributed as dist
from training.engines import init_distributed, shutdown_distributed
kind = sys.argv[1]
init_distributed(kind)
import training.train  # what a run imports once the group exists: its engine, megatron-core's schedules, dynamo
importlib.import_module("training.engines." + kind)
import megatron.core.pipeline_parallel.schedules, torch._dynamo
from megatron.core import parallel_state
if kind == "megatron":
    parallel_state.initialize_model_parallel(1, 1)  # its groups, gloo ones included
world = weakref.ref(dist.group.WORLD)
shutdown_distributed()
print(world() is None, group_threads())
"""
)


@pytest.mark.parametrize("kind", ["deepspeed", "megatron"])
def test_shutdown_frees_the_process_group_and_its_threads(kind):
    """A process group kept alive past shutdown (captured at import by `group=GroupMember.WORLD` defaults of modules
    imported after it was made) leaves its gloo/TCPStore threads running into interpreter finalization, where a
    finished run was seen to abort (SIGABRT, "terminate called without an active exception")."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", TEARDOWN, kind], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "True []"


WRAPPED_TRAIN = (
    GROUP_THREADS
    + """
import atexit, sys
# atexit handlers run before interpreter finalization; one write per line, so the two ranks' lines never interleave
atexit.register(lambda: sys.stderr.write(f"threads at exit: {group_threads()}\\n") and sys.stderr.flush())
from training.train import main
main()
"""
)


def test_a_finished_two_process_run_leaves_no_group_thread_to_finalization(data, tmp_path):
    script = tmp_path / "wrapped_train.py"
    script.write_text(WRAPPED_TRAIN)
    env = {"PYTHONPATH": str(REPO)}
    proc = run(
        tmp_path / "r", data, "schedule.total_steps=3", "schedule.warmup_steps=1", env=env, program=[str(script)]
    )
    left = [line for line in proc.stderr.splitlines() if "threads at exit:" in line]
    assert len(left) == 2 and all(line.endswith("threads at exit: []") for line in left), left


def test_every_shipped_config_validates():
    from training.config import load_config

    for path in sorted((REPO / "training" / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.kind in ("t2i", "c2i", "tokenizer"), path
    with pytest.raises(ValueError, match="optim.lrr|lrr"):
        load_config(REPO / "training" / "configs" / "tiny_t2i.yaml", ["optim.lrr=1"])
    from training.config import grad_accumulation

    cfg = load_config(None, ["data.global_batch=10", "data.micro_batch=4"])
    with pytest.raises(ValueError, match="not divisible by micro_batch 4 x data-parallel size 2"):
        grad_accumulation(cfg, 2)


def test_samples_export_wandb_offline_and_keep_last(data, tmp_path):
    run(
        tmp_path / "r",
        data,
        "schedule.total_steps=4",
        "schedule.warmup_steps=1",
        "checkpoint.every=1",
        "checkpoint.keep_last=2",
        "eval.every=2",
        "eval.prompts=[a red circle,two blue squares]",
        "eval.height=32",
        "eval.width=64",
        "sampling.steps=2",
        f"model.image_tokenizer={data['ae']}",
        f"model.text_tokenizer={data['text']}",
        "checkpoint.export_official=true",
        "logging.wandb=offline",
        nproc=1,
    )
    r = tmp_path / "r"
    assert sorted(p.name for p in (r / "samples").glob("*.png")) == ["samples_00000002.png", "samples_00000004.png"]
    assert sorted(p.name for p in (r / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]
    assert list((r / "wandb").glob("offline-run-*")), "wandb offline run directory missing"
    from models.t2i.io import load_t2i_folder

    model, text, ae = load_t2i_folder(r / "export", image_sizes=[(32, 32), (32, 64)])
    assert model.cfg.parallel_num == 4 and ae.config.z_channels == 16


def test_token_by_token_1x_model_trains_and_exports_the_official_1x_layout(data, tmp_path):
    """model.name=tiny-1x builds the released 1x architecture (token-wise MLP head, no query tokens), trains
    through the one loop and exports a checkpoint that loads back strictly."""
    run(
        tmp_path / "r",
        data,
        "model.name=tiny-1x",
        "schedule.total_steps=4",
        "schedule.warmup_steps=1",
        "checkpoint.every=0",
        "checkpoint.export_official=true",
        f"model.image_tokenizer={data['ae']}",
        kind="c2i",
        nproc=1,
    )
    curve = losses(tmp_path / "r")
    assert sorted(curve) == [1, 2, 3, 4] and all(v == v and v > 0 for v in curve.values())
    state = torch.load(tmp_path / "r" / "export" / "bitdance_c2i.pt", weights_only=True)["ema"]
    assert "head.net.res_blocks.0.norm.weight" in state and "query_token" not in state
    assert state["head.net.ada_ln_blocks.0.weight"].shape[0] == 3 * state["head.net.ada_ln_blocks.0.weight"].shape[1]
    from models.c2i.io import load_c2i_checkpoint
    from models.c2i.model import get_c2i_config

    model, _ = load_c2i_checkpoint(tmp_path / "r" / "export" / "bitdance_c2i.pt", get_c2i_config("tiny-1x"))
    assert model.head.cfg.block == "mlp"


def test_t2i_backbone_initialises_from_a_local_qwen3_folder(data, tmp_path):
    from dataclasses import replace

    from models.t2i.io import export_t2i_folder
    from models.t2i.model import TextToImageBitDance, get_t2i_config
    from models.t2i.text_tokenizer import T2ITextTokenizer
    from models.tokenizer.io import load_tokenizer

    cfg = get_t2i_config("tiny-4x")
    text = T2ITextTokenizer.from_folder(data["text"], 4)
    model = TextToImageBitDance(replace(cfg, llm=replace(cfg.llm, vocab_size=len(text))))
    export_t2i_folder(model, text, load_tokenizer(data["ae"]), tmp_path / "hf")
    for name in ("vision_head_config.json", "vision_head.safetensors", "projector.safetensors"):
        (tmp_path / "hf" / name).unlink()  # what is left is a plain Hugging Face Qwen3 folder
    run(
        tmp_path / "r",
        data,
        "schedule.total_steps=2",
        "schedule.warmup_steps=1",
        f"model.init_from={tmp_path / 'hf'}",
        nproc=1,
    )
    from safetensors.torch import load_file

    trained = load_file(str(tmp_path / "r" / "checkpoints" / "step_00000002" / "model.safetensors"))
    start = model.llm.model.norm.weight
    assert trained["llm.model.norm.weight"].shape == start.shape
    # the backbone began from the folder: its untouched embedding rows equal the folder's
    unused = text.res_id(256)  # no sample is 256 tokens tall: this row gets no gradient
    emb = trained["llm.model.embed_tokens.weight"]
    assert torch.equal(emb[unused], model.llm.model.embed_tokens.weight[unused].detach())


def test_flex_attention_rows_are_padded_to_one_length_without_changing_the_loss(data):
    """Under the DeepSpeed engine the T2I task pads every row to the token budget rounded to the FlexAttention block
    (one compiled shape); padding carries no loss."""
    from training.config import load_config
    from training.tasks.t2i import T2ITask

    cfg = load_config(
        REPO / "training" / "configs" / "tiny_t2i.yaml",
        [f"data.data_dir={data['tokens']}", "model.attention=flex", "data.token_budget=300"],
    )
    task = T2ITask(cfg, torch.device("cpu"))
    batches = iter(task.loader(0, 1))
    seen = []

    def forward(batch):
        seen.append(batch.input_ids.shape[1])
        return task.model(batch)

    for _ in range(3):
        batch = next(batches)
        with torch.no_grad():  # CPU FlexAttention has no backward
            torch.manual_seed(3)
            padded = task.step(forward, batch)
            torch.manual_seed(3)
            plain = task.model(batch)
        assert abs(padded.loss.item() - plain.loss.item()) <= 1e-5 * abs(plain.loss.item())
        assert padded.tokens == int((batch.doc_ids >= 0).sum())
    assert set(seen) == {384}, seen  # 300 rounded up to the 128-position block, for every row length


def test_a_model_of_another_p_than_the_data_is_refused_once_before_it_is_built(data):
    """P has one source, the model config; the T2I task checks it against the dataset's query tokens (the manifest)
    before building anything, and the loader packs for the dataset's P."""
    from training.config import load_config
    from training.tasks.t2i import T2ITask

    config = REPO / "training" / "configs" / "tiny_t2i.yaml"
    cfg = load_config(config, [f"data.data_dir={data['tokens']}", "model.name=tiny-16x"])
    with pytest.raises(ValueError, match=r"predicts P=16 tokens but the data was tokenized for P=4"):
        T2ITask(cfg, torch.device("cpu"))
    task = T2ITask(load_config(config, [f"data.data_dir={data['tokens']}"]), torch.device("cpu"))
    assert next(iter(task.loader(0, 1))).parallel_num == task.model_cfg.parallel_num == 4
