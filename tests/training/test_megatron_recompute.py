"""Activation recompute on the megatron engine. Through the training loop (`training.train.train`, engine.kind=megatron
under the CPU harness) a tiny T2I run gives the same losses and gradient norms with recompute as without, at tp=2 with
sequence parallelism and at pp=2; recompute really reruns the attention while the attention mask is built once per
forward of a stage; the diffusion head's recompute keeps every parameter and checkpoint key; the `parallel` recompute
settings map onto megatron's and impossible ones fail in one line."""

from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from helpers.megatron_case import make_case, new_engine, train_config  # noqa: E402
from helpers.megatron_cpu import megatron_in_process, save_result, spawn  # noqa: E402

from models.t2i.megatron.config import MegatronParallelConfig, transformer_config, validate_parallel  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
RUNS = {  # (layout, recompute) -> overrides
    ("tp2_sp", "off"): ["parallel.tp=2", "parallel.sequence_parallel=true"],
    ("tp2_sp", "full"): ["parallel.tp=2", "parallel.sequence_parallel=true", "model.activation_checkpointing=true"],
    ("tp2_sp", "selective"): ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.recompute=selective"],
    ("pp2", "off"): ["parallel.pp=2"],
    ("pp2", "full"): [
        "parallel.pp=2",
        "parallel.recompute=full",
        "parallel.recompute_method=block",
        "parallel.recompute_num_layers=1",
    ],
}


def _loop_worker(rank, out_dir, data_dir, root):
    """Every run of RUNS through `training.train.train`, one after another in this process group, counting core
    attention calls and attention-mask builds on this rank."""
    import json

    from megatron.core import parallel_state

    from models.t2i.megatron import attention
    from training.config import load_config
    from training.train import train

    calls = Counter()
    forward, build = attention.BlockCausalCoreAttention.forward, attention.build_mask

    def counted_forward(self, *args, **kwargs):
        calls["attention"] += 1
        return forward(self, *args, **kwargs)

    def counted_build(*args, **kwargs):
        calls["mask"] += 1
        return build(*args, **kwargs)

    attention.BlockCausalCoreAttention.forward, attention.build_mask = counted_forward, counted_build
    results = {}
    for (layout, mode), overrides in RUNS.items():
        calls.clear()
        run_dir = root / f"{layout}_{mode}"
        base = [f"run_dir={run_dir}", f"data.data_dir={data_dir}", "engine.kind=megatron", "logging.every=1"]
        base += [
            f"schedule.total_steps={STEPS}",
            "schedule.warmup_steps=1",
            "checkpoint.every=0",
            "logging.wandb=disabled",
        ]
        base += ["checkpoint.export_official=false"]
        train(load_config(REPO / "training" / "configs" / "tiny_t2i.yaml", [*base, *overrides]))
        parallel_state.destroy_model_parallel()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
        results[(layout, mode)] = ([(r["step"], r["loss"], r["grad_norm"]) for r in rows], dict(calls))
    save_result(out_dir, rank, results)


@pytest.mark.slow
def test_recompute_changes_no_loss_and_no_grad_norm_through_the_loop(tmp_path):
    from helpers.data import make_t2i_data

    data = make_t2i_data(tmp_path / "data")["tokens"]
    ranks = spawn(_loop_worker, 2, 0, 0, tmp_path, data, tmp_path / "runs")
    logs = {run: log for run, (log, _) in ranks[0].items()}
    for (layout, mode), log in logs.items():
        print(f"\n{layout} recompute={mode}: (step, loss, grad norm) {log}; rank 0 calls {ranks[0][(layout, mode)][1]}")
    for (layout, mode), log in logs.items():
        off = logs[(layout, "off")]
        assert [s for s, _, _ in log] == list(range(1, STEPS + 1)), log
        for (_, loss, norm), (_, want_loss, want_norm) in zip(log, off, strict=True):
            assert abs(loss - want_loss) <= 1e-6 * abs(want_loss), (layout, mode, log, off)
            assert abs(norm - want_norm) <= 1e-6 * abs(want_norm), (layout, mode, log, off)
    for rank in ranks:
        counts = {run: c for run, (_, c) in rank.items()}
        for (layout, mode), c in counts.items():
            off = counts[(layout, "off")]
            assert c["mask"] == off["mask"] > 0, (layout, mode, c, off)  # once per forward of a stage, never rerun
            # the tiny model has one layer per pp=2 stage, which block recompute (1 layer per chunk) reruns
            assert c["attention"] == (1 if mode == "off" else 2) * off["attention"], (layout, mode, c, off)


def test_recompute_settings_map_onto_megatron():
    from training.engines.megatron import parallel_config

    cfg = make_case()[0]  # 2 layers
    assert parallel_config(train_config()).recompute is None
    assert parallel_config(train_config(1, 1, "model.activation_checkpointing=true")).recompute == "full"
    selective = train_config(1, 1, "model.activation_checkpointing=true", "parallel.recompute=selective")
    assert parallel_config(selective).recompute == "selective"  # the parallel section wins
    fp32 = dict(params_dtype=torch.float32, use_cpu_initialization=True)
    full = transformer_config(cfg, MegatronParallelConfig(recompute="full", **fp32))
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "uniform", 1)
    block = MegatronParallelConfig(recompute="full", recompute_method="block", recompute_num_layers=2, **fp32)
    block = transformer_config(cfg, block)
    assert (block.recompute_granularity, block.recompute_method, block.recompute_num_layers) == ("full", "block", 2)
    sel = transformer_config(cfg, MegatronParallelConfig(recompute="selective", **fp32))
    assert (sel.recompute_granularity, sel.recompute_modules, sel.recompute_num_layers) == (
        "selective",
        ["core_attn"],
        None,
    )
    assert transformer_config(cfg, MegatronParallelConfig(**fp32)).recompute_granularity is None


@pytest.mark.parametrize(
    "par, problem, fix",
    [
        (dict(recompute="some"), "unknown recompute 'some'", "choose null, 'full' or 'selective'"),
        (dict(recompute="selective", recompute_num_layers=1), "apply to recompute='full' only", "leave them unset"),
        (dict(recompute_method="block"), "apply to recompute='full' only", "set recompute='full'"),
        (dict(recompute="full", recompute_method="blocks"), "unknown recompute_method 'blocks'", "choose one of"),
        (dict(recompute="full", recompute_method="block"), "needs recompute_num_layers", "layers recomputed per"),
        (dict(recompute="full", recompute_num_layers=3), "must be in [1, 2]", "layers of one model chunk"),
        (dict(recompute="full", recompute_num_layers=2, pp=2), "must be in [1, 1]", "layers of one model chunk"),
    ],
)
def test_impossible_recompute_settings_fail_in_one_line(par, problem, fix):
    with pytest.raises(ValueError) as info:
        validate_parallel(make_case()[0], MegatronParallelConfig(**par))
    msg = str(info.value)
    assert "\n" not in msg and problem in msg and fix in msg, msg


def test_uniform_recompute_groups_must_divide_the_layers_of_a_chunk():
    from dataclasses import replace

    cfg = make_case()[0]
    cfg = replace(cfg, llm=replace(cfg.llm, num_hidden_layers=6))
    with pytest.raises(ValueError, match="must divide the 3 layers of a model chunk; choose a divisor of 3"):
        validate_parallel(cfg, MegatronParallelConfig(pp=2, recompute="full", recompute_num_layers=2))
    validate_parallel(
        cfg, MegatronParallelConfig(pp=2, recompute="full", recompute_method="block", recompute_num_layers=2)
    )


def test_head_recompute_keeps_parameter_and_checkpoint_keys():
    """With full recompute the engine reruns the diffusion head's blocks too: same parameter names (optimizer groups,
    EMA keys), state-dict keys and dist_checkpointing keys as without."""
    case = dict(zip(("cfg", "ref", "batch", "head_t", "head_noise"), make_case(), strict=True))
    case["ref"] = case["ref"].state_dict()
    keys = {}
    for mode in ("off", "full"):
        overrides = ("parallel.recompute=full",) if mode == "full" else ()
        with megatron_in_process(init_model_parallel=False):
            engine = new_engine(case, overrides=overrides)
            (chunk,) = engine.chunks
            rerun = all("forward" in vars(block) for block in chunk.vision_head.net.res_blocks)
            keys[mode] = (
                [n for n, _ in chunk.named_parameters()],
                list(chunk.state_dict()),
                sorted(chunk.sharded_state_dict(prefix="model.")),
                rerun,
            )
    assert keys["full"][:3] == keys["off"][:3]
    assert keys["full"][3] and not keys["off"][3]
