"""CPU parts of the GPU checks (cluster/gpu_check/): the ~1B config, the synthetic packed batches, the CLI (--help; a
one-line error without a GPU), and, under the CPU megatron harness, the `schedule` and `train` sections driving the
product's MegatronEngine (the train section's MFU is `training.flops.mfu` of the steps' FLOPs); the torchao FP8 check's
CPU smoke run."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cluster.gpu_check import fp8, megatron
from cluster.gpu_check.common import check_config, synthetic_batch
from models.t2i.flops import t2i_linear_params
from models.t2i.model import get_t2i_config
from training.flops import mfu
from training.tasks.t2i import T2ITask

ROOT = Path(__file__).resolve().parents[2]


def test_check_config_is_about_one_billion():
    cfg = check_config()
    m = cfg.llm
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads, m.head_dim) == (
        2048,
        16,
        16,
        8,
        128,
    )
    assert (cfg.parallel_num, cfg.latent_dim, cfg.head.ch_latent) == (16, 32, 1024)
    lp = t2i_linear_params(cfg)
    assert lp["backbone"] == 16 * (2 * 2048 * 2048 + 2 * 2048 * 1024 + 3 * 2048 * 6144)
    total = lp["backbone"] + 2 * lp["lm_head"] + lp["projector"] + lp["head_token"] + lp["head_patch"]
    assert 0.95e9 < total < 1.1e9
    assert check_config(4).llm.num_hidden_layers == 4


def test_synthetic_batch_packs_several_samples_per_row():
    cfg = check_config()
    batch = synthetic_batch(cfg, 8192, rows=1, seed=0)
    assert batch.input_ids.shape == (1, 8192) and batch.parallel_num == 16
    assert batch.num_samples >= 5
    assert batch.target_bits.shape[1] == 32 and set(batch.target_bits.unique().tolist()) == {-1.0, 1.0}
    assert (batch.block_ids.diff(dim=1) >= 0).all()
    docs = batch.doc_ids[0]
    assert (docs[docs >= 0].diff() >= 0).all() and (docs[:-1][docs[:-1] < 0] < 0).all()  # padding only at the end
    sizes = torch.unique_consecutive(batch.block_ids[0][docs >= 0], return_counts=True)[1]
    assert set(sizes.tolist()) == {1, 16}  # causal positions, then blocks of P
    assert batch.target_index.numel() == batch.image_in_index.numel() + 16 * batch.num_samples
    again = synthetic_batch(cfg, 8192, rows=1, seed=0)
    assert torch.equal(batch.input_ids, again.input_ids)


def test_help_and_no_gpu_error(capsys, monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        megatron.main(["--help"])
    assert exit_.value.code == 0 and "--out" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        megatron.main(["--out", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cli_without_gpu_fails_in_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "cluster.gpu_check", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in run.stderr


def megatron_on_cpu():
    """The CPU megatron harness with `parallel_state` left to the engine."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.megatron_cpu import megatron_in_process

    return megatron_in_process(init_model_parallel=False)


def test_schedule_section_through_the_engine():
    with megatron_on_cpu():
        res = megatron.schedule_section(micro=3)
    assert res["ok"], res
    assert res["schedule"] == "forward_backward_no_pipelining" and res["params_with_grad"] == res["params"]


def test_train_section_mfu_is_the_shared_formula(capsys):
    cfg = replace(get_t2i_config("tiny-16x"), attention="dense")
    seq, micro, peak = 512, 2, 0.5
    with megatron_on_cpu():
        res = megatron.train_section(cfg, seq, 3, micro, peak, "engine.precision=fp32")
    assert "step 2:" in capsys.readouterr().out
    batches = [synthetic_batch(cfg, seq, rows=1, seed=i) for i in range(micro)]
    step_flops = sum(T2ITask.counts(cfg, b)[2] for b in batches)
    assert [s["flops"] for s in res["steps"]] == [step_flops] * 3 == [res["flops_per_step"]["total"]] * 3
    timed = res["steps"][1:]  # step 0 (compilation) is not timed
    seconds = sum(s["seconds"] for s in timed)
    assert res["mfu"] == mfu(sum(s["flops"] for s in timed), seconds, peak, devices=1) > 0
    assert res["tokens_per_s"] == sum(s["tokens"] for s in timed) / seconds
    assert res["finite"] and res["precision"] == "fp32" and res["schedule"] == "forward_backward_no_pipelining"
    assert res["steps"][-1]["loss"] < res["steps"][0]["loss"]
    counts = res["params"]
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total") > 0
    assert counts["lm_head"] == counts["embedding"] == 512 * 128


def test_gpu_check_fp8_cpu_smoke_runs_end_to_end(tmp_path):
    """python -m cluster.gpu_check.fp8 --device cpu --quick: the tiny model through bf16, fp8 tensorwise and fp8
    rowwise, with the profiler summary and the table (the figures mean nothing on CPU)."""
    pytest.importorskip("torchao.float8")
    out = tmp_path / "fp8.json"
    cmd = [sys.executable, "-m", "cluster.gpu_check.fp8", "--device", "cpu", "--quick", "--out", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "profiler by op" in run.stdout and "aten::mm" in run.stdout
    modes = ("bf16", "fp8-tensorwise", "fp8-rowwise")
    rows = {line.split()[0] for line in run.stdout.splitlines() if line.split()[:1] in ([m] for m in modes)}
    assert rows == set(modes), run.stdout[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in results] == list(modes)
    # head_share is the head's time, timed on its own, over the step's: on a loaded CPU it can pass 1
    assert all(r["finite"] and r["tokens_per_s"] > 0 and r["head_share"] > 0 for r in results), results
    assert results[0]["losses"] != results[1]["losses"]  # the float8 linears are in effect


def test_gpu_check_fp8_without_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert fp8.main([]) == 2
