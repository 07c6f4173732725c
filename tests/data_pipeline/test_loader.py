"""Training data loader: exact resumption, rank/worker splitting, packing fill, ImageNet batches, T2I model fit."""

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig
from data_pipeline.loader.packing import best_subset, greedy_rows
from data_pipeline.loader.token_ids import ManifestTokenIds
from data_pipeline.shard_format import FORMAT, MANIFEST, TokenRecord, write_shard_atomic
from models.t2i.packing import PackedT2IBatch

C = 16  # bits per token of the tiny tokenizer
P = 4
T2I_GRIDS = [(8, 8), (4, 12), (12, 4), (6, 6)]
TEXT_TOKENS = {
    "pad_id": 0,
    "vision_start_id": 1,
    "res_ids": list(range(2, 2 + 256)),
    "query_ids": [260, 261, 262],
    "uncond_ids": [270, 271, 272],
    "parallel_num": P,
}


def make_dataset(root: Path, kind: str, n_shards: int, per_shard: int, grids=T2I_GRIDS, long_keys=(), seed=0) -> Path:
    """Shards of random ±1 grids; T2I text lengths 3..30 (ids 300..499); `long_keys` get 600-token texts."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    shards, n = [], 0
    for s in range(n_shards):
        records = []
        for i in range(per_shard):
            key = f"shard{s:02d}-{i:06d}"
            h, w = grids[n % len(grids)]
            grid = torch.randint(0, 2, (C, h, w), generator=g).float() * 2 - 1
            text_len = 600 if key in long_keys else int(torch.randint(3, 31, (), generator=g))
            text = torch.randint(300, 500, (text_len,), generator=g).tolist() if kind == "t2i" else []
            label = n % 10 if kind == "imagenet" else None
            records.append(TokenRecord.from_grid(key, grid, text_ids=text, caption="", source_key=key, label=label))
            n += 1
        write_shard_atomic(root / f"shard{s:02d}.tar", records)
        shards.append({"name": f"shard{s:02d}.tar", "samples": per_shard, "tokens": 0})
    manifest = {"format": FORMAT, "kind": kind, "bits_per_token": C, "shards": shards, "samples": n}
    if kind == "t2i":
        manifest["text_tokens"] = TEXT_TOKENS
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def all_keys(n_shards: int, per_shard: int) -> set[str]:
    return {f"shard{s:02d}-{i:06d}" for s in range(n_shards) for i in range(per_shard)}


def tensors(batch) -> list[torch.Tensor]:
    items = vars(batch).values() if isinstance(batch, PackedT2IBatch) else batch
    return [v for v in items if isinstance(v, torch.Tensor)]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        tx, ty = tensors(x), tensors(y)
        assert len(tx) == len(ty) > 0
        for u, v in zip(tx, ty, strict=True):
            assert u.dtype == v.dtype and torch.equal(u, v)


@pytest.fixture(scope="module")
def t2i_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("t2i"), "t2i", n_shards=4, per_shard=12)


def t2i_config(data_dir: Path, **kw) -> LoaderConfig:
    base = dict(
        data_dir=data_dir,
        kind="t2i",
        seed=3,
        shuffle_buffer=8,
        token_budget=256,
        caption_dropout=0.3,
        num_workers=0,
        lookahead=16,
    )
    base.update(kw)
    return LoaderConfig(**base)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_replays_exactly(t2i_dir, num_workers):
    cfg = t2i_config(t2i_dir, num_workers=num_workers, rows_per_batch=2)
    k, m = 7, 9  # 48 samples at ~4 per row: the resumed part crosses an epoch boundary
    reference = list(itertools.islice(BinaryTokenLoader(cfg, 0, 1), k + m))

    first = BinaryTokenLoader(cfg, 0, 1)
    assert_same_batches(list(itertools.islice(first, k)), reference[:k])
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    assert state["batches_consumed"] == k

    resumed = BinaryTokenLoader(cfg, 0, 1)
    resumed.load_state_dict(state)
    assert_same_batches(list(itertools.islice(resumed, m)), reference[k:])
    assert resumed.stats()["batches"] == k + m
    if num_workers == 0:  # iterating the same loader again also continues where it stopped
        assert_same_batches(list(itertools.islice(first, m)), reference[k:])


def test_resume_rejects_incompatible_state(t2i_dir):
    state = BinaryTokenLoader(t2i_config(t2i_dir), 0, 1).state_dict()
    # another layout resizes the stream, which needs every previous rank's state (test_loader_resize.py)
    for change, match in (
        ({"num_workers": 2}, "needs the loader states of all 1"),
        ({"token_budget": 512}, "settings"),
    ):
        with pytest.raises(ValueError, match=match):
            BinaryTokenLoader(t2i_config(t2i_dir, **change), 0, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="resizing the data stream from 1 ranks"):
        BinaryTokenLoader(t2i_config(t2i_dir), 0, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset"):
        BinaryTokenLoader(t2i_config(t2i_dir), 0, 1).load_state_dict({**state, "dataset": "0" * 16})


@pytest.mark.parametrize(("n_shards", "per_shard"), [(8, 5), (2, 20)])  # >= slots, < slots (4 slots)
def test_ranks_and_workers_see_disjoint_samples(tmp_path, n_shards, per_shard):
    data = make_dataset(tmp_path, "imagenet", n_shards, per_shard, grids=[(4, 4)])
    cfg = LoaderConfig(data, kind="imagenet", seed=1, shuffle_buffer=4, batch_size=2, num_workers=2, debug_keys=True)
    epoch0: Counter[str] = Counter()
    for rank in range(2):
        # 40 samples over 4 slots: 10 per slot (5 batches) per epoch; 15 batches per worker pass the first epoch
        for _bits, keys in itertools.islice(BinaryTokenLoader(cfg, rank, 2), 30):
            epoch0.update(key for epoch, key in keys if epoch == 0)
    assert max(epoch0.values()) == 1
    assert set(epoch0) == all_keys(n_shards, per_shard)


def test_packing_fills_budget_and_skips_too_long(tmp_path):
    data = make_dataset(tmp_path, "t2i", n_shards=3, per_shard=60, long_keys={"shard01-000007"})
    cfg = t2i_config(data, token_budget=512, lookahead=64, shuffle_buffer=32, caption_dropout=0.1, debug_keys=True)
    loader = BinaryTokenLoader(cfg, 0, 1)
    seen = Counter()
    for batch, keys in itertools.islice(loader, 100):  # a sample waits at most `lookahead` rows
        lengths = (batch.doc_ids >= 0).sum(dim=1)
        assert int(lengths.max()) <= 512 and batch.num_samples == len(keys)
        seen.update(k for epoch, k in keys if epoch == 0)
    stats = loader.stats()
    assert stats["fill_ratio"] >= 0.97, stats
    assert stats["skipped_too_long"] >= 1 and "shard01-000007" not in seen
    assert set(seen) == all_keys(3, 60) - {"shard01-000007"} and max(seen.values()) == 1


def test_greedy_rows_keeps_every_item_within_budget():
    sizes = [(i * 37) % 90 + 10 for i in range(500)]
    rows = list(greedy_rows(sizes, lambda x: x, 300, 16))
    assert sorted(x for row in rows for x in row) == sorted(sizes)
    assert all(sum(row) <= 300 for row in rows)


def test_imagenet_batches_match_the_model(tmp_path):
    data = make_dataset(tmp_path, "imagenet", n_shards=2, per_shard=6, grids=[(8, 8)])
    cfg = LoaderConfig(data, kind="imagenet", batch_size=4, num_workers=0, debug_keys=True)
    for (bits, labels), _keys in itertools.islice(BinaryTokenLoader(cfg, 0, 1), 3):
        assert bits.shape == (4, C, 8, 8) and bits.dtype == torch.float32
        assert set(bits.unique().tolist()) <= {-1.0, 1.0}
        assert labels.dtype == torch.int64 and labels.shape == (4,)
    # labels are n % 10 by dataset position; check them through the keys
    batch, keys = next(iter(BinaryTokenLoader(cfg, 0, 1)))
    expected = [(int(k[5:7]) * 6 + int(k[-6:])) % 10 for _, k in keys]
    assert batch[1].tolist() == expected


def test_imagenet_mixed_sizes_raise(tmp_path):
    data = make_dataset(tmp_path, "imagenet", n_shards=1, per_shard=8, grids=[(8, 8), (4, 4)])
    cfg = LoaderConfig(data, kind="imagenet", batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match="one grid size"):
        next(iter(BinaryTokenLoader(cfg, 0, 1)))


def test_t2i_batch_runs_through_the_tiny_model(t2i_dir):
    from models.t2i.model import TextToImageBitDance, get_t2i_config

    cfg = get_t2i_config("tiny-4x", attention="dense")
    assert cfg.llm.vocab_size > 500
    model = TextToImageBitDance(cfg)
    batch = next(iter(BinaryTokenLoader(t2i_config(t2i_dir, rows_per_batch=2), 0, 1)))
    assert isinstance(batch, PackedT2IBatch) and batch.input_ids.shape[0] == 2
    loss = model(batch)
    assert torch.isfinite(loss.loss) and loss.vision_tokens > 0


def test_rows_are_packed_for_the_p_of_the_datasets_query_tokens(t2i_dir):
    batch = next(iter(BinaryTokenLoader(t2i_config(t2i_dir), 0, 1)))
    assert batch.parallel_num == P


def test_manifest_token_ids():
    ids = ManifestTokenIds.from_manifest({"text_tokens": TEXT_TOKENS})
    assert ids.image_prefix_ids(4, 12) == [1, 5, 13, 260, 261, 262]
    assert ids.uncond_ids() == [270, 271, 272]
    with pytest.raises(NotImplementedError):
        ids.prompt_ids("a cat")


def test_best_subset_is_optimal():
    from itertools import combinations

    rng = torch.Generator().manual_seed(0)
    for _ in range(50):
        sizes = torch.randint(1, 40, (9,), generator=rng).tolist()
        room = int(torch.randint(10, 120, (1,), generator=rng))
        best = max(sum(c) for r in range(len(sizes) + 1) for c in combinations(sizes, r) if sum(c) <= room)
        picks = best_subset(sizes, room)
        assert sum(sizes[i] for i in picks) == best and picks == sorted(set(picks))


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_caption_dropout_swaps_in_the_unconditional_prompt(t2i_dir, dropout):
    batch = next(iter(BinaryTokenLoader(t2i_config(t2i_dir, caption_dropout=dropout), 0, 1)))
    unconditional = int((batch.input_ids == TEXT_TOKENS["uncond_ids"][0]).sum())
    assert unconditional == (batch.num_samples if dropout == 1.0 else 0), (unconditional, batch.num_samples)
