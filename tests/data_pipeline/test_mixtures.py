"""Weighted dataset mixtures (`data.sources`): the per-source shares follow the weights; a mid-stream state resumes the
uninterrupted stream exactly; new weights at a resume apply from there while every source's stream goes on where it
stopped (no sample of a source twice before its epoch ends); a mixture resized to another world size sees every
sample of each source's epochs once; mismatched sources are refused in one line; per-source counts are right, kept
in the state and (slow) logged by the training loop."""

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_loader import C, assert_same_batches, make_dataset, t2i_config

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig, LoaderError, MixtureSource
from training.config import load_config

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = (0.5, 0.3, 0.2)


def sources(dirs: dict[str, Path], weights) -> list[MixtureSource]:
    return [MixtureSource(str(d), w, name) for (name, d), w in zip(dirs.items(), weights, strict=True)]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> dict[str, Path]:
    """Three ImageNet-kind datasets of 4x4 grids: a (3 shards x 20), b (2 x 15), c (4 x 10)."""
    root = tmp_path_factory.mktemp("mix_imagenet")
    shapes = {"a": (3, 20), "b": (2, 15), "c": (4, 10)}
    return {
        name: make_dataset(root / name, "imagenet", n, k, grids=[(4, 4)], seed=i)
        for i, (name, (n, k)) in enumerate(shapes.items())
    }


@pytest.fixture(scope="module")
def t2i(tmp_path_factory) -> dict[str, Path]:
    """Three T2I datasets (same token ids): a (4 x 12), b (3 x 10), c (2 x 15)."""
    root = tmp_path_factory.mktemp("mix_t2i")
    shapes = {"a": (4, 12), "b": (3, 10), "c": (2, 15)}
    return {name: make_dataset(root / name, "t2i", n, k, seed=i) for i, (name, (n, k)) in enumerate(shapes.items())}


def imagenet_config(dirs, weights=WEIGHTS, **kw) -> LoaderConfig:
    base = dict(kind="imagenet", seed=5, shuffle_buffer=6, batch_size=10, num_workers=0, debug_keys=True)
    return LoaderConfig("unused", sources=sources(dirs, weights), **{**base, **kw})


def mix_t2i_config(dirs, weights=WEIGHTS, **kw) -> LoaderConfig:
    return t2i_config("unused", sources=sources(dirs, weights), debug_keys=True, **kw)


def run(cfg: LoaderConfig, n: int, state=None, rank=0, world=1, all_ranks=None):
    """(batches, keys, loader) of `n` batches of a loader (after loading `state`)."""
    loader = BinaryTokenLoader(cfg, rank, world)
    if state is not None:
        loader.load_state_dict(json.loads(json.dumps(state)), all_ranks)
    batches, keys = [], []
    for batch, k in itertools.islice(loader, n):
        batches.append(batch)
        keys += k
    return batches, keys, loader


def shares(keys) -> dict[str, float]:
    counts = Counter(key.split("/")[0] for _, key in keys)
    return {name: n / len(keys) for name, n in counts.items()}


def of_source(keys, name: str) -> list[tuple[int, str]]:
    return [(e, k) for e, k in keys if k.startswith(f"{name}/")]


# ---- shares ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2)])
def test_shares_follow_the_weights(imagenet, world, workers):
    """2,000 samples over every slot: each source's share within 2 points of its weight (several epochs of each)."""
    cfg = imagenet_config(imagenet, num_workers=workers)
    keys = []
    for rank in range(world):
        keys += run(cfg, 200 // world, rank=rank, world=world)[1]
    assert len(keys) == 2000
    got = shares(keys)
    for name, w in zip("abc", WEIGHTS, strict=True):
        assert abs(got[name] - w) <= 0.02, got
    # and any 200 consecutive samples of a slot are near the weights too (the draw is low-discrepancy)
    window = shares(run(cfg, 20)[1])
    assert all(abs(window[n] - w) <= 0.03 for n, w in zip("abc", WEIGHTS, strict=True)), window


def test_a_paused_source_is_never_read(imagenet):
    keys = run(imagenet_config(imagenet, (1.0, 0.0, 1.0)), 30)[1]
    assert set(shares(keys)) == {"a", "c"}


# ---- resumption ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_a_mid_stream_state_is_exact(t2i, num_workers):
    cfg = mix_t2i_config(t2i, num_workers=num_workers, rows_per_batch=2)
    reference, ref_keys, _ = run(cfg, 30)  # about two epochs of the smallest source
    first, keys, loader = run(cfg, 11)
    state = loader.state_dict()
    assert state["mixture"]["stages"] == [[0, list(WEIGHTS)]] and sum(state["mixture"]["draws"]["0"]) > 0
    resumed, more, again = run(cfg, 19, state)
    assert keys + more == ref_keys
    assert_same_batches(first + resumed, reference)
    assert again.state_dict() == run(cfg, 30)[2].state_dict()


def test_a_replay_that_draws_otherwise_is_refused(imagenet):
    _, _, loader = run(imagenet_config(imagenet), 5)
    state = loader.state_dict()
    state["mixture"]["draws"]["0"][0] += 1  # as if the code drew otherwise than when the state was written
    with pytest.raises(LoaderError, match=r"replaying worker 0's 5 batches drew \[.*\] samples per source but the"):
        run(imagenet_config(imagenet), 1, state)


def test_new_weights_at_a_resume_apply_from_there(imagenet):
    """Stage 1 with 0.5/0.3/0.2 for 200 samples, stage 2 with 0.1/0.1/0.8 for 1,000: the shares of stage 2 follow
    the new weights, and each source's samples over both stages are exactly its own stream (what a run reading only
    that source yields): it went on where it stopped, no sample twice before its epoch ended."""
    new = (0.1, 0.1, 0.8)
    _, first, loader = run(imagenet_config(imagenet), 20)
    state = loader.state_dict()
    _, second, resumed = run(imagenet_config(imagenet, new), 100, state)
    got = shares(second)
    assert all(abs(got[n] - w) <= 0.02 for n, w in zip("abc", new, strict=True)), got
    assert resumed.state_dict()["mixture"]["stages"] == [[0, list(WEIGHTS)], [20, list(new)]]
    for i, name in enumerate("abc"):
        alone = [0.0] * 3
        alone[i] = 1.0
        mine = of_source(first + second, name)
        assert of_source(run(imagenet_config(imagenet, alone), len(mine) // 10 + 1)[1], name)[: len(mine)] == mine
    # the second stage is itself resumable exactly, and resuming it with the same weights adds no stage
    _, part, mid = run(imagenet_config(imagenet, new), 40, state)
    _, rest, end = run(imagenet_config(imagenet, new), 60, mid.state_dict())
    assert part + rest == second and end.state_dict() == resumed.state_dict()


def test_new_weights_with_packing_lookahead_see_no_sample_twice(t2i):
    """T2I rows are packed from a lookahead: samples drawn before the resume are placed after it, none twice."""
    _, first, loader = run(mix_t2i_config(t2i, token_budget=512, lookahead=8), 8)
    _, second, _ = run(mix_t2i_config(t2i, (0.2, 0.2, 0.6), token_budget=512, lookahead=8), 40, loader.state_dict())
    seen = Counter(first + second)
    assert max(seen.values()) == 1
    for name, d in t2i.items():  # every epoch a source finished holds each of its samples once
        n = json.loads((d / "manifest.json").read_text())["samples"]
        mine = Counter(e for e, _ in of_source(first + second, name))
        assert all(mine[e] == n for e in range(max(mine) - 1)), (name, mine)  # (the last two may wait in the lookahead)


# ---- resize ---------------------------------------------------------------------------------------------------------


def assert_each_source_epoch_once(seen, dirs, upto: dict[str, int]):
    for name, d in dirs.items():
        manifest = json.loads((d / "manifest.json").read_text())
        n = manifest["samples"]
        mine = Counter(of_source(seen, name))
        for epoch in range(upto[name] + 1):
            keys = [k for (e, k), c in mine.items() if e == epoch for _ in range(c)]
            assert len(keys) == len(set(keys)) == n, f"{name} epoch {epoch}: {len(set(keys))} of {n}, {len(keys)} seen"


@pytest.mark.parametrize(("after", "workers"), [(1, 0), (3, 2)], ids=["2->1", "2->3x2w"])
def test_a_resized_mixture_sees_every_sample_of_each_source_epoch_once(imagenet, after, workers):
    """2 ranks with 0.5/0.3/0.2, then (a stage) 0.1/0.1/0.8, then resized with 1/3 each: over the three parts every
    source's epochs up to the one after its latest at the resize hold each of its samples exactly once."""
    small = dict(batch_size=2)
    seen, states = [], []
    for rank in range(2):
        _, keys, loader = run(imagenet_config(imagenet, **small), 8, rank=rank, world=2)
        seen += keys
        states.append(loader.state_dict())
    staged = []
    for rank in range(2):
        _, keys, loader = run(imagenet_config(imagenet, (0.1, 0.1, 0.8), **small), 6, states[rank], rank, 2)
        seen += keys
        staged.append(loader.state_dict())
    assert staged[0]["mixture"]["stages"][1] == [8, [0.1, 0.1, 0.8]]
    upto = {n: max(s["mixture"]["max_epochs"][i] for s in staged) + 1 for i, n in enumerate("abc")}
    cfg = imagenet_config(imagenet, (1, 1, 1), num_workers=workers, **small)
    for rank in range(after):
        _, keys, loader = run(cfg, 330 // after, staged[0], rank, after, staged)
        seen += keys
    assert_each_source_epoch_once(seen, imagenet, upto)
    assert loader.state_dict()["origin"]["stages"][1] == [8, [0.1, 0.1, 0.8]]


# ---- checks and counts ----------------------------------------------------------------------------------------------


def test_one_source_is_the_plain_data_dir_stream(t2i):
    plain, keys, a = run(t2i_config(t2i["a"], debug_keys=True), 12)
    one, same, b = run(t2i_config("unused", sources=[MixtureSource(str(t2i["a"]))], debug_keys=True), 12)
    assert same == keys
    assert_same_batches(one, plain)
    assert b.state_dict() == a.state_dict()  # the same run: either state resumes the other


def retouched(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for key, value in changes.items():
        if key == "parallel_num":
            manifest["text_tokens"] = {**manifest["text_tokens"], "parallel_num": value}
        else:
            manifest[key] = value
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_mismatched_sources_are_refused_in_one_line(t2i, imagenet, tmp_path):
    cases = [
        ({"x": imagenet["a"]}, r"x has kind 'imagenet' but a has 't2i'; a mixture needs one kind"),
        ({"x": retouched(t2i["b"], tmp_path / "bits", bits_per_token=2 * C)}, rf"x has bits per token {2 * C} but"),
        ({"x": retouched(t2i["b"], tmp_path / "p", parallel_num=16)}, r"x has P 16 but a has 4; a mixture needs one P"),
    ]
    for extra, match in cases:
        dirs = {"a": t2i["a"], **extra}
        with pytest.raises(LoaderError, match=match) as e:
            BinaryTokenLoader(mix_t2i_config(dirs, (1, 1)), 0, 1)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"data.sources names repeat \(a\); give each source its own name"):
        LoaderConfig("unused", sources=[MixtureSource(str(t2i["a"])), MixtureSource(str(t2i["a"]))])
    _, _, loader = run(mix_t2i_config(t2i), 3)
    with pytest.raises(LoaderError, match=r"data.sources differ from the checkpoint's \(a \(.*\), b .*resume with the"):
        run(mix_t2i_config({"a": t2i["a"], "c": t2i["c"], "b": t2i["b"]}), 1, loader.state_dict())


def test_per_source_counts(t2i, imagenet):
    """Samples and tokens per source in `stats()` match the batches' own (T2I: the real tokens of the packed rows;
    ImageNet: h * w per sample), and a resumed loader goes on counting from the state."""
    batches, keys, loader = run(mix_t2i_config(t2i, rows_per_batch=2), 20)
    stats = loader.stats()
    by_name = Counter(k.split("/")[0] for _, k in keys)
    assert {n: stats[f"data/{n}/samples"] for n in "abc"} == dict(by_name)
    assert sum(stats[f"data/{n}/tokens"] for n in "abc") == sum(int((b.doc_ids >= 0).sum()) for b in batches)
    _, _, half = run(mix_t2i_config(t2i, rows_per_batch=2), 8)
    _, _, resumed = run(mix_t2i_config(t2i, rows_per_batch=2), 12, half.state_dict())
    assert {k: v for k, v in resumed.stats().items() if k.startswith("data/")} == {
        k: v for k, v in stats.items() if k.startswith("data/")
    }
    _, keys, loader = run(imagenet_config(imagenet), 30)
    stats, by_name = loader.stats(), Counter(k.split("/")[0] for _, k in keys)
    assert all(stats[f"data/{n}/samples"] == by_name[n] and stats[f"data/{n}/tokens"] == 16 * by_name[n] for n in "abc")


def test_the_training_config_takes_a_mixture():
    cfg = load_config(None, ["data.sources=[{dir: s3://bkt/laion, weight: 0.7}, {dir: /data/cc, weight: 0.3}]"])
    assert [(s.label, s.weight) for s in cfg.data.sources] == [("laion", 0.7), ("cc", 0.3)]
    for bad, match in (
        ("[{dir: a, weight: -1}]", r"data.sources weights must be finite and >= 0"),
        ("[{dir: x/a}, {dir: y/a}]", r"data.sources names repeat \(a\)"),
        ("[{dir: a, weight: 0}]", r"data.sources weights must not all be 0"),
    ):
        with pytest.raises(ValueError, match=match):
            load_config(None, [f"data.sources={bad}"])


# ---- (slow) the training loop logs the per-source counts ----------------------------------------------------------


@pytest.mark.slow
def test_training_logs_per_source_counts_and_resumes_with_new_weights(tmp_path):
    from helpers.data import make_t2i_data

    a, b = make_t2i_data(tmp_path / "a", samples=48), make_t2i_data(tmp_path / "b", samples=48)

    def train(weights, steps: int) -> None:
        mix = ", ".join(
            f"{{dir: {d['tokens']}, weight: {w}, name: {n}}}" for n, d, w in zip("ab", (a, b), weights, strict=True)
        )
        args = [
            f"run_dir={tmp_path / 'run'}",
            f"data.sources=[{mix}]",
            f"schedule.total_steps={steps}",
            "schedule.warmup_steps=1",
            "checkpoint.every=3",
            "logging.every=1",
            "logging.wandb=disabled",
            "checkpoint.export_official=false",
        ]
        cmd = [sys.executable, "-m", "training.train", "--config", str(REPO / "training/configs/tiny_t2i.yaml"), *args]
        proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    train((0.7, 0.3), 3)
    train((0.0, 1.0), 6)  # resumed at step 3 with source a paused
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    samples = tokens = 0
    for step in range(1, 7):
        r = rows[step]
        samples += round(r["samples_per_s"] * r["time/step_s"])
        tokens += round(r["tokens_per_s"] * r["time/step_s"])
        assert r["data/a/samples"] + r["data/b/samples"] == samples, (step, r)
        assert r["data/a/tokens"] + r["data/b/tokens"] == tokens, (step, r)
    # (source a's samples drawn before the resume still wait in the packer's lookahead of 64: placed after it)
    assert rows[3]["data/a/samples"] > 0 and rows[6]["data/b/samples"] > rows[3]["data/b/samples"]
    state = torch.load(tmp_path / "run/checkpoints/step_00000006/rank_00000.pt", weights_only=True)["loader"]
    assert state["mixture"]["stages"] == [[0, [0.7, 0.3]], [6, [0.0, 1.0]]]  # from batch 6: step 3 x 2 micro-batches
