"""`python -m models.sample` end to end on a tiny checkpoint: PNGs, the ADM .npz, and clear argument errors."""

import subprocess
import sys

import numpy as np
import pytest

from models.c2i.io import save_c2i_checkpoint
from models.c2i.model import ClassConditionalBitDance, get_c2i_config
from models.sample import main
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config


@pytest.fixture
def tiny_ckpt(tmp_path):
    cfg = get_c2i_config("tiny-16x")
    path = tmp_path / "tiny.pt"
    save_c2i_checkpoint(path, ClassConditionalBitDance(cfg), BinaryAutoencoder(get_tokenizer_config("tiny")))
    return path


def test_cli_writes_pngs_and_npz(tiny_ckpt, tmp_path):
    out = tmp_path / "samples"
    main(
        [
            "--ckpt",
            str(tiny_ckpt),
            "--model",
            "tiny-16x",
            "--classes",
            "1,2,3",
            "--steps",
            "2",
            "--cfg-scale",
            "2.0",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--to-npz",
        ]
    )
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    arr = np.load(tmp_path / "samples.npz")["arr_0"]
    assert arr.shape == (3, 32, 32, 3) and arr.dtype == np.uint8


def test_cli_is_reproducible(tiny_ckpt, tmp_path):
    args = ["--ckpt", str(tiny_ckpt), "--model", "tiny-16x", "--per-class", "1", "--steps", "2", "--to-npz"]
    main([*args, "--out", str(tmp_path / "a")])
    main([*args, "--out", str(tmp_path / "b")])
    a, b = np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "b.npz")["arr_0"]
    assert a.shape[0] == 10 and np.array_equal(a, b)


def test_cli_rejects_bad_classes(tiny_ckpt, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "models.sample",
            "--ckpt",
            str(tiny_ckpt),
            "--model",
            "tiny-16x",
            "--classes",
            "3,99",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "bad: [99]" in r.stderr
