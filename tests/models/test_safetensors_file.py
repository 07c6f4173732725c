"""The checked safetensors reader (models/core/safetensors_file.py) and the readers built on it: every defect a
hostile file can carry (header length, offsets, dtype, shape, overlaps, NaN weights, index entries leading out of
the folder) is refused in one line naming the file and the tensor; a seeded fuzz of 200 mutations of a valid file
either loads exactly what the header describes or is refused in one line, within 2x the file size of memory; a
DeepSpeed resume from a checkpoint with a crafted header and an import of a NaN folder end in one line."""

import json
import math
import os
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as reference_load
from safetensors.torch import save_file

from models.core.safetensors_file import SafetensorsError, check_finite, load_file, read_header
from models.t2i.io import INDEX_NAME, llm_weight_files, read_llm_state_dict, read_safetensors

REPO = Path(__file__).resolve().parents[2]

TENSORS = {
    "w": torch.arange(6, dtype=torch.float32).view(2, 3) / 7,
    "b": torch.tensor([1.5, -2.0, 0.25, 3.0], dtype=torch.bfloat16),
    "ids": torch.tensor([7, -1, 2**40], dtype=torch.int64),
    "mask": torch.tensor([True, False, True, True, False]),
    "h": torch.tensor([[[0.5, 1.0], [2.0, -4.0]]], dtype=torch.float16),
    "px": torch.tensor([0, 128, 255], dtype=torch.uint8),
}
DTYPE_NAMES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.bool: "BOOL",
    torch.float16: "F16",
    torch.uint8: "U8",
    torch.float64: "F64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
}
BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def valid_bytes(tmp_path: Path) -> bytes:
    save_file(TENSORS, str(tmp_path / "valid.safetensors"), metadata={"format": "pt"})
    return (tmp_path / "valid.safetensors").read_bytes()


def split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict | str, data: bytes, length: int | None = None) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


def write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


def one_line_refusal(read, *words: str) -> str:
    with pytest.raises(SafetensorsError) as info:
        read()
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def refused(path: Path, *words: str, names=("w",)) -> None:
    """Refused in one line naming the file and `words`, by the reader and by the folder readers' `read_safetensors`."""
    one_line_refusal(lambda: load_file(path, check_finite=True), str(path), *words)
    one_line_refusal(lambda: read_safetensors(path, list(names)), str(path), *words)


# ---- one test per defect --------------------------------------------------------------------------------------------


def test_a_huge_header_length_is_refused_before_anything_is_read(tmp_path):
    header, data = split(valid_bytes(tmp_path))
    refused(write(tmp_path / "x.safetensors", join(header, data, length=2**62)), "header", str(2**62))


def test_a_header_length_past_the_end_of_the_file_is_refused(tmp_path):
    header, data = split(valid_bytes(tmp_path))
    refused(write(tmp_path / "x.safetensors", join(header, data, length=10**6)), "1000000-byte header", "after it")


def test_offsets_past_the_end_of_the_file_are_refused(tmp_path):
    header, data = split(valid_bytes(tmp_path))
    begin = header["w"]["data_offsets"][0]
    header["w"]["data_offsets"] = [begin + 10**9, begin + 10**9 + 24]
    refused(write(tmp_path / "x.safetensors", join(header, data)), "'w'", "data area")


def test_a_relabelled_dtype_is_refused_by_its_size(tmp_path):
    header, data = split(valid_bytes(tmp_path))
    header["w"]["dtype"] = "F64"  # 6 x 8 bytes, but the file holds 6 x 4
    refused(write(tmp_path / "x.safetensors", join(header, data)), "'w'", "24 bytes", "F64", "48")


def test_a_wrong_shape_is_refused(tmp_path):
    header, data = split(valid_bytes(tmp_path))
    header["w"]["shape"] = [3, 3]
    refused(write(tmp_path / "x.safetensors", join(header, data)), "'w'", "[3, 3]")
    header["w"]["shape"] = [2, -3]
    refused(write(tmp_path / "y.safetensors", join(header, data)), "'w'", "ints >= 0")


def test_an_unknown_dtype_is_refused(tmp_path):
    header, data = split(valid_bytes(tmp_path))
    header["w"]["dtype"] = "F128"
    refused(write(tmp_path / "x.safetensors", join(header, data)), "'w'", "unknown dtype 'F128'")


def test_overlapping_tensors_are_refused(tmp_path):
    header, data = split(valid_bytes(tmp_path))
    begin = header["w"]["data_offsets"][0]
    header["px"] = {"dtype": "U8", "shape": [3], "data_offsets": [begin + 4, begin + 7]}  # inside w's bytes
    refused(write(tmp_path / "x.safetensors", join(header, data)), "overlap", "'w'", "'px'")


def test_nan_weights_are_refused_with_check_finite(tmp_path):
    nan = {**TENSORS, "w": torch.tensor([[0.0, float("nan"), 1.0]])}
    save_file(nan, str(tmp_path / "x.safetensors"))
    refused(tmp_path / "x.safetensors", "'w'", "NaN or Inf")
    assert torch.isnan(load_file(tmp_path / "x.safetensors")["w"]).any()  # off by default in the plain reader
    one_line_refusal(lambda: check_finite({"a": torch.ones(2), "b": torch.tensor([math.inf])}, "here"), "here", "'b'")


def official_llm(folder: Path, weight_map: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_index_entries_leading_out_of_the_folder_are_refused(tmp_path, entry):
    outside = tmp_path / "outside.safetensors"
    save_file({"model.norm.weight": torch.ones(4)}, str(outside))
    entry = str(outside) if entry == "ABSOLUTE" else entry
    folder = official_llm(tmp_path / "official", {"model.norm.weight": entry})
    for read in (llm_weight_files, read_llm_state_dict):
        with pytest.raises(ValueError) as info:
            read(folder)
        message = str(info.value)
        assert "\n" not in message and repr(entry) in message and "plain file name" in message, message


def test_an_index_shard_linked_from_a_cache_still_loads(tmp_path):
    """A Hugging Face cache snapshot links its files into ../../blobs: the index's plain names are followed."""
    (tmp_path / "blobs").mkdir()
    save_file({"model.norm.weight": torch.ones(4)}, str(tmp_path / "blobs" / "abc"))
    folder = official_llm(tmp_path / "snap", {"model.norm.weight": "model-00001-of-00001.safetensors"})
    os.symlink("../blobs/abc", folder / "model-00001-of-00001.safetensors")
    assert torch.equal(read_llm_state_dict(folder)["model.norm.weight"], torch.ones(4))


def test_a_folder_with_nan_weights_is_refused_by_the_folder_loader(tmp_path):
    folder = official_llm(tmp_path / "official", {"model.norm.weight": "model-00001-of-00001.safetensors"})
    save_file({"model.norm.weight": torch.tensor([1.0, math.inf])}, str(folder / "model-00001-of-00001.safetensors"))
    one_line_refusal(lambda: read_llm_state_dict(folder), "model.norm.weight", "NaN or Inf")


# ---- fuzz ------------------------------------------------------------------------------------------------------------


def _entry(header: dict, rng: random.Random) -> dict:
    return header[rng.choice([k for k in header if k != "__metadata__"])]


def mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """(what was done, the mutated file) of a valid file."""
    header, data = split(raw)
    kind = rng.choice(
        ["truncate", "length", "offsets", "swap", "overlap", "dtype", "shape", "flip", "keys", "data", "dup", "meta"]
    )
    e = _entry(header, rng)
    if kind == "truncate":
        return kind, raw[: rng.randrange(len(raw))]
    if kind == "length":
        n = rng.choice([0, 1, 7, rng.randrange(len(raw)), len(raw) - 8, 2**62, 2**64 - 1, rng.getrandbits(64)])
        return kind, n.to_bytes(8, "little") + raw[8:]
    if kind == "offsets":
        pick = lambda: rng.choice([-1, 0, 3, len(data), len(data) + 1, 2**63, rng.randrange(len(data) + 9)])  # noqa: E731
        e["data_offsets"] = rng.choice([[pick(), pick()], [pick()], [pick(), pick(), pick()], "0-4", [1.5, 4]])
    elif kind == "swap":
        other = _entry(header, rng)
        e["data_offsets"], other["data_offsets"] = other["data_offsets"], e["data_offsets"]
    elif kind == "overlap":
        other = _entry(header, rng)
        size = e["data_offsets"][1] - e["data_offsets"][0]
        start = rng.randrange(other["data_offsets"][0], other["data_offsets"][1] + 1)
        e["data_offsets"] = [start, start + size]
    elif kind == "dtype":
        e["dtype"] = rng.choice([*BY_NAME, "F128", "", "f32", 5, None, ["F32"]])
    elif kind == "shape":
        dim = lambda: rng.choice([0, 1, 2, 3, 6, -1, 2**62, 2**64, 1.0, True, "2", None])  # noqa: E731
        e["shape"] = rng.choice([[dim() for _ in range(rng.randrange(4))], 6, "6", [[2, 3]], [1] * 70])
    elif kind == "keys":
        target = rng.choice(["entry", "top", "top_dict"])
        if target == "entry":
            e[rng.choice(["extra", "dtype2", ""])] = rng.choice([1, "x", None])
        else:
            header[rng.choice(["zz", "__meta__", "w2"])] = {"x": 1} if target == "top_dict" else rng.choice([1, "x"])
    elif kind == "data":
        data = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return kind, join(header, bytes(data))
    elif kind == "dup":  # the same name twice, the second with other offsets
        text = json.dumps(header)
        return kind, join(text[:-1] + ', "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', data)
    elif kind == "meta":
        header["__metadata__"] = rng.choice([{"a": "b"}, {"a": 1}, "x", [], {}])
    if kind != "flip":
        return kind, join(header, data)
    text = bytearray(json.dumps(header).encode())
    for _ in range(rng.randrange(1, 4)):
        text[rng.randrange(len(text))] = rng.choice([rng.randrange(256), rng.randrange(32, 127)])  # ASCII: still JSON
    return kind, len(text).to_bytes(8, "little") + bytes(text) + data


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    )


def test_fuzzed_files_load_exactly_or_are_refused_in_one_line_within_twice_their_size(tmp_path):
    raw, rng = valid_bytes(tmp_path), random.Random(1234)
    loaded, kinds = 0, set()
    for case in range(200):
        kind, mutated = mutate(raw, rng)
        path = write(tmp_path / f"case{case}.safetensors", mutated)
        tracemalloc.start()
        try:
            got = load_file(path)
        except SafetensorsError as err:
            got = None
            assert "\n" not in str(err) and str(path) in str(err), (case, kind, str(err))
        except Exception as err:  # noqa: BLE001 - the point: nothing but SafetensorsError may escape
            pytest.fail(f"case {case} ({kind}): {type(err).__name__}: {err}")
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak <= 2 * len(mutated) + 64 * 1024, (case, kind, peak, len(mutated))
        if got is None:
            continue
        loaded += 1
        kinds.add(kind)
        want = reference_load(str(path))  # the safetensors package, an independent reader
        assert got.keys() == want.keys() and all(same(got[k], want[k]) for k in want), (case, kind)
    assert 10 < loaded < 190 and {"data", "meta"} <= kinds, (loaded, kinds)  # both outcomes are exercised


def test_read_header_lists_every_tensor_with_its_place(tmp_path):
    path = write(tmp_path / "x.safetensors", valid_bytes(tmp_path))
    header = read_header(path)
    assert set(header) == set(TENSORS) and header["w"].shape == (2, 3) and header["w"].dtype == torch.float32
    got = load_file(path, names=["h", "w"])
    assert list(got) == ["h", "w"] and all(same(got[k], TENSORS[k]) for k in got)
    one_line_refusal(lambda: load_file(path, names=["nope"]), "'nope'")


def test_reading_a_file_holds_about_its_size_in_memory(tmp_path):
    """Each tensor is read once into its own buffer: no second copy, no whole-file read next to the tensors."""
    save_file({f"t{i}": torch.randn(64, 1024) for i in range(4)}, str(tmp_path / "big.safetensors"))
    size = (tmp_path / "big.safetensors").stat().st_size
    tracemalloc.start()
    try:
        got = load_file(tmp_path / "big.safetensors", check_finite=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(got) == 4 and 0.9 * size < peak < 1.1 * size + 64 * 1024, (peak, size)


# ---- the command-line tools -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_cli_refuses_a_crafted_header_in_a_deepspeed_checkpoint_in_one_line(tmp_path):
    from helpers.data import make_t2i_data

    from training.checkpoint_integrity import write_manifest

    data = make_t2i_data(tmp_path / "data", samples=24)
    cmd = [sys.executable, "-m", "training.train", "--config", str(REPO / "training" / "configs" / "tiny_t2i.yaml")]
    cmd += [f"run_dir={tmp_path / 'run'}", f"data.data_dir={data['tokens']}", "schedule.warmup_steps=1"]
    cmd += ["checkpoint.every=1", "logging.wandb=disabled", "checkpoint.export_official=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.run([*cmd, "schedule.total_steps=1"], cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000001"
    header, weights = split((checkpoint / "model.safetensors").read_bytes())
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 2**40]  # past the end: the whole rewrite passes the (rewritten) manifest
    write(checkpoint / "model.safetensors", join(header, weights))
    write_manifest(checkpoint)
    second = subprocess.run([*cmd, "schedule.total_steps=2"], cwd=REPO, env=env, capture_output=True, text=True)
    err = second.stderr.strip()
    assert second.returncode == 2 and "\n" not in err, err[-3000:]
    assert "error: " in err and str(checkpoint / "model.safetensors") in err and repr(name) in err, err


def test_import_of_an_official_folder_with_a_nan_weight_is_refused_unless_told(tmp_path, capsys):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")
    from dataclasses import replace

    from helpers.data import make_tokenizers

    from models.t2i.io import export_t2i_folder
    from models.t2i.model import TextToImageBitDance, get_t2i_config
    from models.t2i.text_tokenizer import T2ITextTokenizer
    from models.tokenizer.io import load_tokenizer
    from training.checkpoint import main

    text_dir, ae_dir = make_tokenizers(tmp_path / "tokenizers")
    tok = T2ITextTokenizer.from_folder(text_dir, 4)
    cfg = get_t2i_config("tiny-4x")
    cfg = replace(cfg, llm=replace(cfg.llm, vocab_size=len(tok) + (-len(tok)) % 4))
    torch.manual_seed(1)
    folder = export_t2i_folder(TextToImageBitDance(cfg), tok, load_tokenizer(ae_dir), tmp_path / "official")
    state = reference_load(str(folder / "model.safetensors"))
    bad = "model.layers.1.mlp.up_proj.weight"  # not in the first group read: refused while the writer runs
    state[bad][0, 0] = float("nan")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    args = ["import", "--src", str(folder), "--tp", "1", "--pp", "1"]
    with pytest.raises(SystemExit) as info:
        main([*args, "--dst", str(tmp_path / "refused")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and bad in err and "NaN or Inf" in err, err
    main([*args, "--dst", str(tmp_path / "ckpt"), "--no-check-finite"])
    assert "import: wrote" in capsys.readouterr().out
