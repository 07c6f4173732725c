"""What the loop logs about a step's cost: a torch profiler trace per rank over `profile.steps`, and on every logged
step where the time went (data, forward+backward, optimizer, checkpoint) and the peak memory per rank; none of it
changes a loss."""

import json

import pytest
import torch
from helpers.data import make_t2i_data
from test_training import losses, run

from training.config import load_config
from training.step_monitor import TimedBatches, peak_memory_gib


def test_timed_batches_add_up_the_wait_and_reset_when_read():
    def slow():
        for i in range(3):
            torch.ones(256, 256) @ torch.ones(256, 256)
            yield i

    batches = TimedBatches(slow())
    assert list(batches) == [0, 1, 2] and batches.waited > 0
    assert batches.take() > 0 and batches.take() == 0.0


def test_peak_memory_on_cpu_is_the_resident_peak():
    held = torch.ones(64, 2**20 // 4)  # 64 MiB
    assert peak_memory_gib(torch.device("cpu")) >= held.numel() * 4 / 2**30


def test_profile_steps_must_be_a_window():
    for bad in ("[3]", "[3,2]", "[0,1]"):
        with pytest.raises(ValueError, match=r"profile.steps must be \[first, last\]"):
            load_config(None, [f"profile.steps={bad}"])


@pytest.mark.slow
def test_profiled_two_process_run_writes_a_trace_per_rank_and_logs_costs(tmp_path):
    data = make_t2i_data(tmp_path / "data")
    common = ["schedule.total_steps=4", "schedule.warmup_steps=1", "checkpoint.every=2"]
    run(tmp_path / "plain", data, *common)
    run(tmp_path / "profiled", data, *common, "profile.steps=[2,3]")
    assert losses(tmp_path / "profiled") == losses(tmp_path / "plain")  # bit for bit
    for rank in (0, 1):
        trace = json.loads((tmp_path / "profiled" / "profile" / f"rank_{rank:05d}.json").read_text())
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert any("aten::" in n for n in names), sorted(names)[:20]
        assert "Self CPU" in (tmp_path / "profiled" / "profile" / f"rank_{rank:05d}_ops.txt").read_text()
    rows = [json.loads(line) for line in (tmp_path / "profiled" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        parts = [row[f"time/{k}_s"] for k in ("data", "forward_backward", "optimizer", "checkpoint")]
        assert all(v >= 0 for v in parts) and parts[1] > 0, row
        assert row["memory/peak_gib"] >= row["memory/peak_gib_min"] > 0 and row["memory/peak_rank"] in (0, 1)
    after_save = {r["step"]: r["time/checkpoint_s"] for r in rows}
    assert after_save[3] > 0 and after_save[2] == 0  # step 2's checkpoint is written after step 2 is logged
