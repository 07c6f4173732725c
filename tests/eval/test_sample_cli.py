"""`eval.generate --task imagenet` end to end on a tiny checkpoint: chosen classes, the ADM .npz, per-image seeds
(the same image whatever the batch size or the other classes), EMA vs model weights, and one-line argument errors."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from eval.generate import main
from models.c2i.io import save_c2i_checkpoint
from models.c2i.model import ClassConditionalBitDance, get_c2i_config
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    cfg = get_c2i_config("tiny-16x")
    path = tmp_path_factory.mktemp("c2i") / "tiny.pt"
    torch.manual_seed(0)
    model, ema = ClassConditionalBitDance(cfg), ClassConditionalBitDance(cfg)
    with torch.no_grad():  # the head is zero-initialised; give both weight sets a head so images differ
        for m in (model, ema):
            for p in m.head.parameters():
                p.normal_(0, 0.1)
    save_c2i_checkpoint(path, model, BinaryAutoencoder(get_tokenizer_config("tiny")), ema=ema)
    return path


def generate(ckpt, out, *extra):
    base = ["--task", "imagenet", "--model", str(ckpt), "--model-config", "tiny-16x", "--steps", "2"]
    main([*base, "--cfg-scale", "2.0", "--out", str(out), *extra])
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def test_chosen_classes_write_pngs_and_npz(tiny_ckpt, tmp_path):
    out = tmp_path / "samples"
    pngs = generate(tiny_ckpt, out, "--classes", "1,2,3", "--per-class", "1", "--batch-size", "2")
    assert sorted(pngs) == ["000001.png", "000002.png", "000003.png"]  # index = class * per_class + j
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (3, 32, 32, 3) and arr.dtype == np.uint8


def test_is_reproducible(tiny_ckpt, tmp_path):
    a = generate(tiny_ckpt, tmp_path / "a", "--per-class", "1")
    b = generate(tiny_ckpt, tmp_path / "b", "--per-class", "1")
    npz = [np.load(tmp_path / d / "samples.npz")["arr_0"] for d in "ab"]
    assert len(a) == 10 and a == b and npz[0].shape[0] == 10 and np.array_equal(*npz)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).astype(np.int16)


def same_image(a: bytes, b: bytes) -> bool:
    """Equal up to the decoder's float rounding across batch sizes (at most 1 of 255 on a pixel); the bits are
    the same, while an image with other noise differs everywhere."""
    return int(np.abs(pixels(a) - pixels(b)).max()) <= 1


def test_per_image_seeds_make_images_independent_of_batching(tiny_ckpt, tmp_path):
    one = generate(tiny_ckpt, tmp_path / "bs1", "--classes", "2,5", "--per-class", "2", "--batch-size", "1")
    four = generate(tiny_ckpt, tmp_path / "bs4", "--classes", "2,5", "--per-class", "2", "--batch-size", "4")
    alone = generate(tiny_ckpt, tmp_path / "alone", "--classes", "5", "--per-class", "2", "--batch-size", "3")
    assert sorted(one) == sorted(four) == ["000004.png", "000005.png", "000010.png", "000011.png"]
    assert sorted(alone) == ["000010.png", "000011.png"]
    assert all(same_image(one[k], four[k]) for k in one) and all(same_image(one[k], alone[k]) for k in alone)
    assert np.abs(pixels(one["000010.png"]) - pixels(one["000011.png"])).mean() > 5  # each image its own noise


def test_no_ema_uses_the_model_weights(tiny_ckpt, tmp_path):
    ema = generate(tiny_ckpt, tmp_path / "ema", "--classes", "1", "--per-class", "1")
    raw = generate(tiny_ckpt, tmp_path / "raw", "--classes", "1", "--per-class", "1", "--no-ema")
    assert ema.keys() == raw.keys() and ema != raw


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classes", "3,99"], "bad: [99]"),
        (["--classes", "3,x"], "comma-separated class ids"),
        (["--classes", "3,3"], "use --per-class"),
        (["--classes", "3", "--num-classes", "2"], "bad: [3]"),
        (["--steps", "0"], "sampling steps must be >= 1"),
    ],
)
def test_rejects_bad_arguments_in_one_line(tiny_ckpt, tmp_path, extra, message):
    with pytest.raises(SystemExit):
        main(["--task", "imagenet", "--model", str(tiny_ckpt), "--model-config", "tiny-16x", "--out", "x", *extra])
    cmd = [sys.executable, "-m", "eval.generate", "--task", "imagenet", "--model", str(tiny_ckpt)]
    r = subprocess.run(
        [*cmd, "--model-config", "tiny-16x", "--out", str(tmp_path / "x"), *extra], capture_output=True, text=True
    )
    assert r.returncode == 2 and message in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr
