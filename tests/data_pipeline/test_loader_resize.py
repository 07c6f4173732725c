"""Resizing the data stream: a run saved at one world size (and worker count) resumes at another, and across the
two parts of the run every sample of an epoch is seen exactly once; a resized run resumes exactly and resizes
again."""

import itertools
from collections import Counter

import pytest
from test_loader import all_keys, make_dataset, t2i_config

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig


def run_part(cfg, world: int, batches: int, states=None):
    """Every rank of a `world`-rank run takes `batches` batches (after loading `states`); (keys seen, states)."""
    seen, out = [], []
    for rank in range(world):
        loader = BinaryTokenLoader(cfg, rank, world)
        if states is not None:
            loader.load_state_dict(states[0], states)
        for _batch, keys in itertools.islice(loader, batches):
            seen += keys
        out.append(loader.state_dict())
    return seen, out


def assert_epochs_exactly_once(seen, keys_of_epoch, upto: int):
    counts = Counter(seen)
    for epoch in range(upto + 1):
        mine = Counter({k: n for (e, k), n in counts.items() if e == epoch})
        assert set(mine) == keys_of_epoch, f"epoch {epoch}: {len(keys_of_epoch - set(mine))} samples never seen"
        assert max(mine.values()) == 1, f"epoch {epoch}: {[k for k, n in mine.items() if n > 1][:3]} seen twice"


@pytest.mark.parametrize(
    ("before", "after"),
    [((2, 0), (1, 0)), ((1, 0), (2, 0)), ((2, 2), (1, 0)), ((1, 0), (3, 2))],
    ids=["2->1", "1->2", "2x2w->1", "1->3x2w"],
)
def test_resize_sees_every_sample_of_the_epoch_once(tmp_path, before, after):
    data = make_dataset(tmp_path, "imagenet", n_shards=6, per_shard=7, grids=[(4, 4)])  # 42 samples
    (w0, k0), (w1, k1) = before, after
    base = dict(kind="imagenet", seed=3, shuffle_buffer=5, batch_size=2, debug_keys=True)
    first, states = run_part(LoaderConfig(data, num_workers=k0, **base), w0, 4)
    max_epoch = max(s["max_epoch"] for s in states)
    # enough batches for every new rank to finish what the first part left and a whole epoch more
    second, _ = run_part(LoaderConfig(data, num_workers=k1, **base), w1, 2 * 42 // (2 * w1) + 6, states)
    keys = all_keys(6, 7)
    assert_epochs_exactly_once(first + second, keys, max_epoch + 1)


def test_mid_epoch_t2i_resize_with_packing(tmp_path):
    """T2I rows are packed from a lookahead: samples pulled into it but not placed before the save still count as
    unseen and come back after the resize."""
    data = make_dataset(tmp_path, "t2i", n_shards=4, per_shard=15)
    cfg = t2i_config(data, token_budget=512, lookahead=8, shuffle_buffer=6, caption_dropout=0.0, debug_keys=True)
    first, states = run_part(cfg, 2, 3)
    second, _ = run_part(cfg, 1, 40, states)
    assert_epochs_exactly_once(first + second, all_keys(4, 15), max(s["max_epoch"] for s in states))


def test_resized_run_resumes_exactly_and_resizes_again(tmp_path):
    data = make_dataset(tmp_path, "imagenet", n_shards=6, per_shard=7, grids=[(4, 4)])
    cfg = LoaderConfig(data, kind="imagenet", seed=3, shuffle_buffer=5, batch_size=2, num_workers=0, debug_keys=True)
    first, states = run_part(cfg, 2, 5)
    # 2 -> 1 for 4 batches, then an exact same-size resume for 6 more, equal to 10 uninterrupted batches
    mid, mid_states = run_part(cfg, 1, 4, states)
    rest, rest_states = run_part(cfg, 1, 6, mid_states)
    straight, _ = run_part(cfg, 1, 10, states)
    assert mid + rest == straight
    # and 1 -> 3: the epochs seen so far plus the next one, each sample exactly once over the three parts
    last, _ = run_part(cfg, 3, 20, rest_states)
    assert_epochs_exactly_once(first + mid + rest + last, all_keys(6, 7), rest_states[0]["max_epoch"] + 1)


def test_resize_needs_every_previous_rank(tmp_path):
    data = make_dataset(tmp_path, "imagenet", n_shards=2, per_shard=6, grids=[(4, 4)])
    cfg = LoaderConfig(data, kind="imagenet", batch_size=2, num_workers=0)
    _, states = run_part(cfg, 2, 2)
    with pytest.raises(ValueError, match="needs the loader states of all 2 previous ranks"):
        BinaryTokenLoader(cfg, 0, 1).load_state_dict(states[0], states[:1])
