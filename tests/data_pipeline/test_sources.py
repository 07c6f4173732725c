"""Input sources and image decoding, without Ray: every kind of input, every skip reason."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.image_ops import SkipSample, adm_center_crop, decode_image, nearest_bucket, resize_cover_crop
from data_pipeline.sources import SourceConfig, iter_samples, list_shards


def png(w, h, mode="RGB", color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).convert(mode).save(buf, format="PNG" if mode != "CMYK" else "JPEG")
    return buf.getvalue()


def test_parquet_source_with_bytes_and_hf_image_structs(tmp_path):
    images = [png(8, 8), {"bytes": png(9, 9), "path": None}, None, png(4, 4)]
    table = pa.table({"img": [png(8, 8), png(9, 9), None, png(4, 4)], "text": ["a", "b", "c", None]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    struct = pa.table({"img": [images[1]], "text": ["struct image"]})
    pq.write_table(struct, tmp_path / "part-1.parquet")
    cfg = SourceConfig("parquet", str(tmp_path), image_column="img", caption_column="text")
    shards = list_shards(cfg)
    assert [s.name for s in shards] == ["part-0", "part-1"]
    rows = list(iter_samples(shards[0], cfg))
    assert [r.error for r in rows] == [None, None, "missing_image", "missing_caption"]
    assert rows[1].caption == "b" and Image.open(io.BytesIO(rows[1].image)).size == (9, 9)
    (row,) = iter_samples(shards[1], cfg)
    assert row.error is None and row.caption == "struct image"
    bad = SourceConfig("parquet", str(tmp_path), image_column="image", caption_column="text")
    (err,) = iter_samples(list_shards(bad)[0], bad)
    assert err.error == "unreadable_shard" and "--image-column" in err.detail


def test_folder_source_with_sidecar_captions(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(png(8, 8))
    (tmp_path / "a.txt").write_text("caption from txt\n")
    (tmp_path / "sub" / "b.webp").write_bytes(png(8, 8))
    (tmp_path / "sub" / "b.json").write_text(json.dumps({"caption": "caption from json"}))
    (tmp_path / "c.jpg").write_bytes(png(8, 8))
    cfg = SourceConfig("folder", str(tmp_path), samples_per_shard=2)
    shards = list_shards(cfg)
    assert [s.name for s in shards] == ["folder-000000", "folder-000001"]
    rows = [r for s in shards for r in iter_samples(s, cfg)]
    assert [(r.key, r.caption, r.error) for r in rows] == [
        ("a.png", "caption from txt", None),
        ("c.jpg", "", "missing_caption"),
        ("sub/b.webp", "caption from json", None),
    ]


def test_unknown_source_and_empty_input(tmp_path):
    with pytest.raises(ValueError, match="unknown --source 'csv'"):
        SourceConfig("csv", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SourceConfig("wds", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no input found"):
        list_shards(SourceConfig("wds", str(tmp_path)))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA"])
def test_decode_converts_common_modes_to_rgb(mode):
    assert decode_image(png(6, 5, mode)).mode == "RGB"


def test_decode_skip_reasons():
    data = png(40, 40)
    with pytest.raises(SkipSample) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.reason == "truncated"
    with pytest.raises(SkipSample) as e:
        decode_image(b"not an image")
    assert e.value.reason == "decode_error"
    with pytest.raises(SkipSample) as e:
        decode_image(png(100, 100), max_pixels=50 * 50)
    assert e.value.reason == "too_large"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), dtype=np.float32), mode="F").save(buf, format="TIFF")
    with pytest.raises(SkipSample) as e:
        decode_image(buf.getvalue())
    assert e.value.reason == "unsupported_mode"


def test_buckets_and_crops():
    sizes = [(1024, 1024), (512, 512), (1280, 768), (768, 1280), (2048, 512)]
    assert nearest_bucket(1000, 1000, sizes) == (1024, 1024)
    assert nearest_bucket(500, 520, sizes) == (512, 512)
    assert nearest_bucket(600, 1000, sizes) == (768, 1280)
    assert nearest_bucket(4000, 900, sizes) == (2048, 512)
    img = Image.new("RGB", (300, 200), (1, 2, 3))
    assert resize_cover_crop(img, 64, 128).shape == (64, 128, 3)
    assert adm_center_crop(Image.new("RGB", (1000, 600)), 256).shape == (256, 256, 3)


def test_score_columns_are_carried_from_parquet_and_json(tmp_path):
    """The numbers a curated subset selects on (data.subset.score): parquet --score-columns, every top-level number of
    a json sidecar or webdataset json member (not the class label, not booleans or strings)."""
    table = pa.table({"image": [png(8, 8), png(8, 8)], "caption": ["a", "b"], "aesthetic": [6.5, None]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    cfg = SourceConfig("parquet", str(tmp_path), score_columns=("aesthetic",))
    rows = list(iter_samples(list_shards(cfg)[0], cfg))
    assert [r.scores for r in rows] == [{"aesthetic": 6.5}, {}]
    missing = SourceConfig("parquet", str(tmp_path), score_columns=("clip",))
    (err,) = iter_samples(list_shards(missing)[0], missing)
    assert err.error == "unreadable_shard" and "--score-columns" in err.detail

    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(8, 8))
    meta = {"caption": "x", "clip": 0.31, "label": 3, "nsfw": False, "source": "web", "width": 1024}
    (folder / "a.json").write_text(json.dumps(meta))
    cfg = SourceConfig("folder", str(folder))
    (row,) = iter_samples(list_shards(cfg)[0], cfg)
    assert row.caption == "x" and row.scores == {"clip": 0.31, "width": 1024.0}
