"""Async checkpoint saving under megatron (`checkpoint.async_save`): save_checkpoint returns before the files are
final, training goes on, and the checkpoint that `latest` then names holds exactly what a synchronous save of the
same step holds; `latest` never names a checkpoint that is still being written. Step times with and without it:
tests/benchmarks/bench_async_save.py."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from helpers.megatron_case import case_file, load_case, local_weights, new_engine, step  # noqa: E402
from helpers.megatron_cpu import megatron_in_process  # noqa: E402

from training.checkpoint import latest_checkpoint, save_checkpoint  # noqa: E402
from training.engines.megatron_checkpoint import DIST, load_full, single_process  # noqa: E402


def run(case, run_dir: Path, async_save: bool):
    """Step 1, checkpoint, step 2 (while an async write may still be going on), then wait for the write."""
    overrides = [f"checkpoint.async_save={str(async_save).lower()}"]
    engine = new_engine(case, overrides=overrides)
    ema = engine.new_ema(0.5)
    torch.manual_seed(11)
    assert step(engine, case["batch"]).result.applied
    ema.update(engine.module)
    path = save_checkpoint(run_dir, 1, engine, ema, {}, {"step": 1}, keep_last=2)
    pending = latest_checkpoint(run_dir, quiet=True) is None  # not final yet: written in the background
    torch.manual_seed(22)
    assert step(engine, case["batch"]).result.applied  # training goes on during the write
    after = local_weights(engine)
    engine.wait_saves()
    return path, pending, after


def test_async_save_equals_the_synchronous_checkpoint(tmp_path):
    case_file(tmp_path / "case.pt")
    case = load_case(tmp_path / "case.pt")
    with megatron_in_process():
        sync_path, sync_pending, sync_after = run(case, tmp_path / "sync", async_save=False)
    with megatron_in_process():
        async_path, async_pending, async_after = run(case, tmp_path / "async", async_save=True)
    assert not sync_pending and async_pending  # the async save returned before its checkpoint was final
    assert latest_checkpoint(tmp_path / "async", quiet=True) == async_path  # and `latest` names it once it is
    assert (async_path / "manifest.json").is_file() and not list((tmp_path / "async" / "checkpoints").glob(".*tmp"))
    for k, v in sync_after.items():  # the write in the background does not change training
        assert torch.equal(v, async_after[k]), k
    for prefix in ("model.", "ema.", "optimizer.state.exp_avg."):
        a = single_process(load_full, sync_path / DIST, prefix)
        b = single_process(load_full, async_path / DIST, prefix)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), prefix


def test_async_save_needs_the_megatron_engine():
    from training.config import load_config

    with pytest.raises(ValueError, match="checkpoint.async_save needs engine.kind=megatron"):
        load_config(None, ["checkpoint.async_save=true"])
