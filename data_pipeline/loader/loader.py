"""`BinaryTokenLoader`: iterates a rank's batches through a torch DataLoader and saves / restores its position.

Resumption is by deterministic replay. With endless streams the DataLoader hands out batches round-robin over
its workers, so from the number of batches consumed n every worker knows how many batches it had produced; a
fresh iterator fast-forwards each worker's pipeline by that many batches (without building their tensors) and
rotates the worker roles so that its first batch is batch n of the uninterrupted run. Another world size or worker
count resizes the stream (`data_pipeline.loader.resize`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader

from data_pipeline.loader.batching import Batch, Counters
from data_pipeline.loader.dataset import BinaryTokenDataset
from data_pipeline.loader.resize import SampleKey, StreamOrigin
from data_pipeline.loader.settings import LoaderConfig

T = TypeVar("T")


def default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _identity(x: T) -> T:
    return x


class BinaryTokenLoader:
    """Iterate to get batches (`PackedT2IBatch` or (bits, labels)); `state_dict` / `load_state_dict` resume exactly.

    Every `iter()` continues after the last batch handed out (replaying the workers' pipelines), so break out of
    a loop and iterate again, or save the state and load it into a fresh loader: the batches are the same.
    """

    def __init__(self, cfg: LoaderConfig, rank: int | None = None, world_size: int | None = None):
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither (then torch.distributed decides)")
        if rank is None:
            rank, world_size = default_rank_world()
        self.cfg = cfg
        self.dataset = BinaryTokenDataset(cfg, rank, world_size)
        self.batches_consumed = 0
        self.max_epoch = 0  # the latest epoch of a sample handed out
        self._counters = Counters()

    def __iter__(self) -> Iterator[Batch | tuple[Batch, list[SampleKey]]]:
        self.dataset.start_batch = self.batches_consumed
        # its own generator: creating the iterator must not draw from the global RNG (exact training resume)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_identity, generator=gen
        )
        for batch, info in loader:
            self.batches_consumed += 1
            self.max_epoch = max(self.max_epoch, info.epoch)
            self._counters.add(info.counters)
            yield (batch, info.keys) if self.cfg.debug_keys else batch

    def stats(self) -> dict[str, float]:
        c = self._counters
        fill = c.row_tokens / (c.rows * self.cfg.token_budget) if c.rows else 0.0
        return {
            "batches": self.batches_consumed,
            "samples_seen": c.samples,
            "skipped_too_long": c.skipped_too_long,
            "filtered_out": c.filtered_out,
            "rows": c.rows,
            "fill_ratio": fill,
        }

    def state_dict(self) -> dict[str, Any]:
        d = self.dataset
        return {
            "batches_consumed": self.batches_consumed,
            "max_epoch": self.max_epoch,
            "seed": self.cfg.seed,
            "num_workers": self.cfg.num_workers,
            "world_size": d.world_size,
            "rank": d.rank,
            "dataset": d.fingerprint,
            "settings": self.cfg.stream_settings(),
            "origin": d.origin.to_dict() if d.origin else None,
            "counters": asdict(self._counters),
        }

    def load_state_dict(self, sd: dict[str, Any], all_ranks: list[dict[str, Any]] | None = None) -> None:
        """Continue after `sd["batches_consumed"]` batches. The rank may differ (all ranks consume the same number
        of batches, so one rank's state serves every rank). With another world size or worker count the states of
        all the previous ranks (`all_ranks`) resize the streams (`data_pipeline.loader.resize`); anything else that
        shapes the stream must match."""
        mine = self.state_dict()
        # the settings this loader's stream depends on (an older state may record more: those are not compared)
        sd = {**sd, "settings": {k: sd.get("settings", {}).get(k) for k in mine["settings"]}}
        for key in ("dataset", "seed", "settings"):
            if sd.get(key) != mine[key]:
                raise ValueError(
                    f"loader state is incompatible: {key} was {sd.get(key)!r}, this loader has {mine[key]!r}; "
                    "resuming needs the same data, seed and batching settings"
                )
        self._counters = Counters(**sd.get("counters", {}))
        if (sd["world_size"], sd["num_workers"]) == (mine["world_size"], mine["num_workers"]):
            self.batches_consumed = int(sd["batches_consumed"])
            self.max_epoch = int(sd.get("max_epoch", 0))
            self.dataset.origin = StreamOrigin.from_dict(sd.get("origin"))
            return
        if all_ranks is None or sorted(s["rank"] for s in all_ranks) != list(range(sd["world_size"])):
            raise ValueError(
                f"resizing the data stream from {sd['world_size']} ranks x {sd['num_workers']} workers needs the "
                f"loader states of all {sd['world_size']} previous ranks"
            )
        if len({int(s["batches_consumed"]) for s in all_ranks}) != 1:
            raise ValueError("the previous ranks' loader states were taken at different batch counts")
        self.dataset.origin = StreamOrigin(
            world_size=int(sd["world_size"]),
            num_workers=int(sd["num_workers"]),
            batches_consumed=int(sd["batches_consumed"]),
            max_epoch=max(int(s.get("max_epoch", 0)) for s in all_ranks),
            parent=StreamOrigin.from_dict(sd.get("origin")),
        )
        self.batches_consumed = 0
        self.max_epoch = self.dataset.origin.max_epoch
