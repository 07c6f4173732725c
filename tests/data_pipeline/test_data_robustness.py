"""Data pipeline robustness: every lost sample is counted under a named reason (duplicate keys, two images for one
key, tars cut at a member boundary); the training loader checks shard sizes against the manifest; 16-bit grey images
keep their brightness; an output folder inside the input is refused; an empty caption is a kept, counted
unconditional sample; the work per sample is bounded (aspect ratio, pixels, member size) and one bad sample never
fails its shard; a token budget nothing fits and `--num-cpus 0` are one-line errors, not hangs; the tokenize job's
own Ray listens on loopback only."""

import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import write_tar
from PIL import Image

from data_pipeline.image_ops import SkipSample, decode_image
from data_pipeline.loader import BinaryTokenLoader, LoaderConfig, ShardMismatch
from data_pipeline.shard_format import read_shard
from data_pipeline.sources import SourceConfig, iter_samples, list_shards
from data_pipeline.tokenize import TokenizeConfig, run_tokenize
from models.t2i.text_tokenizer import build_chat_tokenizer
from models.tokenizer.io import save_tokenizer
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config

CAPTIONS = ["a red square", "a blue square"]
REPO = Path(__file__).resolve().parents[2]


def png(h: int = 32, w: int = 32, color=(200, 30, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def sample(key: str, caption: str = "a red square", image: bytes | None = None) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", image or png()), (f"{key}.txt", caption.encode())]


def cut_after(path: Path, members: int) -> None:
    """Cut a tar right after its first `members` members: a shorter archive without its end-of-archive marker."""
    with tarfile.open(path) as tar:
        info = tar.getmembers()[members - 1]
    end = info.offset_data + -(-info.size // 512) * 512
    path.write_bytes(path.read_bytes()[:end])


def samples_of(path: Path) -> list:
    cfg = SourceConfig("wds", str(path))
    (shard,) = list_shards(cfg)
    return list(iter_samples(shard, cfg))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    cfg = get_tokenizer_config("tiny")
    torch.manual_seed(0)
    save_tokenizer(BinaryAutoencoder(cfg), cfg, root / "ae", name="tiny")
    return root / "ae", build_chat_tokenizer(CAPTIONS, root / "text", vocab_size=300)


def tokenize(tokenizers, raw: Path, out: Path, **kw) -> dict:
    ae, text = tokenizers
    base = dict(
        source="wds",
        input=str(raw),
        output=str(out),
        tokenizer=str(ae),
        text_tokenizer=str(text),
        parallel_num=4,
        sizes=[(32, 32)],
    )
    return run_tokenize(TokenizeConfig(**{**base, **kw}), local=True)


# ---- point 6: silent sample loss --------------------------------------------------------------------------------


def test_a_key_twice_in_a_row_or_later_is_a_counted_duplicate(tmp_path):
    members = sample("a") + sample("a", "a blue square") + sample("b") + sample("a")
    rows = samples_of(write_tar(tmp_path / "t.tar", members))
    want = [("a", None), ("a", "duplicate_key"), ("b", None), ("a", "duplicate_key")]
    assert [(r.key, r.error) for r in rows] == want
    assert rows[0].caption == "a red square"


def test_a_key_with_two_images_is_counted_not_silently_halved(tmp_path):
    members = [("a.jpg", png()), ("a.png", png()), ("a.txt", b"a red square"), *sample("b")]
    rows = samples_of(write_tar(tmp_path / "t.tar", members))
    assert [(r.key, r.error) for r in rows] == [("a", "multiple_images"), ("b", None)]


def test_a_tar_cut_at_a_member_boundary_counts_its_lost_rest(tmp_path):
    path = write_tar(tmp_path / "t.tar", [m for i in range(4) for m in sample(f"s{i}")])
    assert [r.error for r in samples_of(path)] == [None] * 4  # intact: no false alarm
    cut_after(path, 4)  # two whole samples left, no end-of-archive marker
    rows = samples_of(path)
    assert [r.error for r in rows] == [None, None, "truncated_shard"]
    assert "end-of-archive" in rows[-1].detail


def test_tokenize_counts_every_lost_sample_under_its_reason(tokenizers, tmp_path):
    two_images = [("y.jpg", png()), ("y.png", png()), ("y.txt", b"a red square")]
    write_tar(tmp_path / "raw" / "a.tar", sample("x") + sample("x") + two_images + sample("z"))
    write_tar(tmp_path / "raw" / "b.tar", [m for i in range(3) for m in sample(f"s{i}")])
    cut_after(tmp_path / "raw" / "b.tar", 2)
    manifest = tokenize(tokenizers, tmp_path / "raw", tmp_path / "out")
    assert manifest["skipped"] == {"duplicate_key": 1, "multiple_images": 1, "truncated_shard": 1}
    assert manifest["samples"] == 3 and manifest["samples"] + sum(manifest["skipped"].values()) == manifest["inputs"]


def test_the_loader_refuses_a_shard_shorter_than_its_manifest(tokenizers, tmp_path):
    write_tar(tmp_path / "raw" / "part.tar", [m for i in range(24) for m in sample(f"s{i:02d}", CAPTIONS[i % 2])])
    manifest = tokenize(tokenizers, tmp_path / "raw", tmp_path / "out")
    assert manifest["shards"] == [{"name": "part.tar", "samples": 24, "tokens": 24 * 16 * 16}]
    shard = tmp_path / "out" / "part.tar"
    cut_after(shard, 24)  # 12 of 24 samples (two members each), cut at a member boundary
    loader = BinaryTokenLoader(LoaderConfig(tmp_path / "out", num_workers=0, shuffle_buffer=0), 0, 1)
    with pytest.raises(ShardMismatch, match="holds 12 samples but .* lists 24") as err:
        for _ in itertools.islice(loader, 200):
            pass
    assert "\n" not in str(err.value)


# ---- point 7: 16-bit grey ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1000, 40000])
def test_16_bit_grey_converts_by_the_format_range(value):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    rgb = np.asarray(decode_image(buf.getvalue()))
    assert rgb.shape == (8, 8, 3) and np.all(rgb == round(value / 257))  # 1000 -> 4 (dark), 40000 -> 156


# ---- point 8: output inside the input ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["tokens", "."])
def test_an_output_folder_inside_the_input_is_refused(tokenizers, tmp_path, where):
    write_tar(tmp_path / "raw" / "a.tar", sample("x"))
    out = tmp_path / "raw" / where
    with pytest.raises(SystemExit, match="is inside --input .* choose an output folder outside the input") as err:
        tokenize(tokenizers, tmp_path / "raw", out)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["a.tar"]  # nothing created


# ---- point 9: empty captions ------------------------------------------------------------------------------------


def test_an_empty_caption_is_a_kept_unconditional_sample_counted_apart(tokenizers, tmp_path):
    members = sample("a", "") + sample("b", "   ") + [("c.png", png()), ("c.json", b'{"caption": ""}')]
    members += [("d.png", png())] + sample("e")  # d: no caption at all
    write_tar(tmp_path / "raw" / "part.tar", members)
    manifest = tokenize(tokenizers, tmp_path / "raw", tmp_path / "out")
    assert manifest["samples"] == 4 and manifest["notes"] == {"empty_caption": 3}
    assert manifest["skipped"] == {"missing_caption": 1}
    from models.t2i.text_tokenizer import T2ITextTokenizer

    uncond = T2ITextTokenizer.from_folder(tokenizers[1], 4).uncond_ids()
    records = read_shard(tmp_path / "out" / "part.tar")
    assert [r.source_key for r in records] == ["a", "b", "c", "e"]
    assert [r.text_ids == uncond for r in records] == [True, True, True, False]
    assert [r.caption for r in records][:3] == ["", "", ""]


# ---- point 10: bounded work per sample --------------------------------------------------------------------------


def test_an_extreme_aspect_ratio_is_refused_from_the_header():
    for w, h in ((8000, 1), (1, 40000)):
        with pytest.raises(SkipSample) as err:
            decode_image(png(h, w))
        assert err.value.reason == "extreme_aspect"
    assert decode_image(png(10, 80)).size == (80, 10)  # 8:1 is still fine


def test_an_oversized_member_is_never_read_and_counted(tmp_path):
    members = [("big.png", png(64, 64)), ("big.txt", b"a red square"), *sample("ok")]
    path = write_tar(tmp_path / "t.tar", members)
    cfg = SourceConfig("wds", str(path), max_member_bytes=len(png()) + 1)
    rows = list(iter_samples(list_shards(cfg)[0], cfg))
    assert [(r.key, r.error) for r in rows] == [("big", "member_too_large"), ("ok", None)]


def test_one_failing_sample_never_fails_its_shard(tokenizers, tmp_path, monkeypatch):
    import data_pipeline.tokenize as tok

    prepare = tok._prepare

    def flaky(raw, cfg):
        if raw.key == "b":
            raise MemoryError
        if raw.key == "c":
            raise ValueError("math domain error")
        return prepare(raw, cfg)

    monkeypatch.setattr(tok, "_prepare", flaky)
    write_tar(tmp_path / "raw" / "part.tar", [m for k in "abcd" for m in sample(k)])
    manifest = tokenize(tokenizers, tmp_path / "raw", tmp_path / "out")
    assert manifest["samples"] == 2 and manifest["skipped"] == {"out_of_memory": 1, "processing_error": 1}


class Zeros(io.RawIOBase):
    """`size` zero bytes, read in pieces (no buffer of that size)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


MEASURE = """
import json, sys
from data_pipeline.sources import list_shards
from data_pipeline.tokenize import TokenizeConfig, _text_tokenizer, decode_shard

def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

raw, text = sys.argv[1], sys.argv[2]
cfg = TokenizeConfig(source="wds", input=raw, output=raw + "_out", tokenizer="unused", text_tokenizer=text,
                     parallel_num=4)
_text_tokenizer(text, 4).prompt_ids("warm up")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = kib("VmRSS")
reasons, ok = [], 0
for shard in list_shards(cfg.source_config()):
    chunks = decode_shard(shard, cfg)
    reasons += [e["reason"] for e in chunks[0]["errors"]]
    ok += sum(len(c["samples"]) for c in chunks)
print(json.dumps({"growth_mb": (kib("VmHWM") - before) / 1024, "reasons": sorted(reasons), "ok": ok}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_planted_files_stay_under_a_memory_bound(tokenizers, tmp_path):
    """An 8000x1 and a 1x40000 PNG (a 524-megapixel intermediate, a MemoryError) and a 1 MB gzip ".tar" holding a
    1 GiB member: the decoding process's peak RSS (VmHWM, reset before the work) grows by less than 200 MB over its
    RSS before (the old code: gigabytes, or a MemoryError that failed the shard); the good samples survive, each
    planted one is counted."""
    raw = tmp_path / "raw"
    write_tar(raw / "wide.tar", sample("wide", image=png(1, 8000)) + sample("tall", image=png(40000, 1)) + sample("ok"))
    with tarfile.open(raw / "bomb.tar", "w:gz", compresslevel=6) as tar:  # gzip, though named .tar
        info = tarfile.TarInfo("big.png")
        info.size = 2**30
        tar.addfile(info, io.BufferedReader(Zeros(info.size), 1 << 20))
        for name, payload in sample("after"):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert (raw / "bomb.tar").stat().st_size < 2 * 2**20
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(raw), str(tokenizers[1])],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["reasons"] == ["extreme_aspect", "extreme_aspect", "member_too_large"], result
    assert result["ok"] == 2, result
    assert 0 <= result["growth_mb"] < 200, result


# ---- point 11: hangs --------------------------------------------------------------------------------------------


def run_py(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter; a hang fails the test at `timeout` instead of hanging the suite."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


ITERATE = """
import itertools, sys
from data_pipeline.loader import BinaryTokenLoader, LoaderConfig, LoaderError
cfg = LoaderConfig(sys.argv[1], num_workers=0, token_budget=int(sys.argv[2]), caption_dropout=0.0)
try:
    for _ in itertools.islice(BinaryTokenLoader(cfg, 0, 1), 3):
        pass
except LoaderError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


@pytest.fixture(scope="module")
def shards(tokenizers, tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    write_tar(root / "raw" / "part.tar", [m for i in range(24) for m in sample(f"s{i:02d}", CAPTIONS[i % 2])])
    tokenize(tokenizers, root / "raw", root / "out")
    return root / "out"


def test_a_token_budget_below_every_sample_is_refused_up_front(shards):
    proc = run_py(ITERATE, str(shards), "50")  # a 32x32 image alone is 16 x 16 = 256 tokens
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "data.token_budget=50 is smaller than every sample" in err and "\n" not in err, err


def test_a_token_budget_that_no_real_sample_fits_stops_instead_of_spinning(shards):
    from models.t2i.text_tokenizer import T2ITextTokenizer

    shortest = (
        2 + 16 * 16 + len(T2ITextTokenizer.from_folder(shards.parent.parent / "tokenizers0" / "text", 4).uncond_ids())
    )
    proc = run_py(ITERATE, str(shards), str(shortest))  # fits an unconditional sample; every captioned one is longer
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]  # after the loader's one warning about skipping
    assert err.startswith(f"10000 samples in a row exceed data.token_budget={shortest}"), proc.stderr


def test_num_cpus_zero_is_refused_in_one_line(tokenizers, tmp_path):
    write_tar(tmp_path / "raw" / "a.tar", sample("x"))
    ae, text = tokenizers
    args = ["--source", "wds", "--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out")]
    args += ["--tokenizer", str(ae), "--text-tokenizer", str(text), "--parallel-num", "4", "--num-cpus", "0"]
    proc = run_py("from data_pipeline.tokenize import main; main()", *args, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --num-cpus must be >= 1, got 0", proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_training_reports_a_token_budget_nothing_fits_in_one_line(shards, tmp_path):
    config = REPO / "training" / "configs" / "tiny_t2i.yaml"
    args = ["-m", "training.train", "--config", str(config), f"run_dir={tmp_path / 'run'}", f"data.data_dir={shards}"]
    args += ["data.token_budget=50", "logging.wandb=disabled"]
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    expected = "python -m training.train: error: data.token_budget=50 is smaller than every sample"
    assert err.startswith(expected), proc.stderr[-3000:]


# ---- point 12: the local Ray listens on loopback only -----------------------------------------------------------

LISTENING = """
import json, psutil
from data_pipeline.ray_local import connect_ray
ray = connect_ray(None, 1)
try:
    ray.get(ray.remote(lambda: 1).remote())  # a worker is up too
    sockets = []
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:  # the driver and what Ray started
        for c in proc.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                sockets.append([proc.name(), c.laddr.ip, c.laddr.port])
    print(json.dumps({"node": ray.util.get_node_ip_address(), "sockets": sockets}))
finally:
    ray.shutdown()
"""
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.mark.slow
def test_the_local_ray_of_the_tokenize_job_listens_on_loopback_only():
    pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", LISTENING],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["node"] == "127.0.0.1"
    names = {name for name, _, _ in result["sockets"]}
    assert {"gcs_server", "raylet"} <= names, result  # the servers were seen
    assert all(ip in LOOPBACK for _, ip, _ in result["sockets"]), result["sockets"]
