"""The megatron engine on CPU (gloo, test harness): real optimizer steps with megatron's DDP, distributed optimizer and
no-pipelining schedule. TP=1 equals a plain AdamW step of the reference model; TP=2 equals TP=1 and the loss falls;
a non-finite step is skipped; the `parallel` config section maps onto the model's parallel settings."""

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from helpers.megatron_case import (  # noqa: E402
    case_file,
    load_case,
    local_weights,
    max_abs_diff,
    new_engine,
    reference_weights,
    step,
    train_config,
)
from helpers.megatron_cpu import megatron_in_process, save_result, spawn  # noqa: E402

from models.t2i.megatron.mapping import megatron_to_reference  # noqa: E402
from training.optim import build_optimizer  # noqa: E402

STEPS = 4
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def case_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine_case") / "case.pt"
    case_file(path)
    return path


def run_steps(engine, batch, n: int):
    losses, weights = [], []
    for _ in range(n):
        stats = step(engine, batch)
        assert stats.result.applied
        losses.append(stats.loss)
        weights.append(local_weights(engine))
    return losses, weights


@pytest.fixture(scope="module")
def tp1(case_path):
    """TP=1 engine: STEPS steps; the first step's gradients, grad norm and weights before/after."""
    case = load_case(case_path)
    with megatron_in_process(init_model_parallel=False):
        engine = new_engine(case)
        before = local_weights(engine)
        first = step(engine, case["batch"])
        (chunk,) = engine.chunks
        grads = {k: p.main_grad.detach().clone() for k, p in chunk.named_parameters()}
        after = local_weights(engine)
        losses, weights = run_steps(engine, case["batch"], STEPS - 1)
    return dict(
        case=case,
        before=before,
        first=first,
        grads=grads,
        after=after,
        losses=[first.loss, *losses],
        weights=[after, *weights],
    )


def test_tp1_step_is_the_reference_adamw_step(tp1):
    """Same weights, same (clipped) gradients: megatron's distributed Adam equals torch AdamW with the official
    parameter groups (no decay on norms, biases, embeddings, projector), lr, betas, eps and weight decay."""
    from models.t2i.model import TextToImageBitDance

    case, cfg = tp1["case"], train_config()
    assert tp1["first"].result.applied and tp1["first"].result.grad_norm > cfg.optim.grad_clip  # clipping is active
    ref = TextToImageBitDance(case["cfg"])
    ref.load_state_dict(megatron_to_reference(tp1["before"], case["cfg"].llm))
    clipped = megatron_to_reference(tp1["grads"], case["cfg"].llm)  # megatron clips in place in its grad buffer
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped.values()]))
    assert abs(norm.item() - cfg.optim.grad_clip) < 1e-4
    for name, p in ref.named_parameters():
        p.grad = clipped[name].clone()
    build_optimizer(ref, cfg.optim).step()
    want = {k: v.detach() for k, v in ref.state_dict().items()}
    got = megatron_to_reference(tp1["after"], case["cfg"].llm)
    assert max_abs_diff(got, want) < 1e-6


def test_tp1_loss_falls(tp1):
    losses = tp1["losses"]
    assert losses[-1] < losses[0], losses


def _tp2_worker(rank, out_dir, case_path):
    case = load_case(case_path)
    engine = new_engine(case, tp=2)
    losses, weights = run_steps(engine, case["batch"], STEPS)
    save_result(out_dir, rank, (losses, weights))


@pytest.mark.slow
def test_tp2_distributed_optimizer_steps_equal_tp1(tp1, case_path, tmp_path):
    ranks = spawn(_tp2_worker, 2, 0, 0, tmp_path, case_path)
    (losses, w0), (losses1, w1) = ranks
    assert losses == losses1, "TP ranks disagree on the loss"
    cfg = tp1["case"]["cfg"]
    for s in range(STEPS):
        assert abs(losses[s] - tp1["losses"][s]) <= 1e-5 * abs(tp1["losses"][s]), (s, losses, tp1["losses"])
    start = megatron_to_reference(tp1["before"], cfg.llm)
    for s in (0, STEPS - 1):  # Adam's first steps amplify rounding in near-zero gradients: compare the updates
        got, want = reference_weights([w0[s], w1[s]], cfg), megatron_to_reference(tp1["weights"][s], cfg.llm)
        err = sum((got[k] - want[k]).double().norm() ** 2 for k in want) ** 0.5
        update = sum((want[k] - start[k]).double().norm() ** 2 for k in want) ** 0.5
        assert err <= 1e-4 * update, f"weights after step {s + 1}: {err:.2e} vs update {update:.2e}"
    assert losses[-1] < losses[0], losses


def test_non_finite_step_is_skipped(case_path):
    case = load_case(case_path)
    with megatron_in_process(init_model_parallel=False):
        engine = new_engine(case)
        before = local_weights(engine)
        stats = step(engine, case["batch"], poison=True)
        assert not stats.result.applied and stats.loss != stats.loss  # NaN loss, update skipped
        assert max_abs_diff(local_weights(engine), before) == 0.0
        assert step(engine, case["batch"]).result.applied


def test_parallel_section_maps_onto_the_model_settings():
    from training.config import grad_accumulation
    from training.engines.megatron import parallel_config

    cfg = train_config(
        4,
        2,
        "parallel.virtual_pp=2",
        "parallel.sequence_parallel=true",
        "engine.precision=bf16",
        "model.activation_checkpointing=true",
        "data.global_batch=16",
    )
    par = parallel_config(cfg)
    assert (par.tp, par.pp, par.virtual_pp, par.sequence_parallel, par.recompute) == (4, 2, 2, True, "full")
    assert par.params_dtype == torch.bfloat16
    assert grad_accumulation(cfg, 16) == 8  # data-parallel size 16 / (4 * 2) = 2
    with pytest.raises(ValueError, match="world size 12 is not divisible by parallel.tp 4 x parallel.pp 2"):
        grad_accumulation(cfg, 12)
    odd = train_config(1, 2, "parallel.virtual_pp=2", "data.global_batch=3")
    with pytest.raises(ValueError, match="multiple of parallel.pp 2"):
        grad_accumulation(odd, 2)
    with pytest.raises(ValueError, match="engine.kind=megatron trains model.kind=t2i only"):
        train_config(1, 1, "model.kind=c2i")


def _loop_worker(rank, out_dir, data, run_dir):
    """`training.train.train` with engine.kind=megatron at TP=2 (the loop as torchrun runs it, inside the harness),
    with EMA sample grids every 2 steps."""
    from training.config import load_config
    from training.train import train

    overrides = [
        f"run_dir={run_dir}",
        f"data.data_dir={data['tokens']}",
        "engine.kind=megatron",
        "eval.every=2",
        "eval.prompts=[a red circle]",
        "eval.height=32",
        "eval.width=32",
        "sampling.steps=2",
        f"model.image_tokenizer={data['ae']}",
        f"model.text_tokenizer={data['text']}",
        "parallel.tp=2",
        "parallel.sequence_parallel=true",
        "schedule.total_steps=4",
        "schedule.warmup_steps=2",
        "checkpoint.every=2",
        "logging.every=1",
        "logging.wandb=disabled",
        "checkpoint.export_official=false",
    ]
    cfg = load_config(REPO / "training" / "configs" / "tiny_t2i.yaml", overrides)
    save_result(out_dir, rank, vars(train(cfg)))


def logged_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_training_loop_checkpoints_and_resumes_exactly(tmp_path):
    from helpers.data import make_t2i_data

    data = make_t2i_data(tmp_path / "data")
    run = tmp_path / "run"
    (first, _) = spawn(_loop_worker, 2, 0, 0, tmp_path, data, run)
    assert first["step"] == 4 and first["skipped_steps"] == 0
    full = logged_losses(run)
    assert sorted(full) == [1, 2, 3, 4] and all(v == v for v in full.values())
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000004"
    trainer = json.loads((root / "step_00000004" / "trainer.json").read_text())
    assert trainer["megatron"]["layout"] == {"tp": 2, "pp": 1, "virtual_pp": None, "dp": 1}
    assert trainer["samples_seen"] == first["samples_seen"] > 0
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids == ["samples_00000002.png", "samples_00000004.png"], grids  # logged as the DeepSpeed path logs them
    shutil.rmtree(root / "step_00000004")  # as if the run had died after step 3
    (root / "latest").write_text("step_00000002\n")
    (resumed, _) = spawn(_loop_worker, 2, 0, 0, tmp_path, data, run)
    assert resumed["step"] == 4 and resumed["samples_seen"] == first["samples_seen"]
    again = logged_losses(run)
    assert [again[s] for s in (3, 4)] == [full[s] for s in (3, 4)]
