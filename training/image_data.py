"""Raw images for the tokenizer trainer: decoded, resized, centre-cropped RGB batches from webdataset tars.

Deterministic and endless: per epoch the shards are shuffled with (seed, epoch) and rank r of W keeps the
training samples with running index i % W == r. The first `holdout` samples of the dataset (in file order)
never train; they measure PSNR/SSIM. Resumption replays the stream up to the number of batches consumed.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import numpy as np
import torch

from data_pipeline.image_ops import SkipSample, decode_image, resize_cover_crop
from data_pipeline.sources import SourceConfig, iter_samples, list_shards
from models.tokenizer.model import images_to_tensor


class RawImageBatches:
    def __init__(self, data_dir: str, image_size: int, batch: int, rank: int, world: int, seed: int, holdout: int):
        self.source = SourceConfig("wds", data_dir)
        self.shards = list_shards(self.source)
        self.size, self.batch, self.rank, self.world, self.seed = image_size, batch, rank, world, seed
        self.consumed = 0
        held = list(itertools.islice(self._images(self.shards), holdout))
        self.holdout_keys = {k for k, _ in held}
        self.holdout = images_to_tensor(torch.from_numpy(np.stack([img for _, img in held]))) if held else None

    def _images(self, shards) -> Iterator[tuple[str, np.ndarray]]:
        for shard in shards:
            for raw in iter_samples(shard, self.source, need_caption=False):
                if raw.error:
                    continue
                try:
                    yield raw.key, resize_cover_crop(decode_image(raw.image), self.size, self.size)
                except SkipSample:
                    continue

    def _stream(self) -> Iterator[np.ndarray]:
        for epoch in itertools.count():
            order = list(self.shards)
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            train = (img for key, img in self._images(order) if key not in self.holdout_keys)
            yield from itertools.islice(train, self.rank, None, self.world)

    def __iter__(self) -> Iterator[torch.Tensor]:
        stream = self._stream()
        for _ in range(self.consumed * self.batch):  # replay what earlier runs consumed
            next(stream)
        while True:
            images = list(itertools.islice(stream, self.batch))
            self.consumed += 1
            yield images_to_tensor(torch.from_numpy(np.stack(images)))

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "world": self.world, "seed": self.seed}

    def load_state_dict(self, state: dict, all_ranks: list[dict] | None = None) -> None:
        """`all_ranks` (a resized resume) is refused: the tokenizer's image stream resumes on its own world size."""
        if all_ranks is not None or state["world"] != self.world or state["seed"] != self.seed:
            raise ValueError(
                f"the tokenizer's image stream was saved with world size {state['world']} and seed {state['seed']}; "
                f"resume it with the same (this run: {self.world}, {self.seed})"
            )
        self.consumed = state["consumed"]
