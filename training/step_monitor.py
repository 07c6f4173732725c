"""What a training step costs, as the loop logs it: the time spent waiting for data (`TimedBatches`), the time this
rank spent computing forwards (`ForwardClock`, which the engines hold: under synchronizing collectives every rank's
step takes as long as the slowest one's, so only its own compute time shows which rank is slow; `straggler` compares
them), the peak memory of this rank (`peak_memory_gib`), a torch profiler trace over a window of steps
(`ProfileWindow`, `profile.steps`) and a CUDA allocator snapshot at one step (`memory.snapshot_step`). Nothing here
changes what is computed."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from training.faults import maybe_slow_down

GiB = 2**30


class TimedBatches:
    """An iterator of batches that adds up the seconds its consumer waited for them (`take` reads and resets)."""

    def __init__(self, batches: Iterator):
        self.batches, self.waited = batches, 0.0

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.waited += time.perf_counter() - start

    def take(self) -> float:
        waited, self.waited = self.waited, 0.0
        return waited


class ForwardClock:
    """Adds up the seconds of this rank's forward computations (`with clock:` around each; `take` reads and resets):
    wall time on the CPU, CUDA events on a GPU (read at `take`, after the step synchronized), so that it measures the
    kernels, not their launch."""

    def __init__(self, cuda: bool):
        self.cuda, self.seconds = cuda, 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __enter__(self) -> ForwardClock:
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        else:
            self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.events[-1][1].record()
        else:
            elapsed = time.perf_counter() - self.started
            self.seconds += elapsed + maybe_slow_down(elapsed)

    def take(self) -> float:
        if self.events:
            self.events[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.events) / 1000
            self.events = []
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def straggler(forward_s: list[float], fraction: float) -> tuple[int, float, float] | None:
    """(rank, its forward seconds, the median over ranks) when the slowest rank's forward time is more than `fraction`
    above the median of all ranks' (None otherwise, or with fewer than 2 ranks)."""
    if len(forward_s) < 2:
        return None
    ordered = sorted(forward_s)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    slowest = max(range(len(forward_s)), key=forward_s.__getitem__)
    if forward_s[slowest] > (1 + fraction) * median:
        return slowest, forward_s[slowest], median
    return None


def peak_memory_gib(device: torch.device) -> float:
    """This rank's peak memory since the last call: the CUDA allocator's peak on a GPU (then reset), the process's
    peak resident set on a CPU (a peak over the life of the process: the OS keeps no resettable one)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / GiB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / GiB


class ProfileWindow:
    """torch.profiler over the training steps `first..last` (1-based, as logged): a chrome trace per rank
    (`<run_dir>/profile/rank_<r>.json`, chrome://tracing or Perfetto) and its op summary (`rank_<r>_ops.txt`)."""

    def __init__(self, steps: list[int], run_dir: str | Path, rank: int, cuda: bool):
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.out, self.rank, self.cuda = Path(run_dir) / "profile", rank, cuda
        self.profiler = None

    def before(self, step: int) -> None:
        """Called before step `step` runs."""
        if step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()

    def after(self, step: int) -> Path | None:
        """Called after step `step` ran; returns the trace when the window closed."""
        if self.profiler is None or step != self.last:
            return None
        self.profiler.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"rank_{self.rank:05d}.json"
        self.profiler.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = self.profiler.key_averages().table(sort_by=sort, row_limit=40)
        (self.out / f"rank_{self.rank:05d}_ops.txt").write_text(table + "\n")
        self.profiler = None
        return trace


class MemorySnapshot:
    """The CUDA caching allocator's history and state at step `step` (`memory.snapshot_step`; 0 = off), written to
    `<run_dir>/memory/rank_<r>_step_<n>.pickle` for pytorch.org/memory_viz. Without CUDA it says so once."""

    def __init__(self, step: int, run_dir: str | Path, rank: int, cuda: bool):
        self.step, self.rank, self.cuda = step, rank, cuda
        self.path = Path(run_dir) / "memory" / f"rank_{rank:05d}_step_{step:08d}.pickle"
        if step and cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        elif step and rank == 0:
            print("memory.snapshot_step needs CUDA (the allocator snapshot is CUDA's); no snapshot on CPU", flush=True)

    def after(self, step: int) -> Path | None:
        if not (self.cuda and self.step and step == self.step):
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(self.path))
        torch.cuda.memory._record_memory_history(enabled=None)
        return self.path
