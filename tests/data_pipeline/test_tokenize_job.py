"""The Ray tokenization job: bad data is counted and skipped, output is exact, resumable and fault tolerant."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.shard_format import load_manifest, read_shard
from data_pipeline.tokenize import TokenizeConfig, run_tokenize
from models.t2i.text_tokenizer import build_chat_tokenizer
from models.tokenizer.io import save_tokenizer
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config, images_to_tensor

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230)}


def png(h, w, color, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def add(tar, name, payload: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_dataset(root: Path) -> dict:
    """3 good tars (one with bad members), 1 unreadable tar. Returns expected counts."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {"inputs": 0, "skipped": {}}

    def skip(reason):
        expected["skipped"][reason] = expected["skipped"].get(reason, 0) + 1

    for t in range(3):
        with tarfile.open(root / f"part-{t:03d}.tar", "w") as tar:
            for i in range(12):
                name = list(COLORS)[(t + i) % 3]
                h, w = [(40, 40), (24, 72), (64, 32)][int(rng.integers(3))]
                add(tar, f"s{t}_{i:03d}.png", png(h, w, COLORS[name], "L" if i == 5 else "RGB"))
                add(tar, f"s{t}_{i:03d}.txt", f"a {name} square".encode())
                expected["inputs"] += 1
            if t == 1:
                add(tar, "corrupt.jpg", b"definitely not an image, just some bytes")
                add(tar, "corrupt.txt", b"broken")
                skip("decode_error")
                data = png(40, 40, (1, 2, 3))
                add(tar, "cut.png", data[: len(data) // 2])
                add(tar, "cut.txt", b"truncated")
                skip("truncated")
                add(tar, "huge.png", png(300, 300, (9, 9, 9)))
                add(tar, "huge.txt", b"too many pixels")
                skip("too_large")
                add(tar, "../escape.png", png(8, 8, (0, 0, 0)))
                skip("unsafe_path")
                add(tar, "/tmp/absolute.png", png(8, 8, (0, 0, 0)))
                skip("unsafe_path")
                add(tar, "nocap.png", png(40, 40, (5, 5, 5)))
                skip("missing_caption")
                expected["inputs"] += 6
    (root / "part-999.tar").write_bytes(b"this is not a tar archive at all" * 40)
    skip("unreadable_shard")
    expected["inputs"] += 1
    return expected


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    expected = make_dataset(root / "raw")
    ae_cfg = get_tokenizer_config("tiny")
    torch.manual_seed(0)
    save_tokenizer(BinaryAutoencoder(ae_cfg), ae_cfg, root / "ae", name="tiny")
    text = build_chat_tokenizer([f"a {c} square" for c in COLORS], root / "text", vocab_size=300)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield root, expected, text
    ray.shutdown()


def config(root, text, out, **kw):
    base = dict(
        source="wds",
        input=str(root / "raw"),
        output=str(root / out),
        tokenizer=str(root / "ae"),
        text_tokenizer=str(text),
        parallel_num=4,
        sizes=[(32, 32), (16, 64), (64, 16), (48, 24)],
        batch_size=4,
        chunk_samples=5,
        num_actors=1,
        max_pixels=200 * 200,
    )
    base.update(kw)
    return TokenizeConfig(**base)


def records_by_key(out: Path) -> dict:
    recs = {}
    for tar in sorted(out.glob("*.tar")):
        for r in read_shard(tar):
            assert r.key not in recs, f"duplicate key {r.key}"
            recs[r.key] = r
    return recs


def test_bad_data_is_counted_and_bits_are_exact(setup):
    root, expected, text = setup
    manifest = run_tokenize(config(root, text, "clean"))
    out = root / "clean"
    assert manifest == load_manifest(out)
    assert manifest["inputs"] == expected["inputs"] == 36 + 6 + 1
    assert not (root / "escape.png").exists() and not Path("/tmp/absolute.png").exists()  # nothing extracted
    assert manifest["skipped"] == expected["skipped"]
    assert manifest["samples"] + sum(manifest["skipped"].values()) == manifest["inputs"]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["reason"] for e in errors) == sorted(r for r, n in expected["skipped"].items() for _ in range(n))
    recs = records_by_key(out)
    assert len(recs) == manifest["samples"] == 36
    assert sorted(p.name for p in out.glob("*.tar")) == ["part-000.tar", "part-001.tar", "part-002.tar", "part-999.tar"]
    # bits equal a plain single-process encode of the same resized image with the same tokenizer
    from models.tokenizer.io import load_tokenizer

    ae = load_tokenizer(root / "ae")
    r = recs["part-001-000004"]
    color = COLORS[r.caption.split()[1]]
    img = np.broadcast_to(np.array(color, dtype=np.uint8), (*r.image_hw, 3))
    with torch.no_grad():
        want = ae.encode(images_to_tensor(torch.from_numpy(img.copy())[None])).bits[0]
    assert torch.equal(r.grid(), want)
    assert r.text_ids and manifest["text_tokens"]["parallel_num"] == 4
    assert set(manifest["size_histogram"]) <= {"32x32", "16x64", "64x16", "48x24"}


def test_rerun_skips_finished_shards_and_completes_missing_ones(setup, capsys):
    root, _, text = setup
    out = root / "clean"
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    run_tokenize(config(root, text, "clean"))
    assert "0 to tokenize" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    before = records_by_key(out)
    (out / "part-001.stats.json").unlink()  # as if the job died before finishing this shard
    (out / "part-001.tar").unlink()
    run_tokenize(config(root, text, "clean"))
    assert "1 to tokenize" in capsys.readouterr().out
    assert (out / "part-000.tar").stat().st_mtime_ns == mtimes["part-000.tar"]
    after = records_by_key(out)
    assert after.keys() == before.keys() and all(np.array_equal(after[k].bits, before[k].bits) for k in after)


def test_changed_config_is_refused(setup):
    root, _, text = setup
    with pytest.raises(SystemExit, match="differs in: sizes"):
        run_tokenize(config(root, text, "clean", sizes=[(32, 32)]))


def test_killed_actor_gives_identical_output(setup):
    root, _, text = setup
    run_tokenize(config(root, text, "faulty", fault_kill_after=2))
    assert (root / "faulty" / ".fault-injected").exists()
    clean, faulty = records_by_key(root / "clean"), records_by_key(root / "faulty")
    assert clean.keys() == faulty.keys()
    for k in clean:
        assert np.array_equal(clean[k].bits, faulty[k].bits) and clean[k].text_ids == faulty[k].text_ids, k
    assert load_manifest(root / "faulty")["samples"] == len(clean)


def test_imagenet_class_folders(setup, tmp_path):
    root, _, _ = setup
    for wnid, color in (("n0001", (200, 0, 0)), ("n0002", (0, 0, 200))):
        (tmp_path / "in" / wnid).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "in" / wnid / f"img{i}.JPEG").write_bytes(png(50 + 10 * i, 40, color))
    index = tmp_path / "classes.json"
    index.write_text(json.dumps({"0": ["n0001", "red"], "1": ["n0002", "blue"]}))
    cfg = TokenizeConfig(
        source="imagenet",
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        mode="imagenet",
        tokenizer=str(root / "ae"),
        image_size=32,
        class_index=str(index),
        samples_per_shard=4,
        num_actors=1,
    )
    manifest = run_tokenize(cfg)
    assert manifest["kind"] == "imagenet" and manifest["samples"] == 6 and len(manifest["shards"]) == 2
    recs = records_by_key(tmp_path / "out")
    assert sorted(r.label for r in recs.values()) == [0, 0, 0, 1, 1, 1]
    assert {(r.h, r.w) for r in recs.values()} == {(16, 16)}
