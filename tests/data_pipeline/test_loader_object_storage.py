"""The training loader reading a tokenized dataset from a URL, against a real S3 API (`helpers.moto_s3`: a moto server
process of this module's own): the batches equal those of the local copy (2 ranks, with and without DataLoader
workers, and a state moves between the two); the node-local shard cache stays under its bound (a tiny bound evicts,
counted), a second pass reads from it without a GET, a download never shows under its final name unless whole; and
(slow) `torchrun -m training.train` on s3:// gives the local run's losses, killed by SIGKILL and resumed included (and
a run killed on the local copy resumes on s3://)."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import moto_s3
from helpers.data import make_t2i_data
from helpers.moto_s3 import server_requests
from test_loader import assert_same_batches

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig, LoaderError, LoaderSettings
from data_pipeline.loader.shard_store import PART, ShardCache, ShardStore

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

REPO = Path(__file__).resolve().parents[2]
BUCKET = "bitdance-loader"
URL = f"s3://{BUCKET}/tokens"
moto, s3 = moto_s3.moto, moto_s3.s3  # module fixtures: the server, and its filesystem with the AWS environment set


@pytest.fixture(scope="module")
def data(tmp_path_factory, s3):
    """The demo's small tokenized T2I dataset (96 samples in 4 shards) on disk, and a copy at s3://BUCKET/tokens."""
    root = tmp_path_factory.mktemp("loader_s3")
    made = make_t2i_data(root)
    s3.mkdir(BUCKET)
    s3.put(f"{made['tokens']}/", f"{BUCKET}/tokens/", recursive=True)
    return made


def config(data_dir, cache: Path, **kw) -> LoaderConfig:
    base = dict(kind="t2i", seed=2, shuffle_buffer=8, token_budget=2048, lookahead=16, num_workers=0, debug_keys=True)
    return LoaderConfig(str(data_dir), cache_dir=str(cache), **{**base, **kw})


def take(loader: BinaryTokenLoader, n: int) -> tuple[list, list]:
    batches, keys = [], []
    for batch, k in itertools.islice(loader, n):
        batches.append(batch)
        keys.append(k)
    return batches, keys


def shard_gets(moto) -> list[str]:
    return [name for name in server_requests(moto[1], "GET", f"{BUCKET}/tokens") if name.endswith(".tar")]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_from_a_url_equal_the_local_ones(data, s3, tmp_path, num_workers):
    """40 batches per rank (about two epochs of a rank's half): the same keys and tensors from s3:// as from disk;
    the dataset fingerprint is the same, so a state saved reading one resumes reading the other."""
    for rank in range(2):
        local = BinaryTokenLoader(config(data["tokens"], tmp_path, num_workers=num_workers), rank, 2)
        remote = BinaryTokenLoader(config(URL, tmp_path / "cache", num_workers=num_workers), rank, 2)
        want, want_keys = take(local, 40)
        got, got_keys = take(remote, 40)
        assert got_keys == want_keys and len({k for ks in got_keys for _, k in ks}) > 40
        assert_same_batches(got, want)
        assert remote.state_dict() == local.state_dict()
        stats = remote.stats()
        assert stats["shards_fetched"] + stats["shard_cache_hits"] >= 2, stats  # (rank 1: from rank 0's downloads)
        moved = BinaryTokenLoader(config(URL, tmp_path / "cache", num_workers=num_workers), rank, 2)
        moved.load_state_dict(json.loads(json.dumps(local.state_dict())))  # local -> URL at batch 40
        back = BinaryTokenLoader(config(data["tokens"], tmp_path, num_workers=num_workers), rank, 2)
        back.load_state_dict(remote.state_dict())  # URL -> local at batch 40
        after, after_keys = take(local, 5)
        for other in (moved, back):
            b, k = take(other, 5)
            assert k == after_keys
            assert_same_batches(b, after)


def test_a_second_pass_reads_the_cache_without_a_get(data, s3, moto, tmp_path):
    """One rank reads the 4 shards once (one GET each); a second loader on the same cache folder reads them again
    without any GET (shard_cache_hits), and gives the same batches."""
    before = len(shard_gets(moto))
    first = BinaryTokenLoader(config(URL, tmp_path / "cache", prefetch_shards=1), 0, 1)
    want, _ = take(first, 30)  # ~96 samples at ~5 per row: one epoch and a little
    got = shard_gets(moto)[before:]
    assert sorted(set(got)) == [f"shapes-{i:06d}.tar" for i in range(4)] and len(got) == 4, got
    assert first.stats()["shards_fetched"] == 4 and first.stats()["shards_evicted"] == 0
    second = BinaryTokenLoader(config(URL, tmp_path / "cache", prefetch_shards=1), 0, 1)
    again, _ = take(second, 30)
    assert shard_gets(moto)[before + 4 :] == []
    stats = second.stats()
    assert stats["shards_fetched"] == 0 and stats["shard_cache_hits"] >= 4, stats
    assert_same_batches(again, want)


def test_a_tiny_cache_evicts_and_stays_under_its_bound(data, s3, tmp_path):
    """A bound of 2.5 shards with one shard prefetched: least recently used shards are evicted (counted), the folder
    never holds more than the bound, and the batches are those of the local copy."""
    shard = (Path(data["tokens"]) / "shapes-000000.tar").stat().st_size
    bound = 2.5 * shard
    cfg = config(URL, tmp_path / "tiny", cache_gb=bound / 1e9, prefetch_shards=1)
    local = BinaryTokenLoader(config(data["tokens"], tmp_path), 0, 1)
    remote = BinaryTokenLoader(cfg, 0, 1)
    cache = ShardCache(tmp_path / "tiny", int(bound))
    sizes = []
    for (a, ka), (b, kb) in itertools.islice(zip(local, remote, strict=True), 60):  # about two epochs
        assert ka == kb
        assert_same_batches([b], [a])
        sizes.append(cache.used())
    stats = remote.stats()
    assert stats["shards_evicted"] >= 2 and stats["shards_fetched"] >= 6, stats
    assert max(sizes) <= bound, (max(sizes), bound)
    leftovers = [p.name for p in (tmp_path / "tiny").rglob("*") if PART in p.name]
    assert leftovers == []


def test_a_download_is_never_seen_partial(data, s3, tmp_path):
    """A shard replaced after the listing downloads with another size: refused in one line, and nothing is left under
    the shard's cache name (the download went to a temporary name that is never renamed)."""
    s3.put(f"{data['tokens']}/", f"{BUCKET}/replaced/", recursive=True)
    store = ShardStore(f"s3://{BUCKET}/replaced", LoaderSettings(cache_dir=str(tmp_path), prefetch_shards=0))
    store.listing()  # listed now; the object changes below
    s3.pipe_file(f"{BUCKET}/replaced/shapes-000001.tar", b"x" * 100)
    with pytest.raises(LoaderError, match=r"shapes-000001.tar downloaded as 100 bytes but was listed with \d+") as e:
        store.open("shapes-000001.tar")
    assert "\n" not in str(e.value)
    assert not store._cached_path("shapes-000001.tar").exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_url_without_a_dataset_is_a_one_line_error(data, s3, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"s3://{BUCKET}/nothing has no manifest.json"):
        BinaryTokenLoader(config(f"s3://{BUCKET}/nothing", tmp_path), 0, 1)
    s3.pipe_file(f"{BUCKET}/partial/manifest.json", (Path(data["tokens"]) / "manifest.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=rf"4 shard\(s\) .* missing, e.g. s3://{BUCKET}/partial/shapes-0000"):
        BinaryTokenLoader(config(f"s3://{BUCKET}/partial", tmp_path), 0, 1)


# ---- (c) training from s3:// ------------------------------------------------------------------------------------


def train(run_dir: Path, data_dir, cache: Path, *overrides, env=None, check=True) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m training.train` on the tiny T2I config, with the AWS environment of the
    module's server (inherited from os.environ) and dummy credentials."""
    args = [
        f"run_dir={run_dir}",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache}",
        "logging.every=1",
        "logging.wandb=disabled",
        "checkpoint.export_official=false",
        *overrides,
    ]
    config = REPO / "training" / "configs" / "tiny_t2i.yaml"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "training.train", "--config", str(config), *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-5000:])
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]  # a resumed run logs replayed steps again: keep the last
    return out


@pytest.mark.slow
def test_training_from_s3_equals_the_local_run_through_a_kill_and_resume(data, s3, tmp_path):
    """12 steps on 2 ranks from the local copy; from s3:// killed (SIGKILL) at step 8 and resumed from the step-5
    checkpoint on s3://; and killed on the local copy, resumed on s3:// (a run moves between them): the same losses."""
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")  # the torchrun ranks inherit it
    common = ["schedule.total_steps=12", "checkpoint.every=5"]
    kill = {"BITDANCE_FAULT_KILL": "step:8"}
    train(tmp_path / "local", data["tokens"], tmp_path / "cache", *common)
    want = losses(tmp_path / "local")
    assert sorted(want) == list(range(1, 13))
    for name, first, then in (("s3", URL, URL), ("moved", data["tokens"], URL)):
        cut = tmp_path / name
        killed = train(cut, first, tmp_path / "cache", *common, env=kill, check=False)
        assert killed.returncode != 0
        assert (cut / "checkpoints" / "latest").read_text().strip() == "step_00000005"
        resumed = train(cut, then, tmp_path / "cache", *common)
        assert "resumed from" in resumed.stdout + resumed.stderr
        assert losses(cut) == want, name
    state = torch.load(tmp_path / "s3" / "checkpoints" / "step_00000012" / "rank_00000.pt", weights_only=True)
    assert state["loader"]["batches_consumed"] == 12
