"""megatron's real pipeline schedules on CPU (gloo, test harness): every layout of pp in {1, 2, 4} x virtual_pp in
{none, 2} x tp in {1, 2} with at most 4 ranks gives, over 4 micro-batches of different content and lengths (padded to
one fixed length), the loss and gradient norm of the single-stage run (fp32, 1e-6 relative), or is refused by the
config check; interleaving at pp=2 (one neighbour in both directions) is among them. Layouts megatron's schedules
cannot run are refused in one line naming the nearest layout that works."""

import time
from dataclasses import replace

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from helpers.megatron_case import C, P, PrefixIds, load_case, make_case, new_engine, task, train_config  # noqa: E402
from helpers.megatron_cpu import megatron_in_process, save_result, spawn  # noqa: E402

from models.t2i.megatron.config import MegatronParallelConfig, validate_parallel  # noqa: E402
from models.t2i.model import TextToImageBitDance  # noqa: E402
from models.t2i.packing import T2ISample, pack_rows  # noqa: E402
from training.config import grad_accumulation  # noqa: E402

LAYERS, MICRO, BUDGET = 8, 4, 160
LAYOUTS = [  # (tp, pp, virtual_pp)
    (tp, pp, vpp) for pp in (1, 2, 4) for vpp in (None, 2) for tp in (1, 2) if tp * pp <= 4 and (vpp is None or pp >= 2)
]
SINGLE = (1, 1, None)


def refusal(tp: int, pp: int, vpp: int | None, cfg) -> str | None:
    """The config check's one-line error for a layout, None when it accepts it."""
    par = MegatronParallelConfig(tp=tp, pp=pp, virtual_pp=vpp, params_dtype=torch.float32)
    try:
        validate_parallel(cfg, par)
        layout = [f"parallel.virtual_pp={vpp}"] if vpp else []
        grad_accumulation(train_config(tp, pp, *layout, f"data.global_batch={MICRO}"), tp * pp)
    except ValueError as e:
        return str(e)
    return None


def make_pipeline_case(path) -> None:
    """The tiny case, 8 layers deep (pp=4 x virtual_pp=2 needs 8 chunks), head with weights, no bit flips (they are
    drawn on the first stage, a different rank from the diffusion draws under pipelining: see the engine's
    "Randomness"), and 4 one-row micro-batches of different samples and lengths."""
    cfg, *_ = make_case()
    cfg = replace(cfg, flip_p_max=0.0, llm=replace(cfg.llm, num_hidden_layers=LAYERS))
    torch.manual_seed(1)
    ref = TextToImageBitDance(cfg)
    with torch.no_grad():
        for p in ref.vision_head.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(7)

    def sample(n_text, h, w):
        return T2ISample(
            torch.randint(60, 512, (n_text,), generator=g).tolist(), torch.randn(C, h, w, generator=g).sign()
        )

    shapes = [[(8, 8, 8), (5, 4, 12)], [(9, 12, 4)], [(3, 4, 4), (7, 8, 8), (4, 4, 8)], [(12, 8, 12)]]
    micro = [pack_rows([[sample(*s) for s in row]], PrefixIds(), P) for row in shapes]
    assert len({b.input_ids.shape[1] for b in micro}) == MICRO and all(b.input_ids.shape[1] <= BUDGET for b in micro)
    torch.save(dict(cfg=cfg, ref=ref.state_dict(), micro=micro), path)


def run_layout(case, tp: int, pp: int, vpp: int | None) -> tuple[float, float, float]:
    """(loss, grad norm, seconds) of one optimizer step through the engine's schedule."""
    start = time.perf_counter()
    overrides = [f"data.token_budget={BUDGET}", f"data.global_batch={MICRO}"]
    engine = new_engine(case, tp, pp, overrides=[*overrides, *([f"parallel.virtual_pp={vpp}"] if vpp else [])])
    stats = engine.train_step(iter(case["micro"]), task(case["cfg"]), MICRO)
    assert stats.result.applied
    return stats.loss, stats.result.grad_norm, time.perf_counter() - start


def _worker(rank, out_dir, case_path, layouts):
    """The layouts of one world size, one after another in the same process group (dp=1 each)."""
    from megatron.core import parallel_state

    case, results = load_case(case_path), {}
    for layout in layouts:
        results[layout] = run_layout(case, *layout)
        parallel_state.destroy_model_parallel()
    save_result(out_dir, rank, results)


@pytest.mark.slow
def test_every_layout_gives_the_single_stage_loss_and_grad_norm_or_is_refused(tmp_path):
    path = tmp_path / "case.pt"
    make_pipeline_case(path)
    case = load_case(path)
    assert (1, 2, 2) in LAYOUTS and len(LAYOUTS) == 8
    refused = {layout: refusal(*layout, case["cfg"]) for layout in LAYOUTS}
    runnable = [layout for layout in LAYOUTS if refused[layout] is None]
    with megatron_in_process(init_model_parallel=False):
        results = {SINGLE: run_layout(case, *SINGLE)}
    want_loss, want_norm, _ = results[SINGLE]
    for world in (2, 4):
        layouts = [lay for lay in runnable if lay[0] * lay[1] == world]
        ranks = spawn(_worker, world, 0, 0, tmp_path, path, layouts)
        for layout in layouts:
            assert len({r[layout][:2] for r in ranks}) == 1, f"ranks disagree at {layout}: {[r[layout] for r in ranks]}"
            results[layout] = ranks[0][layout]
    report = "\n".join(
        f"tp={tp} pp={pp} virtual_pp={vpp}: "
        + (
            f"refused: {refused[(tp, pp, vpp)]}"
            if (tp, pp, vpp) not in results
            else "loss {:.9f} grad norm {:.9f} ({:.1f}s)".format(*results[(tp, pp, vpp)])
        )
        for tp, pp, vpp in LAYOUTS
    )
    print("\n" + report)
    for layout, (loss, norm, _) in results.items():
        assert abs(loss - want_loss) <= 1e-6 * abs(want_loss), f"{layout}: loss {loss} vs {want_loss}\n{report}"
        assert abs(norm - want_norm) <= 1e-6 * abs(want_norm), f"{layout}: grad norm {norm} vs {want_norm}\n{report}"
    assert set(results) | {lay for lay in LAYOUTS if refused[lay]} == set(LAYOUTS)


@pytest.mark.parametrize(
    "layout, overrides, problem, fix",
    [
        (dict(pp=2, virtual_pp=1), (), "virtual_pp=1 is not interleaving", "virtual_pp=None"),
        (dict(pp=1, virtual_pp=2), (), "virtual_pp=2 interleaves pipeline stages", "set pp >= 2"),
        (dict(pp=4, virtual_pp=4), (), "does not divide the 8 layers", "choose pp * virtual_pp dividing"),
        (dict(pp=2, virtual_pp=2), ("data.global_batch=3",), "multiple of parallel.pp 2", "change data.global_batch"),
    ],
)
def test_layouts_the_schedules_cannot_run_are_refused_in_one_line(layout, overrides, problem, fix):
    cfg = replace(make_case()[0], llm=replace(make_case()[0].llm, num_hidden_layers=LAYERS))
    with pytest.raises(ValueError) as info:
        validate_parallel(cfg, MegatronParallelConfig(**layout))
        vpp = [f"parallel.virtual_pp={layout['virtual_pp']}"]
        grad_accumulation(train_config(1, layout["pp"], *vpp, *overrides), layout["pp"])
    msg = str(info.value)
    assert "\n" not in msg and problem in msg and fix in msg, msg


def _uneven_worker(rank, out_dir, case_path, pp_layers):
    case = load_case(case_path)
    layers = "[" + ",".join(map(str, pp_layers)) + "]"
    overrides = [f"data.token_budget={BUDGET}", f"data.global_batch={MICRO}", f"parallel.pp_layers={layers}"]
    engine = new_engine(case, 1, len(pp_layers), overrides=overrides)
    counts = [len(c.decoder.layers) for c in engine.chunks]
    stats = engine.train_step(iter(case["micro"]), task(case["cfg"]), MICRO)
    save_result(out_dir, rank, (stats.loss, stats.result.grad_norm, counts))


@pytest.mark.slow
def test_uneven_pipeline_split_gives_the_single_stage_loss(tmp_path):
    """`parallel.pp_layers`: the last stage (LM head + diffusion head) takes fewer layers; same numbers as pp=1."""
    path = tmp_path / "case.pt"
    make_pipeline_case(path)
    case = load_case(path)
    with megatron_in_process(init_model_parallel=False):
        want_loss, want_norm, _ = run_layout(case, *SINGLE)
    ranks = spawn(_uneven_worker, 2, 0, 0, tmp_path, path, [5, 3])
    assert [r[2] for r in ranks] == [[5], [3]]
    for loss, norm, _ in ranks:
        assert abs(loss - want_loss) <= 1e-6 * abs(want_loss) and abs(norm - want_norm) <= 1e-6 * abs(want_norm)


@pytest.mark.parametrize(
    "pp, pp_layers, vpp, problem",
    [
        (2, [5, 2], None, "adding up to the 8 layers"),
        (4, [1, 3, 2, 2], None, "only the first and last stages may differ"),
        (2, [6, 2], 2, "with virtual_pp is not supported"),
    ],
)
def test_bad_pp_layers_are_refused_in_one_line(pp, pp_layers, vpp, problem):
    cfg = replace(make_case()[0], llm=replace(make_case()[0].llm, num_hidden_layers=LAYERS))
    with pytest.raises(ValueError, match=problem) as info:
        validate_parallel(cfg, MegatronParallelConfig(pp=pp, pp_layers=pp_layers, virtual_pp=vpp))
    assert "\n" not in str(info.value)
