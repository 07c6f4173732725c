"""The layout planner (`cluster.plan`): its memory formula against the measured peak of real megatron training steps
on CPU (tiny model, 4 layers, a ~2.5k-position micro-batch: tp=1 and tp=2 with sequence parallelism, pp=2 1F1B,
no / full recompute, fp32 and bf16) within 15%; exact parameter and buffer counts; the model's layout rules; the CLI.

Peaks are measured with `helpers.memory.AllocationTrace` (every CPU allocation and free of a step, from the
allocator) over the third step of `MegatronEngine.train_step` plus the EMA update, after two steps that create the
optimizer state; the planner is given the micro-batch as the model received it and no fixed overhead."""

import gc
import itertools
import math
from dataclasses import replace

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from helpers.megatron_case import PrefixIds, task, train_config  # noqa: E402
from helpers.megatron_cpu import megatron_in_process, save_result, spawn  # noqa: E402
from helpers.memory import AllocationTrace  # noqa: E402

from cluster import plan  # noqa: E402
from models.t2i.model import TextToImageBitDance, get_t2i_config  # noqa: E402
from models.t2i.packing import T2ISample, pack_rows  # noqa: E402

TOLERANCE = 0.15
LAYERS = 4
BUDGET = 2560  # the engine pads every micro-batch to this many positions


def tiny_config():
    cfg = replace(get_t2i_config("tiny-4x"), attention="segments")
    return replace(cfg, llm=replace(cfg.llm, num_hidden_layers=LAYERS))


def micro_batch():
    """One packed row of six captioned images (16x16 and 16x32 tokens, P=4): ~2.5k positions, 2.3k head targets."""
    g = torch.Generator().manual_seed(0)
    C, P = tiny_config().latent_dim, tiny_config().parallel_num
    row = [
        T2ISample(
            torch.randint(60, 512, (20 + 5 * i,), generator=g).tolist(),
            torch.randn(C, 16, 16 if i % 2 else 32, generator=g).sign(),
        )
        for i in range(6)
    ]
    return pack_rows([row], PrefixIds(), P)


def measure(tp: int, pp: int, precision: str, recompute: str | None, micro_batches: int) -> dict:
    """Build the engine and its EMA under an allocation trace, run three steps, and return this rank's measured
    peak of the third, the planner's prediction for its stage, and the real parameter / buffer sizes."""
    from training.engines.megatron import MegatronEngine

    cfg, batch = tiny_config(), micro_batch()
    torch.manual_seed(0)
    reference = TextToImageBitDance(cfg)
    overrides = [f"engine.precision={precision}", f"data.token_budget={BUDGET}"]
    overrides += [f"parallel.sequence_parallel={str(tp > 1).lower()}"]
    overrides += [f"parallel.recompute={recompute}"] if recompute else []
    seen = []
    gc.collect()
    with AllocationTrace() as trace:
        engine = MegatronEngine(train_config(tp, pp, *overrides), cfg, reference)
        del reference
        ema = engine.new_ema(0.999)
        (chunk,) = engine.chunks
        chunk.register_forward_pre_hook(lambda module, args: seen.append(args[0]) if not seen else None)
        for i in range(3):
            gc.collect()
            with trace.region(f"step{i}"):
                assert engine.train_step(itertools.repeat(batch), task(cfg), micro_batches).result.applied
                ema.update()
    measured = trace.memory("step2")
    lay = plan.Layout(tp, pp, None, recompute, sp=tp > 1)
    how = plan.Behaviour(attention="segments", param_bytes=4 if precision == "fp32" else 2)
    work = plan.Workload.of_batch(cfg, seen[0])  # as the model received it (padded to the budget)
    stage = engine.ps.get_pipeline_model_parallel_rank()
    predicted = plan.stage_memory(cfg, lay, engine.dp_size, work, micro_batches, how, overhead=0)[stage]
    (ddp,) = engine.ddp
    result = dict(
        peak=measured.peak,
        static=measured.start,
        predicted=predicted,
        params=sum(p.numel() for p in chunk.parameters()),
        planned_params=sum(map(sum, plan.stage_params(plan.param_numels(cfg), LAYERS, lay)[stage])),
        param_buffer=sum(b.param_data.numel() * b.param_data.element_size() for b in ddp.buffers),
        grad_buffer=sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers),
    )
    del engine, ema, chunk, trace
    gc.collect()
    return result


def check(result: dict, what: str) -> None:
    p, peak = result["predicted"], result["peak"]
    assert result["planned_params"] == result["params"], what
    assert (p.weights, p.grads) == (result["param_buffer"], result["grad_buffer"]), what
    detail = (
        f"{what}: predicted {p.total / 2**20:.1f} MiB (static {p.static / 2**20:.1f}, activations "
        f"{p.activations / 2**20:.1f}, head {p.head / 2**20:.1f}, working {p.working / 2**20:.1f}) vs measured peak "
        f"{peak / 2**20:.1f} MiB (static {result['static'] / 2**20:.1f})"
    )
    assert abs(p.total - peak) <= TOLERANCE * peak, detail
    assert p.total - p.static >= 0.5 * p.total, f"activations must dominate for the check to mean much; {detail}"


@pytest.mark.parametrize(("precision", "recompute"), [("fp32", None), ("bf16", "full")])
def test_peak_memory_tp1(precision, recompute):
    with megatron_in_process(init_model_parallel=False):
        check(measure(1, 1, precision, recompute, 1), f"tp=1 {precision} recompute={recompute}")


def _worker(rank, out_dir, tp, pp, micro_batches, cases):
    save_result(out_dir, rank, [measure(tp, pp, prec, rec, micro_batches) for prec, rec in cases])


CASES = [("fp32", None), ("bf16", "full")]


@pytest.mark.slow
def test_peak_memory_tp2_sequence_parallel(tmp_path):
    for rank, results in enumerate(spawn(_worker, 2, 0, 0, tmp_path, 2, 1, 1, CASES)):
        for (prec, rec), result in zip(CASES, results, strict=True):
            check(result, f"tp=2 sp rank {rank} {prec} recompute={rec}")


@pytest.mark.slow
def test_peak_memory_pp2_1f1b(tmp_path):
    """Four micro-batches through megatron's 1F1B schedule: the first stage holds two in flight."""
    for rank, results in enumerate(spawn(_worker, 2, 0, 0, tmp_path, 1, 2, 4, CASES)):
        for (prec, rec), result in zip(CASES, results, strict=True):
            check(result, f"pp=2 stage {rank} {prec} recompute={rec}")


# ---- counting, layout rules, CLI ----------------------------------------------------------------------------------


def test_14b_parameters_are_counted_exactly():
    """Qwen3-14B has 14,768,307,200 parameters (untied LM head); the 16x model adds the projector and the head."""
    cfg = get_t2i_config("14B-16x")
    numels = dict(plan.param_numels(cfg))
    backbone = sum(n for k, n in numels.items() if not k.startswith(("projector.", "vision_head.")))
    assert backbone == 14_768_307_200
    with torch.device("meta"):
        head = sum(p.numel() for p in TextToImageBitDance(cfg).vision_head.parameters())
    assert sum(numels.values()) - backbone - head == 32 * 5120 + 5120 + 5120 * 5120 + 5120  # projector
    tp8 = plan.stage_params(list(numels.items()), 40, plan.Layout(8, 4))
    assert sum(tp8[3][0]) > sum(tp8[1][0]) + head  # the head is replicated on the last stage
    assert plan.buffer_numel([1, 1], dp=3) == math.lcm(3, 128)  # 64-aligned parameters, padded to lcm(dp, 128)


def test_in_flight_micro_batches():
    one_f_one_b = plan.Layout(1, 4)
    assert [plan.in_flight(one_f_one_b, r, 8) for r in range(4)] == [4, 3, 2, 1]
    assert plan.in_flight(one_f_one_b, 0, 2) == 2
    interleaved = plan.Layout(1, 4, vpp=2)
    assert [plan.in_flight(interleaved, r, 8) for r in range(4)] == [11, 9, 7, 5]


def test_layouts_follow_the_model_and_cluster_rules():
    _, train = plan._train_config("14B-16x", None, None)
    plans, work = plan.plan_all("14B-16x", plan.Cluster(64, 141.0), train)
    assert work.length == 37376 and work.targets > 0.9 * work.length
    sized = [p for p in plans if not p.error]
    assert sized and {p.layout.tp for p in sized} == {1, 2, 4, 8}
    for p in sized:
        lay = p.layout
        assert 40 % lay.tp == 0 and 8 % lay.tp == 0 and 17408 % lay.tp == 0 and 40 % lay.pp == 0
        assert lay.vpp is None or (lay.pp >= 2 and 40 % (lay.pp * lay.vpp) == 0)
        assert p.dp * lay.tp * lay.pp == 64 and p.micro_batches * p.dp == 64  # data.global_batch: 64 rows
        assert lay.sp == (lay.tp > 1)
    wide = plan.plan_all("14B-16x", plan.Cluster(64, 141.0, gpus_per_node=16), train)[0]
    refused = {p.layout.tp: p.error for p in wide if p.error and p.layout.pp == 1}
    assert "tp=16 does not divide the 40 attention heads" in refused[16]


def test_cli_prints_a_layout_that_fits_and_its_torchrun_command(capsys):
    from training.config import grad_accumulation, load_config

    assert plan.main(["--model", "14B-64x", "--gpus", "16", "--gpu-mem", "80", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "14B-64x on 16 GPUs (2 node(s) x 8) of 80 GiB" in out and "Best: " in out
    command = out[out.index("torchrun") :].replace("\\\n", " ").split()
    assert command[:5] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "8"]
    yaml = command[command.index("--config") + 1]
    overrides = [c for c in command if "=" in c]
    cfg = load_config(str(plan.REPO / yaml), overrides)
    assert cfg.engine.kind == "megatron" and grad_accumulation(cfg, 16) >= 1
    assert plan.main(["--model", "14B-16x", "--gpus", "8", "--gpu-mem", "8"]) == 0
    assert "No layout fits" in capsys.readouterr().out
    assert plan.main(["--model", "tiny-4x"]) == 2
    assert "no training config known for 'tiny-4x'; pass --config" in capsys.readouterr().err
