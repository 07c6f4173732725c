"""Filters at tokenization (local path): --min-side, --min-pixels, --max-aspect and --min-score each drop exactly the
samples they should and count them under their own reason (manifest `skipped`, errors.jsonl); --dedup keeps the copy
of equal pixels in the earliest input shard, across shards, inside one, and across a job killed after its first shard
and re-run; the filter settings are part of the dataset identity; with every filter off the output is today's."""

import io
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from helpers.data import make_tokenizers, write_tar
from PIL import Image

from data_pipeline.image_ops import decode_image, pixel_digest
from data_pipeline.shard_format import VAL_DIR, load_manifest, read_shard
from data_pipeline.sources import list_shards
from data_pipeline.storage import Output
from data_pipeline.tokenize import (
    ChunkEncoder,
    Dedup,
    OutputWriter,
    TokenizeConfig,
    decode_shard,
    parse_args,
    run_tokenize,
)

REPO = Path(__file__).resolve().parents[2]
TODAYS_IDENTITY_KEYS = {
    *("format", "mode", "image_tokenizer", "gan_decoder", "image_tokenizer_sha256", "max_pixels", "sizes"),
    "text_tokenizer",
}

# key: (width, height, scores); every image has its own colour (no duplicates)
FILTER_SAMPLES = {
    "p0s0": (32, 32, {"aesthetic": 6.0, "clip": 0.5}),
    "p0s1": (40, 12, {"aesthetic": 4.9, "clip": 0.5}),  # short side 12, 480 px, aspect 3.3
    "p0s2": (24, 24, {"aesthetic": 5.0}),  # 576 px; aesthetic on the bound (kept); no clip
    "p0s3": (64, 24, {"clip": 0.2}),  # aspect 2.67; no aesthetic
    "p1s0": (14, 30, {"aesthetic": 7.0, "clip": 0.1}),  # short side 14, 420 px, aspect 2.14
    "p1s1": (30, 20, {"aesthetic": 5.5, "clip": 0.3}),  # 600 px; clip on the bound
    "p1s2": (16, 40, {"aesthetic": 1.0, "clip": 0.9}),  # short side 16 (kept), 640 px, aspect 2.5 (kept)
    "p1s3": (28, 25, {}),  # 700 px (kept); no scores
}


def png(w: int, h: int, color, mode: str = "RGB", level: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).convert(mode).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def sample(key: str, image: bytes, scores: dict | None = None) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", image), (f"{key}.json", json.dumps({"caption": "a red circle", **(scores or {})}).encode())]


def make_filter_raw(root: Path) -> None:
    for part in (0, 1):
        members = []
        for i, (key, (w, h, scores)) in enumerate(FILTER_SAMPLES.items()):
            if key.startswith(f"p{part}"):
                members += sample(key, png(w, h, (30 * i, 200 - 20 * i, 90)), scores)
        write_tar(root / f"part-{part}.tar", members)


A, B, C, D, E = ((200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 0), (0, 90, 90))
DUPLICATES = {"p1a": "p0a", "p1b": "p0b", "p2a": "p0a", "p2e2": "p2e"}  # dropped copy -> the copy kept


def make_dup_raw(root: Path) -> None:
    """Equal pixels in other files: another PNG compression level, an opaque RGBA PNG; across shards and inside one."""
    write_tar(
        root / "part-0.tar",
        sample("p0a", png(32, 32, A)) + sample("p0b", png(24, 40, B)) + sample("p0c", png(32, 32, C)),
    )
    part1 = (
        sample("p1a", png(32, 32, A, level=1)) + sample("p1d", png(32, 32, D)) + sample("p1b", png(24, 40, B, level=9))
    )
    write_tar(root / "part-1.tar", part1)
    part2 = (
        sample("p2a", png(32, 32, A, mode="RGBA"))
        + sample("p2e", png(32, 32, E))
        + sample("p2e2", png(32, 32, E, level=0))
    )
    part2 += sample("p2f", png(40, 24, B))  # B's colour, another shape: not a duplicate
    write_tar(root / "part-2.tar", part2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("filters")
    make_tokenizers(root)  # root / "text", root / "ae"
    make_filter_raw(root / "raw")
    make_dup_raw(root / "dups")
    return root


def config(root: Path, out, raw: str = "raw", **kw) -> TokenizeConfig:
    base = dict(
        source="wds",
        input=str(root / raw),
        output=str(root / out),
        tokenizer=str(root / "ae"),
        text_tokenizer=str(root / "text"),
        parallel_num=4,
        sizes=[(32, 32)],
    )
    return TokenizeConfig(**{**base, **kw})


def tokenize(root: Path, out, raw: str = "raw", **kw) -> dict:
    return run_tokenize(config(root, out, raw, **kw), local=True)


def source_keys(out: Path) -> list[str]:
    return [r.source_key for tar in sorted(out.glob("*.tar")) for r in read_shard(tar)]


def errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


# ---- each filter ------------------------------------------------------------------------------------------------


def _side(w, h, s):
    return min(w, h) < 16


def _pixels(w, h, s):
    return w * h < 700


def _aspect(w, h, s):
    return max(w, h) / min(w, h) > 2.5


CASES = {
    "min_side": ({"min_side": 16}, {"too_small": _side}),
    "min_pixels": ({"min_pixels": 700}, {"too_few_pixels": _pixels}),
    "max_aspect": ({"max_aspect": 2.5}, {"extreme_aspect": _aspect}),
    "min_score": (
        {"min_score": {"aesthetic": 5.0}},
        {
            "low_score:aesthetic": lambda w, h, s: s.get("aesthetic", 9) < 5,
            "missing_score:aesthetic": lambda w, h, s: "aesthetic" not in s,
        },
    ),
    "two_scores": (  # columns are checked in sorted order: a sample failing both counts under aesthetic
        {"min_score": {"clip": 0.3, "aesthetic": 5.0}},
        {
            "low_score:aesthetic": lambda w, h, s: s.get("aesthetic", 9) < 5,
            "missing_score:aesthetic": lambda w, h, s: "aesthetic" not in s,
            "low_score:clip": lambda w, h, s: "aesthetic" in s and s["aesthetic"] >= 5 and s.get("clip", 9) < 0.3,
            "missing_score:clip": lambda w, h, s: s.get("aesthetic", 0) >= 5 and "clip" not in s,
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_filter_drops_exactly_its_samples_and_counts_them(data, case):
    kw, reasons = CASES[case]
    manifest = tokenize(data, f"f-{case}", **kw)
    want = {r: {k for k, (w, h, s) in FILTER_SAMPLES.items() if pred(w, h, s)} for r, pred in reasons.items()}
    assert all(want.values()), want  # the data exercises every reason
    dropped = set().union(*want.values())
    assert manifest["skipped"] == {r: len(keys) for r, keys in want.items()}
    assert manifest["samples"] == len(FILTER_SAMPLES) - len(dropped) and manifest["inputs"] == len(FILTER_SAMPLES)
    assert sorted(source_keys(data / f"f-{case}")) == sorted(set(FILTER_SAMPLES) - dropped)
    got = {}
    for e in errors(data / f"f-{case}"):
        got.setdefault(e["reason"], set()).add(e["source_key"])
        assert e["detail"], e
    assert got == want
    assert {k: v for k, v in manifest["identity"].items() if k not in TODAYS_IDENTITY_KEYS} == kw


def test_filters_together_count_each_sample_once_under_the_first_that_drops_it(data):
    manifest = tokenize(data, "f-all", min_side=16, min_pixels=700, max_aspect=2.5, min_score={"aesthetic": 5.0})
    # order: scores (before decoding), then the header: aspect, short side, pixels
    assert manifest["skipped"] == {
        "low_score:aesthetic": 2,  # p0s1, p1s2
        "missing_score:aesthetic": 2,  # p0s3, p1s3
        "too_small": 1,  # p1s0
        "too_few_pixels": 2,  # p0s2, p1s1
    }
    assert source_keys(data / "f-all") == ["p0s0"]


def test_filter_settings_are_part_of_the_identity(data):
    tokenize(data, "f-ident")
    for kw, field in (({"min_side": 16}, "min_side"), ({"dedup": True}, "dedup"), ({"max_aspect": 3.0}, "max_aspect")):
        with pytest.raises(SystemExit, match=rf"differs in: {field}\); use a new --output"):
            tokenize(data, "f-ident", **kw)
    tokenize(data, "f-ident-score", min_score={"aesthetic": 5.0})
    with pytest.raises(SystemExit, match=r"differs in: min_score\)"):
        tokenize(data, "f-ident-score", min_score={"aesthetic": 6.0})


def test_filters_off_give_todays_output(data):
    manifest = tokenize(data, "f-off")
    assert set(manifest["identity"]) == TODAYS_IDENTITY_KEYS
    assert manifest["skipped"] == {} and manifest["samples"] == len(FILTER_SAMPLES)
    assert not list((data / "f-off").glob("*.hashes.json"))
    # filters that drop nothing change no shard, only the identity
    noop = tokenize(data, "f-noop", min_side=1, min_pixels=1, dedup=True)
    assert tar_bytes(data / "f-noop") == tar_bytes(data / "f-off")
    assert noop["skipped"] == {} and noop["config_hash"] != manifest["config_hash"]
    assert {k: noop[k] for k in ("shards", "samples", "size_histogram")} == {
        k: manifest[k] for k in ("shards", "samples", "size_histogram")
    }


# ---- dedup ------------------------------------------------------------------------------------------------------


def test_equal_pixels_have_one_digest_whatever_the_file():
    a = [png(32, 32, A), png(32, 32, A, level=1), png(32, 32, A, mode="RGBA")]
    assert len({pixel_digest(decode_image(x)) for x in a}) == 1
    assert pixel_digest(decode_image(png(24, 40, B))) != pixel_digest(decode_image(png(40, 24, B)))  # same bytes count


def test_dedup_keeps_the_copy_in_the_earliest_shard(data):
    manifest = tokenize(data, "d-once", raw="dups", dedup=True)
    out = data / "d-once"
    assert manifest["skipped"] == {"duplicate_image": len(DUPLICATES)}
    assert manifest["inputs"] == 10 and manifest["samples"] == 10 - len(DUPLICATES)
    assert sorted(source_keys(out)) == ["p0a", "p0b", "p0c", "p1d", "p2e", "p2f"]
    dups = {e["source_key"]: e for e in errors(out)}
    assert set(dups) == set(DUPLICATES) and all(e["reason"] == "duplicate_image" for e in dups.values())
    keys = {r.source_key: r.key for tar in out.glob("*.tar") for r in read_shard(tar)}
    assert all(keys[kept] in dups[copy]["detail"] for copy, kept in DUPLICATES.items())
    digests = {}
    for path in sorted(out.glob("*.hashes.json")):  # beside each shard: the digest of each of its samples
        digests.update(json.loads(path.read_text()))
    assert set(digests) == set(keys.values()) and len(set(digests.values())) == len(digests)
    assert manifest["identity"]["dedup"] is True
    plain = tokenize(data, "d-plain", raw="dups")  # without --dedup every copy stays
    assert plain["samples"] == 10 and plain["skipped"] == {}


KILLED_RUN = """
import json, sys
from data_pipeline.tokenize import TokenizeConfig, run_tokenize
run_tokenize(TokenizeConfig(**json.loads(sys.argv[1])), local=True)
"""


def run_killed(cfg: TokenizeConfig) -> subprocess.CompletedProcess:
    """The local job in its own process, which the fault hook kills (os._exit) after `fault_kill_after` chunks."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", KILLED_RUN, json.dumps(asdict(cfg))]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_dedup_across_a_killed_and_resumed_job(data, capsys):
    want = tokenize(data, "d-whole", raw="dups", dedup=True)
    cfg = config(data, "d-resumed", raw="dups", dedup=True, fault_kill_after=2)  # one chunk per shard
    proc = run_killed(cfg)
    out = data / "d-resumed"
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.stats.json")) == ["part-0.stats.json"]  # killed in shard 2 of 3
    assert not (out / "manifest.json").exists() and (out / ".fault-injected").exists()
    capsys.readouterr()
    manifest = run_tokenize(cfg, local=True)
    assert "1 already done, 2 to tokenize" in capsys.readouterr().out
    assert manifest == want and manifest["skipped"] == {"duplicate_image": len(DUPLICATES)}
    assert tar_bytes(out) == tar_bytes(data / "d-whole")
    assert (out / "errors.jsonl").read_bytes() == (data / "d-whole" / "errors.jsonl").read_bytes()


def test_which_copy_is_kept_does_not_depend_on_the_order_shards_finish_in(data):
    """On the Ray path shards finish in any order; the writer holds a shard until the earlier ones are written."""
    want = tokenize(data, "d-order-want", raw="dups", dedup=True)
    cfg = config(data, "d-order", raw="dups", dedup=True)
    out = Output(cfg.output)
    out.make()
    shards = list_shards(cfg.source_config())
    encoder = ChunkEncoder(json.dumps(asdict(cfg)))
    chunks = {s.name: {i: encoder.encode_chunk(c) for i, c in enumerate(decode_shard(s, cfg))} for s in shards}
    writer = OutputWriter(out, cfg, shards, Dedup())
    assert [writer.add(name, chunks[name]) for name in ("part-2", "part-1", "part-0")] == [0, 0, 3]
    assert not writer.waiting
    assert tar_bytes(data / "d-order") == tar_bytes(data / "d-order-want")
    skipped = Counter()
    for stats in (data / "d-order").glob("*.stats.json"):
        skipped.update(json.loads(stats.read_text())["skipped"])
    assert skipped == want["skipped"]


def test_dedup_spans_train_and_val(data):
    tokenize(data, "d-split", raw="dups", dedup=True, val_fraction=0.5)
    out = data / "d-split"
    kept = source_keys(out) + source_keys(out / VAL_DIR)
    assert sorted(kept) == sorted(source_keys(data / "d-once"))  # the same copies, now on two sides
    assert source_keys(out) and source_keys(out / VAL_DIR)
    train, val = load_manifest(out), load_manifest(out / VAL_DIR)
    assert train["skipped"].get("duplicate_image", 0) + val["skipped"].get("duplicate_image", 0) == len(DUPLICATES)
    records = {r.source_key: r for d in (out, out / VAL_DIR) for tar in d.glob("*.tar") for r in read_shard(tar)}
    once = {r.source_key: r for tar in (data / "d-once").glob("*.tar") for r in read_shard(tar)}
    assert all(np.array_equal(records[k].bits, once[k].bits) for k in once)


# ---- flags ------------------------------------------------------------------------------------------------------


def cli(data: Path, *extra: str) -> list[str]:
    return [
        *("--source", "wds", "--input", str(data / "raw"), "--output", str(data / "x")),
        *("--tokenizer", str(data / "ae"), "--text-tokenizer", str(data / "text"), *extra),
    ]


def test_filter_flags(data, capsys):
    cfg = parse_args(cli(data, "--min-side", "16", "--min-pixels", "700", "--max-aspect", "3", "--dedup"))
    assert (cfg.min_side, cfg.min_pixels, cfg.max_aspect, cfg.dedup) == (16, 700, 3.0, True)
    cfg = parse_args(cli(data, "--min-score", "clip=0.3", "--min-score", "aesthetic=5"))
    assert cfg.min_score == {"aesthetic": 5.0, "clip": 0.3}
    assert parse_args(cli(data)).filters() == {}
    for bad, message in (
        (["--min-score", "aesthetic"], "must look like COLUMN=VALUE"),
        (["--min-score", "aesthetic=high"], "must look like COLUMN=VALUE"),
        (["--min-score", "a=1", "--min-score", "a=2"], "--min-score a is given twice"),
        (["--min-side", "-1"], "--min-side must be >= 0"),
        (["--source", "parquet", "--min-score", "clip=0.3"], "--min-score clip needs clip in --score-columns"),
    ):
        with pytest.raises(SystemExit):
            parse_args(cli(data, *bad))
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in err, (bad, err)
