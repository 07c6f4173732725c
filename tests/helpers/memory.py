"""Peak CPU memory of real code from the allocator's own records (test-only): torch's profiler with
`profile_memory=True` logs every CPU allocation and free (address and size) the traced thread makes, from which the
bytes live at any moment of a traced region follow exactly: parameters, DDP buffers, optimizer and EMA state, saved
activations and every temporary.

Only allocations made while tracing count (memory that existed before is neither added nor, when freed, subtracted),
so start the trace before building what should be counted. A block freed on another thread (gloo's worker threads
drop the last reference to the tensors of asynchronous collectives) leaves no record; it is taken as freed when the
allocator hands its address out again.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class RegionMemory:
    start: int  # bytes live (allocated during the trace) when the region began
    peak: int  # most bytes live at any moment inside it


class AllocationTrace:
    """`with AllocationTrace() as trace: ...; with trace.region("step"): ...`; then `trace.memory("step")`."""

    def __init__(self) -> None:
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._live: list[tuple[int, int]] = []  # (time ns, bytes allocated by this trace and alive after the event)
        self._regions: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> AllocationTrace:
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        from torch._C._profiler import _EventType

        events = []
        stack = list(self._profile.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
            elif node.name in self._regions:
                self._regions[node.name] = (node.start_time_ns, node.end_time_ns)
            stack.extend(node.children)
        blocks: dict[int, int] = {}  # address -> size of the live blocks allocated during the trace
        live = 0
        for t, ptr, size in sorted(events):
            if size > 0:
                live += size - blocks.get(ptr, 0)  # an address handed out again: its old block was freed elsewhere
                blocks[ptr] = size
            elif ptr in blocks:
                live -= blocks.pop(ptr)
            self._live.append((t, live))

    def region(self, name: str):
        """A named region to read back after the trace (a profiler range)."""
        self._regions[name] = (0, 0)
        return record_function(name)

    def memory(self, name: str) -> RegionMemory:
        begin, end = self._regions[name]
        if end <= begin:
            raise ValueError(f"region {name!r} was not recorded")
        before = [live for t, live in self._live if t < begin]
        start = before[-1] if before else 0
        inside = [live for t, live in self._live if begin <= t <= end]
        return RegionMemory(start, max([start, *inside]))
