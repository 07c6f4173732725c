"""Held-out validation: the run's fixed validation set and its loss at `eval.every`.

The set is `data.val_dir`, else the `val/` split `python -m data_pipeline.tokenize --val-fraction F` writes beside the
training shards: its first `eval.val_samples` samples in manifest order (the subset filters apply, caption dropout does
not), packed once into batches of `data.micro_batch` rows by the loader's own batching, the same batches for every
engine and layout. Batch i goes to data-parallel replica i mod dp (a replica short of batches runs a filler whose sums
are dropped, so that every replica runs as many forwards: ZeRO-3 gathers parameters inside each). The engine runs them
forward only with the trained weights, in eval mode (no bit flips, no label dropout), each batch with the diffusion
head's draws fixed by (seed, batch index) (`Task.validation_inputs`), and returns the summed text cross-entropy,
vision loss and their token counts over every replica; the logged `val/*` values are token-weighted means. So the
value does not depend on the engine, ZeRO stage, TP/PP/VPP layout or data-parallel size (up to float summation
order), and the training data stream, its resume state and every RNG stream are untouched (the RNG is forked).
"""

from __future__ import annotations

import fsspec
import torch

from data_pipeline.loader import LoaderConfig
from data_pipeline.loader.batching import Counters, Plan
from data_pipeline.loader.dataset import BinaryTokenDataset
from data_pipeline.loader.settings import LoaderError
from data_pipeline.loader.shard_store import ShardStore
from data_pipeline.shard_format import MANIFEST, VAL_DIR
from training.config import TrainConfig


def validation_dir(cfg: TrainConfig) -> str | None:
    """`data.val_dir` (which must hold a tokenized dataset), else `<data.data_dir>/val` when tokenization wrote one (not
    for a mixture of `data.sources`: name its validation set). Folders or fsspec URLs."""
    if cfg.data.val_dir:
        if not _has_manifest(cfg.data.val_dir):
            raise LoaderError(
                f"data.val_dir={cfg.data.val_dir} holds no {MANIFEST}; point it at a tokenized dataset (or tokenize "
                "with --val-fraction and leave it unset)"
            )
        return cfg.data.val_dir
    if cfg.data.sources:
        return None
    split = f"{str(cfg.data.data_dir).rstrip('/')}/{VAL_DIR}"
    return split if _has_manifest(split) else None


def _has_manifest(url: str) -> bool:
    fs, root = fsspec.core.url_to_fs(url)
    return fs.isfile(f"{root.rstrip('/')}/{MANIFEST}")


class HeldOut:
    """This data-parallel replica's share of the validation batches; `loss(engine)` at every evaluation."""

    def __init__(self, cfg: TrainConfig, task, path: str, dp_rank: int, dp_size: int):
        self.task, self.path = task, path
        if not sum(int(s["samples"]) for s in ShardStore(path).manifest()["shards"]):
            raise LoaderError(
                f"the validation set {path} holds no sample; tokenize with a larger --val-fraction or set data.val_dir"
            )
        settings = LoaderConfig.from_settings(cfg.data, path, kind=task.validation_kind, seed=cfg.seed)
        settings.caption_dropout, settings.shuffle_buffer = 0.0, 0
        settings.rows_per_batch = settings.batch_size = cfg.data.micro_batch
        dataset = BinaryTokenDataset(settings, rank=0, world_size=1)
        self.counters = Counters()
        plans = dataset.held_out_plans(cfg.eval.val_samples, self.counters)
        if not plans:
            raise LoaderError(
                f"the validation set {path} has no sample that fits data.token_budget and data.subset "
                f"({self.counters.skipped_too_long} too long, {self.counters.filtered_out} filtered out); "
                "raise data.token_budget or loosen data.subset"
            )
        self.batching = dataset.batching
        self.num_batches = len(plans)
        self.samples = sum(len(row) for plan in plans for row in plan)
        mine = list(range(dp_rank, len(plans), dp_size))
        per_replica = -(-len(plans) // dp_size)
        filler = mine[0] if mine else 0
        # (global batch index, its plan, whether its sums count)
        self.share: list[tuple[int, Plan, bool]] = [(i, plans[i], True) for i in mine]
        self.share += [(filler, plans[filler], False)] * (per_replica - len(mine))

    def describe(self) -> str:
        c = self.counters
        left = c.skipped_too_long + c.filtered_out
        dropped = f" ({c.skipped_too_long} too long and {c.filtered_out} filtered out left out)" if left else ""
        return f"validation: {self.samples} samples of {self.path} in {self.num_batches} batches{dropped}"

    def loss(self, engine, device: torch.device) -> dict[str, float]:
        """The `val/*` metrics of the engine's current weights (every rank calls this; all get the same values)."""
        batches = [
            (self.task.validation_inputs(self.batching.build(plan), index), keep) for index, plan, keep in self.share
        ]
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            sums = engine.validation_sums(batches, self.task)
        return self.task.validation_metrics(sums)


def held_out(cfg: TrainConfig, task, dp_rank: int, dp_size: int) -> HeldOut | None:
    """The run's validation (None when `eval.every` is 0, the task has no held-out loss or there is no set)."""
    if not cfg.eval.every or task.validation_kind is None:
        return None
    path = validation_dir(cfg)
    return HeldOut(cfg, task, path, dp_rank, dp_size) if path is not None else None
