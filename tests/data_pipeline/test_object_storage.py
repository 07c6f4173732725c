"""Tokenization reading from and writing to object storage, against a real S3 API: a `moto` server process on
127.0.0.1 that this module starts and stops (`helpers.moto_s3`), reached the usual way (AWS_ENDPOINT_URL and
credentials in the environment, resolved by s3fs / botocore). s3 -> s3, s3 -> local and local -> s3 write the same
bytes as local -> local; a re-run skips finished shards and redoes one whose stats (its last object) are missing; a
job killed half-way and re-run holds every sample exactly once (with a val split and --dedup); the Ray path (slow)
writes the same."""

import io
import json
import os
import posixpath
import subprocess
import sys
import tarfile
from dataclasses import asdict
from pathlib import Path

import fsspec
import pytest
from helpers import moto_s3
from helpers.data import make_tokenizers
from helpers.moto_s3 import puts
from PIL import Image

from data_pipeline.shapes import write_shapes_dataset
from data_pipeline.shard_format import VAL_DIR, read_shard
from data_pipeline.sources import SourceConfig, iter_samples, list_shards
from data_pipeline.tokenize import FAULT_MARKER, TokenizeConfig, run_tokenize

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

REPO = Path(__file__).resolve().parents[2]
BUCKET = "bitdance-tokens"
moto, s3 = moto_s3.moto, moto_s3.s3  # module fixtures: the server, and its filesystem with the AWS environment set


def png(w: int, h: int, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def write_odd_tar(path: Path, raw: Path) -> None:
    """Samples that are skipped (truncated, extreme_aspect, missing_image) and two copies of shapes images."""
    cut = png(40, 40, (1, 2, 3))
    copies = []
    for shard, member in (("shapes-000000.tar", "shapes-00000000.png"), ("shapes-000002.tar", "shapes-00000045.png")):
        with tarfile.open(raw / shard) as tar:
            copies.append(tar.extractfile(member).read())
    members = [("cut.png", cut[: len(cut) // 2]), ("cut.txt", b"a red circle")]
    members += [("wide.png", png(200, 10, (3, 3, 3))), ("wide.txt", b"a wide one")]
    members += [("nothing.txt", b"a caption without an image")]
    members += [("copy0.png", copies[0]), ("copy0.txt", b"a copy"), ("copy1.png", copies[1]), ("copy1.txt", b"a copy")]
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def data(tmp_path_factory, s3):
    """Raw shards on disk and in s3://BUCKET/raw, and the local -> local outputs to compare with (plain, and with a
    val split and --dedup)."""
    s3.mkdir(BUCKET)
    root = tmp_path_factory.mktemp("objstore")
    make_tokenizers(root)  # root / "text", root / "ae"
    write_shapes_dataset(root / "raw", 60, sizes=((32, 32), (32, 64)), samples_per_shard=20)
    write_odd_tar(root / "raw" / "zodd.tar", root / "raw")
    s3.put(f"{root / 'raw'}/", f"{BUCKET}/raw/", recursive=True)
    assert len(s3.find(f"{BUCKET}/raw")) == 4
    run_tokenize(config(root, root / "raw", root / "plain"), local=True)
    run_tokenize(config(root, root / "raw", root / "split", **SPLIT), local=True)
    return root


SPLIT = {"val_fraction": 0.3, "dedup": True}


def s3_url(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


def config(root: Path, inp, out, **kw) -> TokenizeConfig:
    base = dict(
        source="wds",
        input=str(inp),
        output=str(out),
        tokenizer=str(root / "ae"),
        text_tokenizer=str(root / "text"),
        parallel_num=4,
        sizes=[(32, 32), (32, 64)],
        chunk_samples=7,
        batch_size=4,
        num_actors=1,
    )
    return TokenizeConfig(**{**base, **kw})


def files(out: str | Path) -> dict[str, bytes]:
    """Every file of an output (local or a URL), by its path inside it; stats without their timing."""
    fs, root = fsspec.core.url_to_fs(str(out))
    fs.invalidate_cache()
    found = {}
    for path in fs.find(root):
        rel, data = posixpath.relpath(path, root), fs.cat_file(path)
        if rel.endswith(".stats.json"):
            stats = json.loads(data)
            assert stats.pop("seconds") >= 0
            data = json.dumps(stats, sort_keys=True).encode()
        found[rel] = data
    return found


def assert_same_output(got: str | Path, want: Path) -> None:
    a, b = files(got), files(want)
    a.pop(FAULT_MARKER, None)
    assert sorted(a) == sorted(b)
    assert [name for name in sorted(a) if a[name] != b[name]] == []


def keys_of(out: str) -> list[str]:
    """The sample keys of every shard of an output and its val side, with repeats."""
    fs, root = fsspec.core.url_to_fs(out)
    fs.invalidate_cache()
    tars = [p for p in fs.find(root) if p.endswith(".tar")]
    return [r.key for p in tars for r in read_shard(io.BytesIO(fs.cat_file(p)))]


# ---- (1) the same bytes as local -> local ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["s3->s3", "s3->local", "local->s3"])
def test_object_storage_gives_the_local_output(data, s3, tmp_path, where):
    inp = s3_url("raw") if where.startswith("s3") else data / "raw"
    out = s3_url(f"one-{where.replace('->', '-to-')}") if where.endswith("s3") else tmp_path / "out"
    manifest = run_tokenize(config(data, inp, out), local=True)
    assert manifest == json.loads((data / "plain" / "manifest.json").read_text())
    assert_same_output(out, data / "plain")  # shards byte for byte, stats, errors, manifest, identity
    assert manifest["skipped"] == {"extreme_aspect": 1, "missing_image": 1, "truncated": 1}


def test_every_source_lists_and_reads_s3_as_a_local_folder(data, s3, tmp_path):
    """Folder (sidecar captions and scores), imagenet (class folders) and parquet sources: the same shards and samples
    from a bucket as from the disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i in range(5):
        (tmp_path / "folder" / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / f"d{i % 2}" / f"{i}.png").write_bytes(png(8 + i, 8, (i, 2 * i, 3)))
        (tmp_path / "folder" / f"d{i % 2}" / f"{i}.json").write_text(json.dumps({"caption": f"c{i}", "aesthetic": i}))
        (tmp_path / "imagenet" / f"n{i % 2:04d}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imagenet" / f"n{i % 2:04d}" / f"{i}.JPEG").write_bytes(png(8, 8 + i, (3, i, 9)))
    (tmp_path / "folder" / "d0" / "nocaption.png").write_bytes(png(8, 8, (0, 0, 0)))
    (tmp_path / "pq").mkdir()
    table = pa.table(
        {"image": [png(8, 8, (i, 0, 0)) for i in range(3)], "caption": ["a", None, "c"], "clip": [1, 2, 3]}
    )
    pq.write_table(table, tmp_path / "pq" / "part-0.parquet")
    s3.put(f"{tmp_path}/", f"{BUCKET}/sources/", recursive=True)
    for kind, folder, kw, errors in (
        ("folder", "folder", {"samples_per_shard": 4}, {None, "missing_caption"}),
        ("imagenet", "imagenet", {"samples_per_shard": 3}, {None}),
        ("parquet", "pq", {"score_columns": ("clip",)}, {None, "missing_caption"}),
    ):
        local = SourceConfig(kind, str(tmp_path / folder), **kw)
        remote = SourceConfig(kind, s3_url(f"sources/{folder}"), **kw)
        local_shards, remote_shards = list_shards(local), list_shards(remote)
        assert [(s.name, s.files) for s in remote_shards] == [(s.name, s.files) for s in local_shards], kind
        for a, b in zip(local_shards, remote_shards, strict=True):
            want, got = list(iter_samples(a, local)), list(iter_samples(b, remote))
            assert got == want and any(r.error is None for r in got), kind
        assert {r.error for s in local_shards for r in iter_samples(s, local)} == errors, kind


def test_an_output_bucket_that_does_not_exist_is_a_one_line_error(data, s3):
    with pytest.raises(SystemExit, match=r"--output s3://no-such-bucket/tokens cannot be written") as err:
        run_tokenize(config(data, s3_url("raw"), "s3://no-such-bucket/tokens"), local=True)
    assert "\n" not in str(err.value.code) and not s3.exists("no-such-bucket")  # and no bucket was created


# ---- (2) resumption ---------------------------------------------------------------------------------------------


def test_a_rerun_skips_finished_shards_and_redoes_an_unfinished_one(data, s3, moto, capsys):
    log, prefix = moto[1], f"{BUCKET}/rerun"
    cfg = config(data, s3_url("raw"), s3_url("rerun"))
    run_tokenize(cfg, local=True)
    written = puts(log, prefix)  # one put per object; a shard's stats the last of its objects
    assert sorted(written) == sorted(files(s3_url("rerun")))
    for name in ("shapes-000000", "shapes-000001", "shapes-000002", "zodd"):
        mine = [n for n in written if n.startswith(f"{name}.")]
        assert mine == [f"{name}.tar", f"{name}.errors.jsonl", f"{name}.stats.json"]
    capsys.readouterr()
    run_tokenize(cfg, local=True)
    assert "4 already done, 0 to tokenize" in capsys.readouterr().out
    assert puts(log, prefix)[len(written) :] == ["errors.jsonl", "manifest.json"]  # no shard written again
    s3.rm(f"{prefix}/shapes-000001.stats.json")  # as if killed between the shard's tar and its stats
    run_tokenize(cfg, local=True)
    assert "3 already done, 1 to tokenize" in capsys.readouterr().out
    assert puts(log, prefix)[len(written) + 2 :] == [
        *("shapes-000001.tar", "shapes-000001.errors.jsonl", "shapes-000001.stats.json"),
        *("errors.jsonl", "manifest.json"),
    ]
    assert_same_output(s3_url("rerun"), data / "plain")
    for kw, field in (({"sizes": [(32, 32)]}, "sizes"), ({"min_side": 8}, "min_side")):
        with pytest.raises(SystemExit, match=rf"differs in: {field}\); use a new --output"):
            run_tokenize(config(data, s3_url("raw"), s3_url("rerun"), **kw), local=True)


KILLED_RUN = """
import json, sys
from data_pipeline.tokenize import TokenizeConfig, run_tokenize
run_tokenize(TokenizeConfig(**json.loads(sys.argv[1])), local=True)
"""


def test_a_killed_job_rerun_holds_every_sample_once(data, s3, capsys):
    """The fault hook kills the local job (os._exit) after 4 chunks of 7 samples: in the second shard of four."""
    cfg = config(data, s3_url("raw"), s3_url("killed"), fault_kill_after=4, **SPLIT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the AWS_* variables of the fixture included
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, json.dumps(asdict(cfg))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    s3.invalidate_cache()
    left = {posixpath.relpath(p, f"{BUCKET}/killed") for p in s3.find(f"{BUCKET}/killed")}
    assert {n for n in left if n.endswith(".stats.json")} == {
        "shapes-000000.stats.json",
        "val/shapes-000000.stats.json",
    }
    assert FAULT_MARKER in left and "manifest.json" not in left
    capsys.readouterr()
    run_tokenize(cfg, local=True)
    assert "1 already done, 3 to tokenize" in capsys.readouterr().out
    keys = keys_of(s3_url("killed"))
    assert len(keys) == len(set(keys)) == len(keys_of(str(data / "split")))  # every sample exactly once
    assert_same_output(s3_url("killed"), data / "split")  # duplicates dropped once, the val side too
    split = json.loads((data / "split" / "manifest.json").read_text())
    val = json.loads((data / "split" / VAL_DIR / "manifest.json").read_text())
    assert split["skipped"].get("duplicate_image", 0) + val["skipped"].get("duplicate_image", 0) == 2


# ---- (4) the Ray path -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_ray_job_reads_and_writes_s3_like_the_local_path(data, s3):
    """Ray's workers read the input from S3 with the driver's AWS environment (a local Ray inherits it); an encoder
    actor is killed once and its chunk redone; with --dedup the shards are written in input order."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        run_tokenize(config(data, s3_url("raw"), s3_url("ray"), fault_kill_after=2, **SPLIT))
    finally:
        ray.shutdown()
    s3.invalidate_cache()
    assert s3.exists(f"{BUCKET}/ray/{FAULT_MARKER}")  # the actor died once (it wrote the marker to S3)
    assert_same_output(s3_url("ray"), data / "split")
