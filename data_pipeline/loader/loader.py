"""`BinaryTokenLoader`: iterates a rank's batches through a torch DataLoader and saves / restores its position.

Resumption is by deterministic replay. With endless streams the DataLoader hands out batches round-robin over
its workers, so from the number of batches consumed n every worker knows how many batches it had produced; a
fresh iterator fast-forwards each worker's pipeline by that many batches (without building their tensors) and
rotates the worker roles so that its first batch is batch n of the uninterrupted run. Another world size or worker
count resizes the stream (`data_pipeline.loader.resize`). A mixture's state adds its weight stages (other weights at
a resume start a new stage there: `data_pipeline.loader.mixture`), each source's latest epoch, and the samples each
of the rank's workers had drawn per source, which the replay checks. Per-source sample and token counts are kept for
the logs (`stats()`: data/<source name>/samples, /tokens, with `data.sources`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader

from data_pipeline.loader.batching import Batch, Counters
from data_pipeline.loader.dataset import BatchInfo, BinaryTokenDataset
from data_pipeline.loader.mixture import same_weights
from data_pipeline.loader.resize import SampleKey, StreamOrigin
from data_pipeline.loader.settings import LoaderConfig, LoaderError
from data_pipeline.loader.shard_store import CacheCounts

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
        n = len(self.dataset.sources)
        self.max_epochs = [0] * n  # per source
        self.source_counts = [[0, 0] for _ in range(n)]  # per source: samples, tokens handed out
        self.draws: dict[int, list[int]] = {}  # a mixture's samples drawn per source, by logical worker
        self.cache = CacheCounts()  # shard downloads, hits, evictions of the reading processes (data at a URL)

    def _count(self, info: BatchInfo) -> None:
        self.max_epoch = max(self.max_epoch, info.epoch)
        self._counters.add(info.counters)
        for i, (samples, tokens, epoch) in enumerate(info.sources):
            self.source_counts[i][0] += samples
            self.source_counts[i][1] += tokens
            self.max_epochs[i] = max(self.max_epochs[i], epoch)
        if info.draws is not None:
            self.draws[self.batches_consumed % self.dataset.workers] = info.draws
        for k, v in info.cache.items():
            setattr(self.cache, k, getattr(self.cache, k) + v)

    def __iter__(self) -> Iterator[Batch | tuple[Batch, list[SampleKey]]]:
        self.dataset.start_batch = self.batches_consumed
        # its own generator: creating the iterator must not draw from the global RNG (exact training resume)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_identity, generator=gen
        )
        for batch, info in loader:
            self._count(info)
            self.batches_consumed += 1
            yield (batch, info.keys) if self.cfg.debug_keys else batch

    def stats(self) -> dict[str, float]:
        """Counts of this rank: batches, samples, drops, packing fill; the shard cache's (data at a URL); with
        `data.sources` the samples and tokens of each source (data/<name>/samples, data/<name>/tokens)."""
        c = self._counters
        fill = c.row_tokens / (c.rows * self.cfg.token_budget) if c.rows else 0.0
        out = {
            "batches": self.batches_consumed,
            "samples_seen": c.samples,
            "skipped_too_long": c.skipped_too_long,
            "filtered_out": c.filtered_out,
            "rows": c.rows,
            "fill_ratio": fill,
        }
        if any(s.store.remote for s in self.dataset.sources):
            out |= asdict(self.cache)
        if self.cfg.sources:
            for source, (samples, tokens) in zip(self.dataset.sources, self.source_counts, strict=True):
                out |= {f"data/{source.name}/samples": samples, f"data/{source.name}/tokens": tokens}
        return out

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
            "source_counts": [list(c) for c in self.source_counts],
            **({"mixture": self._mixture_state()} if d.mixture else {}),
        }

    def _mixture_state(self) -> dict[str, Any]:
        d = self.dataset
        return {
            "sources": [{"name": s.name, "dataset": s.fingerprint} for s in d.sources],
            "stages": [[n, list(w)] for n, w in d.stages],
            "max_epochs": list(self.max_epochs),
            "draws": {str(k): list(v) for k, v in sorted(self.draws.items())},
        }

    def load_state_dict(self, sd: dict[str, Any], all_ranks: list[dict[str, Any]] | None = None) -> None:
        """Continue after `sd["batches_consumed"]` batches. The rank may differ (all ranks consume the same number
        of batches, so one rank's state serves every rank). With another world size or worker count the states of
        all the previous ranks (`all_ranks`) resize the streams (`data_pipeline.loader.resize`); anything else that
        shapes the stream must match, except a mixture's weights (a new stage from here)."""
        mine = self.state_dict()
        # the settings this loader's stream depends on (an older state may record more: those are not compared)
        sd = {**sd, "settings": {k: sd.get("settings", {}).get(k) for k in mine["settings"]}}
        self._check_sources(sd.get("mixture"), mine.get("mixture"))
        for key in ("dataset", "seed", "settings"):
            if sd.get(key) != mine[key]:
                raise ValueError(
                    f"loader state is incompatible: {key} was {sd.get(key)!r}, this loader has {mine[key]!r}; "
                    "resuming needs the same data, seed and batching settings"
                )
        self._counters = Counters(**sd.get("counters", {}))
        d, mixture = self.dataset, sd.get("mixture") or {}
        stages = [(int(n), list(w)) for n, w in mixture.get("stages", [[0, d.weights]])]
        if (sd["world_size"], sd["num_workers"]) == (mine["world_size"], mine["num_workers"]):
            self.batches_consumed = int(sd["batches_consumed"])
            self.max_epoch = int(sd.get("max_epoch", 0))
            self.max_epochs = list(mixture.get("max_epochs", [self.max_epoch]))
            self.source_counts = [list(c) for c in sd.get("source_counts", self.source_counts)]
            d.origin = StreamOrigin.from_dict(sd.get("origin"))
            if not same_weights(stages[-1][1], d.weights):  # a new stage: the new weights from here on
                stages.append((self.batches_consumed, d.weights))
            d.stages = stages
            if d.mixture and int(sd["rank"]) == d.rank:  # this rank's own draws: the replay must reach them
                self.draws = {int(k): list(v) for k, v in mixture.get("draws", {}).items()}
                d.expected_draws = dict(self.draws)
            return
        if all_ranks is None or sorted(s["rank"] for s in all_ranks) != list(range(sd["world_size"])):
            raise ValueError(
                f"resizing the data stream from {sd['world_size']} ranks x {sd['num_workers']} workers needs the "
                f"loader states of all {sd['world_size']} previous ranks"
            )
        if len({int(s["batches_consumed"]) for s in all_ranks}) != 1:
            raise ValueError("the previous ranks' loader states were taken at different batch counts")
        epochs = [s.get("mixture", {}).get("max_epochs") for s in all_ranks]
        d.origin = StreamOrigin(
            world_size=int(sd["world_size"]),
            num_workers=int(sd["num_workers"]),
            batches_consumed=int(sd["batches_consumed"]),
            max_epoch=max(int(s.get("max_epoch", 0)) for s in all_ranks),
            parent=StreamOrigin.from_dict(sd.get("origin")),
            stages=[[n, w] for n, w in stages] if d.mixture else None,
            max_epochs=[max(e[i] for e in epochs) for i in range(len(d.sources))] if d.mixture else None,
        )
        self.batches_consumed = 0
        self.max_epoch = d.origin.max_epoch
        self.max_epochs = [d.origin.max_epoch_of(i) for i in range(len(d.sources))]
        if d.rank == 0:  # the previous ranks' per-source counts, once over the new ranks (the logs sum them)
            self.source_counts = [
                [sum(s.get("source_counts", [[0, 0]] * len(d.sources))[i][j] for s in all_ranks) for j in (0, 1)]
                for i in range(len(d.sources))
            ]

    def _check_sources(self, saved: dict | None, mine: dict | None) -> None:
        """A mixture resumes over the same datasets in the same order (only the weights may change)."""
        if saved is None or mine is None:
            return
        was = [s["dataset"] for s in saved["sources"]]
        now = [s["dataset"] for s in mine["sources"]]
        if was != now:
            names = ", ".join(f"{s['name']} ({s['dataset']})" for s in saved["sources"])
            raise LoaderError(
                f"data.sources differ from the checkpoint's ({names}); resume with the same datasets in the same "
                "order (only the weights may change; weight 0 pauses a source) or start a new run"
            )
