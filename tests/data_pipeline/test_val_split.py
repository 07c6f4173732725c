"""The held-out validation split of the tokenize job (`--val-fraction`): a stable hash of each sample's source key
decides, so the val set does not depend on the shard layout; train and val partition what F=0 writes (kept and
skipped samples, notes), both manifests record the split, val/ loads with BinaryTokenLoader, a changed fraction is
refused in one line, a killed job resumes both halves, and F=0 writes today's output."""

import io
import itertools
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers.data import make_tokenizers, write_tar
from PIL import Image

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig
from data_pipeline.shard_format import VAL_DIR, load_manifest, read_shard
from data_pipeline.tokenize import TokenizeConfig, in_val, parse_args, run_tokenize, split_point

F = 0.3
CAPTIONS = ["a red circle", "two blue squares"]
TODAYS_MANIFEST_KEYS = {
    *("format", "kind", "config_hash", "identity", "bits_per_token", "downsample", "shards", "samples", "inputs"),
    *("skipped", "notes", "size_histogram", "text_tokens"),
}


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, (37 * i) % 256, 30)).save(buf, format="PNG")
    return buf.getvalue()


def make_raw(root: Path) -> None:
    """3 tars of 14 samples: every 7th an undecodable image (skipped), every 5th an empty caption (kept, noted)."""
    for t in range(3):
        members = []
        for i in range(14):
            key = f"t{t}s{i:03d}"
            members += [(f"{key}.png", b"not an image" if i % 7 == 3 else png(i))]
            members += [(f"{key}.txt", b"" if i % 5 == 0 else CAPTIONS[i % 2].encode())]
        write_tar(root / f"part-{t}.tar", members)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("valsplit")
    make_tokenizers(root)  # root / "text", root / "ae"
    make_raw(root / "raw")
    tokenize(root, "base", val_fraction=0.0)
    tokenize(root, "split", val_fraction=F)
    return root


def config(root: Path, out: str, **kw) -> TokenizeConfig:
    base = dict(
        source="wds",
        input=str(root / "raw"),
        output=str(root / out),
        tokenizer=str(root / "ae"),
        text_tokenizer=str(root / "text"),
        parallel_num=4,
        sizes=[(32, 32)],
    )
    return TokenizeConfig(**{**base, **kw})


def tokenize(root: Path, out: str, **kw) -> dict:
    return run_tokenize(config(root, out, **kw), local=True)


def records(out: Path) -> dict:
    return {r.key: r for tar in sorted(out.glob("*.tar")) for r in read_shard(tar)}


def errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


# ---- (1) the hash ------------------------------------------------------------------------------------------------


def test_split_point_is_stable_and_holds_out_about_the_fraction():
    keys = [f"images/{i:05d}.jpg" for i in range(600)]
    points = [split_point(k) for k in keys]
    assert all(0.0 <= p < 1.0 for p in points) and len(set(points)) == len(points)
    # pinned: another hash would silently move samples between train and val of existing datasets
    assert split_point("images/00000.jpg") == 0.7672197858437092
    for fraction in (0.05, 0.2, 0.5):
        share = sum(in_val(k, fraction) for k in keys) / len(keys)
        assert abs(share - fraction) < 4 * (fraction * (1 - fraction) / len(keys)) ** 0.5 + 1e-9, (fraction, share)
    small, large = ({k for k in keys if in_val(k, f)} for f in (0.1, 0.3))
    assert small < large  # a larger fraction only adds samples
    assert not any(in_val(k, 0.0) for k in keys)


# ---- (2) train + val == what F=0 writes -------------------------------------------------------------------------


def test_train_and_val_partition_every_sample_of_the_unsplit_run(data):
    base, train, val = data / "base", data / "split", data / "split" / VAL_DIR
    everything, kept, held = records(base), records(train), records(val)
    assert kept and held and not kept.keys() & held.keys()
    assert kept.keys() | held.keys() == everything.keys()
    assert all(in_val(r.source_key, F) for r in held.values())
    assert not any(in_val(r.source_key, F) for r in kept.values())
    for k, r in {**kept, **held}.items():  # the same bits, text ids and metadata as without a split
        assert np.array_equal(r.bits, everything[k].bits) and r.meta() == everything[k].meta(), k
    m, v, b = load_manifest(train), load_manifest(val), load_manifest(base)
    assert m["samples"] + v["samples"] == b["samples"] == 36
    assert m["inputs"] + v["inputs"] == b["inputs"] == 42
    for field in ("skipped", "notes", "size_histogram"):  # every kept or skipped sample counted on exactly one side
        total = {k: m[field].get(k, 0) + v[field].get(k, 0) for k in b[field]}
        assert total == b[field] and set(m[field]) | set(v[field]) <= set(b[field]), field
    both = errors(train) + errors(val)
    assert sorted(e["key"] for e in both) == sorted(e["key"] for e in errors(base))
    assert all(in_val(e["source_key"], F) for e in errors(val))
    assert not any(in_val(e["source_key"], F) for e in errors(train))


def test_the_same_samples_are_held_out_whatever_the_shard_layout(data, tmp_path):
    """Folder sources cut shards by --samples-per-shard: other shards, other output keys, the same val samples."""
    for i in range(30):
        (tmp_path / "imgs" / f"{i % 3}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / f"{i % 3}" / f"{i:03d}.png").write_bytes(png(i))
        (tmp_path / "imgs" / f"{i % 3}" / f"{i:03d}.txt").write_text(CAPTIONS[i % 2])
    held = []
    for per_shard in (4, 11, 100):
        out = tmp_path / f"out-{per_shard}"
        tokenize(
            data, str(out), source="folder", input=str(tmp_path / "imgs"), samples_per_shard=per_shard, val_fraction=F
        )
        held.append({r.source_key for r in records(out / VAL_DIR).values()})
        assert len(records(out)) + len(held[-1]) == 30
    assert held[0] and held[0] == held[1] == held[2]
    # by 4, the last input shard holds no val sample: its (empty) val shard is finished but not listed
    out = tmp_path / "out-4"
    listed = [s["name"] for s in load_manifest(out / VAL_DIR)["shards"]]
    assert len(listed) == 7 and "folder-000007.tar" not in listed
    assert read_shard(out / VAL_DIR / "folder-000007.tar") == []
    assert json.loads((out / VAL_DIR / "folder-000007.stats.json").read_text())["ok"] == 0
    assert held[0] == {f"{i % 3}/{i:03d}.png" for i in range(30) if in_val(f"{i % 3}/{i:03d}.png", F)}


# ---- (3) manifests, loading --------------------------------------------------------------------------------------


def test_both_manifests_record_the_split_and_val_loads_with_the_training_loader(data, capsys):
    m, v = load_manifest(data / "split"), load_manifest(data / "split" / VAL_DIR)
    assert (m["split"], v["split"]) == ("train", "val") and m["val_fraction"] == v["val_fraction"] == F
    assert (
        m["identity"] == v["identity"] and m["identity"]["val_fraction"] == F and m["config_hash"] == v["config_hash"]
    )
    assert m["text_tokens"] == v["text_tokens"] and m["kind"] == v["kind"] == "t2i"
    assert sum(s["samples"] for s in v["shards"]) == v["samples"] and all(s["samples"] for s in v["shards"])
    for name in ("part-0", "part-1", "part-2"):  # every input shard has both halves (the resume marker: its stats)
        assert all(
            (d / f"{name}.tar").is_file() and (d / f"{name}.stats.json").is_file()
            for d in (data / "split", data / "split" / VAL_DIR)
        )
    held = {k for k in records(data / "split" / VAL_DIR)}
    cfg = LoaderConfig(data / "split" / VAL_DIR, kind="t2i", num_workers=0, shuffle_buffer=0, debug_keys=True)
    seen = {key for _, keys in itertools.islice(BinaryTokenLoader(cfg, 0, 1), 3 * len(held)) for _, key in keys}
    assert seen == held  # every val sample, nothing else
    tokenize(data, "split", val_fraction=F)  # a re-run prints the counts of both sides
    out = capsys.readouterr().out
    assert f"{m['samples']} train samples" in out and f"{v['samples']} val samples" in out and "0 to tokenize" in out


# ---- (4) identity, resumption ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.2])
def test_changing_the_val_fraction_of_an_output_is_refused_in_one_line(data, fraction):
    with pytest.raises(SystemExit, match=r"differs in: val_fraction\); use a new --output") as err:
        tokenize(data, "split", val_fraction=fraction)
    assert "\n" not in str(err.value.code)
    with pytest.raises(SystemExit, match="differs in: val_fraction"):  # and the other way round
        tokenize(data, "base", val_fraction=fraction or F)


def test_a_killed_job_resumes_both_halves(data, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(data / "split", out)
    want_train, want_val = records(out), records(out / VAL_DIR)
    mtime = (out / "part-0.tar").stat().st_mtime_ns
    (out / VAL_DIR / "part-1.stats.json").unlink()  # killed after the val shard's tar, before its stats
    (out / "part-2.stats.json").unlink()  # killed after the val shard, before the train shard's stats
    (out / "part-2.tar").unlink()
    tokenize(data, str(out), val_fraction=F)
    assert "2 to tokenize" in capsys.readouterr().out
    assert (out / "part-0.tar").stat().st_mtime_ns == mtime  # finished shards are skipped
    got_train, got_val = records(out), records(out / VAL_DIR)
    assert got_train.keys() == want_train.keys() and got_val.keys() == want_val.keys()
    assert all(np.array_equal(got_val[k].bits, want_val[k].bits) for k in got_val)
    assert load_manifest(out / VAL_DIR) == load_manifest(data / "split" / VAL_DIR)


# ---- (5) F = 0 ---------------------------------------------------------------------------------------------------


def test_no_split_writes_todays_output(data):
    base = data / "base"
    assert not (base / VAL_DIR).exists()
    m = load_manifest(base)
    assert set(m) == TODAYS_MANIFEST_KEYS and "val_fraction" not in m["identity"]
    assert [s["name"] for s in m["shards"]] == ["part-0.tar", "part-1.tar", "part-2.tar"]
    # the train side of a split writes the same tar members for the samples it keeps
    held = set(records(data / "split" / VAL_DIR))
    for name in ("part-0.tar", "part-1.tar", "part-2.tar"):
        with tarfile.open(base / name) as a, tarfile.open(data / "split" / name) as b:
            want = [(i.name, a.extractfile(i).read()) for i in a if i.name.partition(".")[0] not in held]
            assert want == [(i.name, b.extractfile(i).read()) for i in b]


@pytest.mark.parametrize("value", ["1", "-0.1", "nan"])
def test_a_fraction_outside_0_1_is_a_one_line_cli_error(data, value, capsys):
    args = [
        "--source",
        "wds",
        "--input",
        str(data / "raw"),
        "--output",
        str(data / "x"),
        "--tokenizer",
        str(data / "ae"),
    ]
    with pytest.raises(SystemExit):
        parse_args([*args, "--text-tokenizer", str(data / "text"), "--val-fraction", value])
    assert capsys.readouterr().err.strip().startswith(f"error: --val-fraction must be in [0, 1), got {float(value)}")


# ---- the Ray path ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_ray_job_splits_exactly_as_the_local_path(data):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        run_tokenize(config(data, "ray", val_fraction=F, num_actors=1, chunk_samples=5, batch_size=4))
    finally:
        ray.shutdown()
    for side in ("", VAL_DIR):
        local, remote = records(data / "split" / side), records(data / "ray" / side)
        assert local.keys() == remote.keys() and all(np.array_equal(local[k].bits, remote[k].bits) for k in local)
        assert load_manifest(data / "ray" / side) == load_manifest(data / "split" / side)
