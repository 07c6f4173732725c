"""The layout planner (`cluster.plan`): its memory formula against the measured peak of real megatron training steps
on CPU (tiny model, 4 layers, a ~2.5k-position micro-batch: tp=1 and tp=2 with sequence parallelism, pp=2 1F1B with
an even and an uneven split, no / full recompute, fp32 and bf16) within 15%; exact parameter and buffer counts; the
model's layout rules (every layout it sizes passes `validate_parallel`); uneven `pp_layers` splits; the CLI.

Peaks are measured with `helpers.memory.AllocationTrace` (every CPU allocation and free of a step, from the
allocator) over the third step of `MegatronEngine.train_step` plus the EMA update, after two steps that create the
optimizer state; the planner is given the micro-batch as the model received it and no fixed overhead."""

import gc
import itertools
import math
import shlex
from dataclasses import asdict, replace

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from helpers.megatron_case import PrefixIds, task, train_config  # noqa: E402
from helpers.megatron_cpu import megatron_in_process, save_result, spawn  # noqa: E402
from helpers.memory import AllocationTrace  # noqa: E402

from cluster.plan import memory, search  # noqa: E402
from cluster.plan.__main__ import main  # noqa: E402
from models.t2i.megatron.config import MegatronParallelConfig, ParallelSettings, validate_parallel  # noqa: E402
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


def measure(
    tp: int, pp: int, precision: str, recompute: str | None, micro_batches: int, pp_layers: list[int] | None = None
) -> dict:
    """Build the engine and its EMA under an allocation trace, run three steps, and return this rank's measured
    peak of the third, the planner's prediction for its stage, and the real parameter / buffer sizes."""
    from training.engines.megatron import MegatronEngine

    cfg, batch = tiny_config(), micro_batch()
    torch.manual_seed(0)
    reference = TextToImageBitDance(cfg)
    overrides = [f"engine.precision={precision}", f"data.token_budget={BUDGET}"]
    overrides += [f"parallel.sequence_parallel={str(tp > 1).lower()}"]
    overrides += [f"parallel.recompute={recompute}"] if recompute else []
    run = train_config(tp, pp, *overrides)  # pp_layers set after: the config check counts the named model's layers
    run = replace(run, parallel=replace(run.parallel, pp_layers=pp_layers))
    seen = []
    gc.collect()
    with AllocationTrace() as trace:
        engine = MegatronEngine(run, cfg, reference)
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
    par = ParallelSettings(tp=tp, pp=pp, pp_layers=pp_layers, sequence_parallel=tp > 1, recompute=recompute)
    how = memory.Behaviour(attention="segments", param_bytes=4 if precision == "fp32" else 2)
    work = memory.Workload.of_batch(cfg, seen[0])  # as the model received it (padded to the budget)
    stage = engine.ps.get_pipeline_model_parallel_rank()
    predicted = memory.stage_memory(cfg, par, engine.dp_size, work, micro_batches, how, overhead=0)[stage]
    (ddp,) = engine.ddp
    result = dict(
        peak=measured.peak,
        static=measured.start,
        predicted=predicted,
        params=sum(p.numel() for p in chunk.parameters()),
        planned_params=sum(map(sum, memory.stage_params(memory.param_numels(cfg), LAYERS, par)[stage])),
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


def _worker(rank, out_dir, tp, pp, micro_batches, cases, pp_layers=None):
    save_result(out_dir, rank, [measure(tp, pp, prec, rec, micro_batches, pp_layers) for prec, rec in cases])


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


@pytest.mark.slow
def test_peak_memory_pp2_uneven_split(tmp_path):
    """pp_layers=[3, 1]: the first stage three layers (two micro-batches in flight), the last one layer and the
    heads; each stage's prediction follows its own layers."""
    for rank, results in enumerate(spawn(_worker, 2, 0, 0, tmp_path, 1, 2, 4, CASES, [3, 1])):
        for (prec, rec), result in zip(CASES, results, strict=True):
            check(result, f"pp=2 [3,1] stage {rank} {prec} recompute={rec}")


# ---- counting, layout rules, CLI ----------------------------------------------------------------------------------


def test_14b_parameters_are_counted_exactly():
    """Qwen3-14B has 14,768,307,200 parameters (untied LM head); the 16x model adds the projector and the head."""
    cfg = get_t2i_config("14B-16x")
    numels = dict(memory.param_numels(cfg))
    backbone = sum(n for k, n in numels.items() if not k.startswith(("projector.", "vision_head.")))
    assert backbone == 14_768_307_200
    with torch.device("meta"):
        head = sum(p.numel() for p in TextToImageBitDance(cfg).vision_head.parameters())
    assert sum(numels.values()) - backbone - head == 32 * 5120 + 5120 + 5120 * 5120 + 5120  # projector
    tp8 = memory.stage_params(list(numels.items()), 40, ParallelSettings(tp=8, pp=4))
    assert sum(tp8[3][0]) > sum(tp8[1][0]) + head  # the head is replicated on the last stage
    layer = sum(tp8[1][0]) // 10  # a middle stage holds 10 layers and nothing else
    uneven = memory.stage_params(list(numels.items()), 40, ParallelSettings(tp=8, pp=4, pp_layers=[11, 10, 10, 9]))
    assert [sum(u[0]) - sum(e[0]) for u, e in zip(uneven, tp8, strict=True)] == [layer, 0, 0, -layer]
    assert memory.buffer_numel([1, 1], dp=3) == math.lcm(3, 128)  # 64-aligned parameters, padded to lcm(dp, 128)


def test_in_flight_micro_batches():
    one_f_one_b = ParallelSettings(pp=4)
    assert [memory.in_flight(one_f_one_b, r, 8) for r in range(4)] == [4, 3, 2, 1]
    assert memory.in_flight(one_f_one_b, 0, 2) == 2
    interleaved = ParallelSettings(pp=4, virtual_pp=2)
    assert [memory.in_flight(interleaved, r, 8) for r in range(4)] == [11, 9, 7, 5]


def test_pp_splits_lighten_the_last_stage():
    assert [11, 10, 10, 9] in search.pp_splits(40, 4)
    for pp in (2, 3, 4, 8):
        for split in search.pp_splits(40, pp):
            assert len(split) == pp and sum(split) == 40 and split[-1] < min(split[:-1])
            middle = split[1:-1] or split[:1]
            assert len(set(middle)) == 1 and split[0] - middle[0] in (0, 1)


def test_every_sized_layout_passes_the_megatron_config_validation():
    _, train = search.train_config("14B-16x", None, None)
    plans, work = search.plan_all("14B-16x", search.Cluster(64, 141.0), train)
    assert work.length == 37376 and work.targets > 0.9 * work.length
    sized = [p for p in plans if not p.error]
    assert sized and {p.par.tp for p in sized} == {1, 2, 4, 8}
    assert {tuple(p.par.pp_layers) for p in sized if p.par.pp_layers} >= {(22, 18), (11, 10, 10, 9)}
    cfg = get_t2i_config("14B-16x")
    for p in sized:
        par = p.par
        padded = replace(cfg, llm=replace(cfg.llm, vocab_size=-(-cfg.llm.vocab_size // par.tp) * par.tp))
        validate_parallel(padded, MegatronParallelConfig(**asdict(par)))  # the engine's own check
        assert 8 % par.tp == 0 and (par.pp_layers is None or par.virtual_pp is None)
        assert p.dp * par.tp * par.pp == 64 and p.micro_batches * p.dp == 64  # data.global_batch: 64 rows
        assert par.sequence_parallel == (par.tp > 1)
        assert len(p.stages) == par.pp
    wide = search.plan_all("14B-16x", search.Cluster(64, 141.0, gpus_per_node=16), train)[0]
    refused = {p.par.tp: p.error for p in wide if p.error and p.par.pp == 1}
    assert "tp=16 does not divide the 40 attention heads" in refused[16]


def torchrun_overrides(out: str) -> tuple[list[str], list[str]]:
    """The printed torchrun command as the shell splits it, and its key=value overrides."""
    command = shlex.split(out[out.index("torchrun") :].replace("\\\n", " "))
    return command, [c for c in command if "=" in c]


def test_cli_prints_an_uneven_split_when_it_is_fastest(capsys):
    """16 x H100: tp2 pp2 with 22 + 18 layers beats every even split and interleaving (the last stage runs the
    LM head and the diffusion head); the command carries the split and loads as a valid config."""
    from training.config import grad_accumulation, load_config

    assert main(["--model", "14B-64x", "--gpus", "16", "--gpu-mem", "80", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "14B-64x on 16 GPUs (2 node(s) x 8) of 80 GiB" in out and "Best: tp2 sp pp2 [22,18] full" in out
    command, overrides = torchrun_overrides(out)
    assert command[:5] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "8"]
    assert "parallel.pp_layers=[22,18]" in overrides
    yaml = command[command.index("--config") + 1]
    cfg = load_config(str(search.REPO / yaml), overrides)
    assert cfg.engine.kind == "megatron" and cfg.parallel.pp_layers == [22, 18] and grad_accumulation(cfg, 16) == 16
    _, train = search.train_config("14B-64x", None, None)
    plans, _ = search.plan_all("14B-64x", search.Cluster(16, 80.0), train)
    fitting = [p for p in plans if p.fits(80.0)]
    even = next(p for p in fitting if p.par.pp_layers is None)
    assert fitting[0].par.pp_layers == [22, 18] and fitting[0].step_s < even.step_s


def test_cli_without_split_and_errors(capsys):
    assert main(["--model", "14B-16x", "--gpus", "32", "--gpu-mem", "80", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "Best: tp4 sp pp1 full" in out and not any("pp_layers" in o for o in torchrun_overrides(out)[1])
    assert main(["--model", "14B-16x", "--gpus", "8", "--gpu-mem", "8"]) == 0
    assert "No layout fits" in capsys.readouterr().out
    assert main(["--model", "tiny-4x"]) == 2
    assert "no training config known for 'tiny-4x'; pass --config" in capsys.readouterr().err


# ---- fine-tuning (cluster.plan.finetune; measured against CPU steps by tests/benchmarks/bench_finetune_memory.py) ----


def finetune_plans(name: str = "14B-16x", token_budget: int | None = None, rank: int | None = None) -> dict:
    """(method, offload) -> the one-GPU plan of `name`'s YAML as a fine-tuning run."""
    from cluster.plan.finetune import finetune_run, plan_finetune
    from training.engines.deepspeed import OFFLOADS

    _, train = search.load_train_config(name, None, token_budget)
    return {
        (m, o): plan_finetune(finetune_run(train, m, rank, o))[0] for m in ("full", "lora", "head") for o in OFFLOADS
    }


def test_finetune_parameters_are_the_trainers_own():
    """lora: r x (in + out) per adapted linear, on the 7 attention / MLP linears of the 40 layers; head: the diffusion
    head, the projector and the P - 1 query rows; rank 32 doubles the adapters."""
    cfg = get_t2i_config("14B-16x")
    m = cfg.llm
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    D, F = m.hidden_size, m.intermediate_size
    in_out = (D + q) + 2 * (D + kv) + (q + D) + 2 * (D + F) + (F + D)
    plans = finetune_plans()
    lora, head, full = (plans[k, "none"].params for k in ("lora", "head", "full"))
    assert lora.trainable == 16 * in_out * m.num_hidden_layers == 64_225_280
    assert lora.frozen == full.trainable == sum(n for _, n in memory.param_numels(cfg))
    with torch.device("meta"):
        model = TextToImageBitDance(cfg)
    parts = sum(p.numel() for part in (model.vision_head, model.projector) for p in part.parameters())
    assert head.trainable == parts + (cfg.parallel_num - 1) * D
    assert finetune_plans(rank=32)["lora", "none"].params.trainable == 2 * lora.trainable


def test_finetune_memory_is_consistent_and_lora_fits_one_80gb_gpu():
    """The 14B YAML's row on one GPU: lora holds less than head (28x fewer trainable weights), head less than full
    training (as much once the parameters are offloaded: DeepSpeed's buffers cap the GPU's share); every offload step
    lowers the GPU's share and raises the host's; the activations are the same for every method (lora and head
    backpropagate through the frozen backbone); rank-16 LoRA fits one 80 GB GPU without offload, head-only needs the
    parameters offloaded; nothing fits 24 GB at this row, lora with offloaded parameters does at one 1024x1024
    image."""
    from cluster.plan.finetune_report import fits, one_image_budget

    plans = finetune_plans()
    for offload in ("none", "optimizer", "params"):
        lora, head, full = (plans[k, offload] for k in ("lora", "head", "full"))
        assert lora.total < head.total <= full.total  # equal with the parameters offloaded: capped buffers
        assert lora.activations == head.activations == full.activations and lora.working == full.working
    for method in ("full", "lora", "head"):
        none, opt, params = (plans[method, o] for o in ("none", "optimizer", "params"))
        assert none.total > opt.total > params.total and none.host == 0 < opt.host < params.host
        assert opt.optimizer == params.frozen == params.trainable == 0 and opt.frozen == none.frozen
    assert fits(plans["lora", "none"], 80.0) and not fits(plans["head", "optimizer"], 80.0)
    assert fits(plans["head", "params"], 80.0)
    assert not any(fits(p, 24.0) for p in plans.values())
    short = finetune_plans(token_budget=one_image_budget("14B-16x"))
    assert fits(short["lora", "params"], 24.0) and not fits(short["lora", "optimizer"], 24.0)


def test_cli_finetune(capsys):
    assert main(["--finetune", "lora", "--offload", "none", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "14B-16x fine-tuning on 1 GPU(s)" in out and "micro-batch 1 x 37376 positions" in out
    (row,) = [line.split() for line in out.splitlines() if line.startswith("lora")]
    assert row[:4] == ["lora", "none", "2", "64.2M"] and row[-1] == "yes"
    assert main(["--finetune", "head", "--lora-rank", "8", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n| head | ") == 3 and "fits 24 GiB" in out
    assert main(["--finetune", "lora", "--offload", "params", "--zero-stage", "2"]) == 2
    assert "engine.offload=params needs engine.zero_stage=3" in capsys.readouterr().err
    assert main(["--finetune", "dora"]) == 2
    assert "unknown finetune.method 'dora'" in capsys.readouterr().err
