"""A checkpoint reads only its own files, proves each one, and bounds what its pickled metadata may cost; `export`
keeps out of a folder that holds the user's files (issue 29, finding 2).

Each case was accepted before: a manifest entry with `"sha256": null` (a flipped byte then loaded), a manifest
naming a file outside the checkpoint with its true sha256, symlinks out of `dist/` (or `dist/` itself a symlink),
`.metadata` whose `relative_path` points outside `dist/` (read from there on `export`), a 40-byte pickle that
allocates gigabytes, and `export --dst` into a non-empty folder (its files overwritten)."""

import json
import os
import pickle
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch

from training.checkpoint_integrity import (
    MANIFEST,
    CheckpointError,
    check_dcp_metadata,
    sha256_file,
    verify_checkpoint,
    write_manifest,
)


def one_line(err) -> str:
    text = str(err).strip()
    assert "\n" not in text, text
    return text


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A small checkpoint folder with a `dist/` and a manifest written the way saves write it."""
    path = tmp_path / "step_00000001"
    (path / "dist").mkdir(parents=True)
    (path / "model.bin").write_bytes(os.urandom(256))
    (path / "dist" / "__0_0.distcp").write_bytes(os.urandom(128))
    write_manifest(path)
    verify_checkpoint(path)  # as written: loads
    return path


def edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest["files"])
    (path / MANIFEST).write_text(json.dumps(manifest))


# ---- the manifest -------------------------------------------------------------------------------------------------


def test_an_entry_without_its_sha256_is_refused_and_a_flipped_byte_never_loads(checkpoint):
    edit_manifest(checkpoint, lambda files: files["model.bin"].update(sha256=None))
    data = bytearray((checkpoint / "model.bin").read_bytes())
    data[7] ^= 0xFF
    (checkpoint / "model.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(checkpoint)
    assert "lists 'model.bin' without a sha256" in one_line(err.value) and "checksums=false" in str(err.value)
    verify_checkpoint(checkpoint, checksums=False)  # sizes only, as asked: the size still matches


@pytest.mark.parametrize("entry", [{"sha256": "0" * 64}, {"bytes": "256", "sha256": "0" * 64}, "x"])
def test_an_entry_without_its_size_is_refused(checkpoint, entry):
    edit_manifest(checkpoint, lambda files: files.__setitem__("model.bin", entry))
    with pytest.raises(CheckpointError, match="lists 'model.bin' without its size in bytes") as err:
        verify_checkpoint(checkpoint, checksums=False)
    one_line(err.value)


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.bin", "dist/../../outside.bin"])
def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused(checkpoint, name):
    outside = checkpoint.parent / "outside.bin"
    outside.write_bytes(b"not part of the checkpoint")
    target = Path(name) if name.startswith("/") else checkpoint / name
    if not target.is_file():
        pytest.skip(f"{target} is not a file on this machine")
    entry = {"bytes": target.stat().st_size, "sha256": sha256_file(target)}  # its true size and sha256
    edit_manifest(checkpoint, lambda files: files.__setitem__(name, entry))
    with pytest.raises(CheckpointError, match="outside") as err:
        verify_checkpoint(checkpoint)
    assert name in one_line(err.value)


def test_symlinks_out_of_the_checkpoint_are_refused(checkpoint, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "__0_0.distcp").write_bytes((checkpoint / "dist" / "__0_0.distcp").read_bytes())
    shard = checkpoint / "dist" / "__0_0.distcp"
    shard.unlink()
    shard.symlink_to(elsewhere / "__0_0.distcp")  # same bytes, same sha256
    with pytest.raises(CheckpointError, match="outside") as err:
        verify_checkpoint(checkpoint)
    assert "dist/__0_0.distcp" in one_line(err.value)

    shard.unlink()
    shutil.move(checkpoint / "dist", elsewhere / "dist")
    (checkpoint / "dist").symlink_to(elsewhere / "dist")  # dist/ itself a symlink
    (elsewhere / "dist" / "__0_0.distcp").write_bytes((elsewhere / "__0_0.distcp").read_bytes())
    with pytest.raises(CheckpointError, match="'dist(/__0_0.distcp)?' resolves to .*outside") as err:
        verify_checkpoint(checkpoint)
    one_line(err.value)


def test_a_symlink_inside_the_checkpoint_is_fine(checkpoint):
    (checkpoint / "alias.bin").symlink_to(checkpoint / "model.bin")
    (checkpoint / MANIFEST).unlink()
    write_manifest(checkpoint)
    verify_checkpoint(checkpoint)


def test_a_manifest_that_is_not_one_is_refused(checkpoint):
    (checkpoint / MANIFEST).write_text('["model.bin"]')
    with pytest.raises(CheckpointError, match="is not a checkpoint manifest") as err:
        verify_checkpoint(checkpoint)
    one_line(err.value)


# ---- the pickled DCP metadata -------------------------------------------------------------------------------------


def bomb(n: int) -> bytes:
    """A pickle of a few dozen bytes that calls list(bytes(n)): ~9n bytes of memory once unpickled."""
    return (b"\x80\x04c builtins\nlist\nc builtins\nbytes\nJ" + n.to_bytes(4, "little") + b"\x85R\x85R.").replace(
        b"c builtins", b"cbuiltins"
    )


def test_a_pickle_that_allocates_without_bound_is_refused_with_little_memory(tmp_path):
    data = bomb(200_000_000)
    assert len(data) < 50
    assert len(pickle.loads(bomb(1000))) == 1000  # the payload is live: plain pickle builds it
    check_dcp_metadata(tmp_path)  # the imports it makes, before measuring
    (tmp_path / ".metadata").write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="holds a pickled builtins.bytes") as err:
            check_dcp_metadata(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_line(err.value)
    assert peak < 10 << 20, f"the check took {peak} bytes for a {len(data)}-byte file"


def test_metadata_larger_than_the_bound_is_refused_unread(tmp_path, monkeypatch):
    import training.checkpoint_integrity as integrity

    (tmp_path / ".metadata").write_bytes(pickle.dumps(list(range(1000))))
    monkeypatch.setattr(integrity, "MAX_METADATA_BYTES", 1000)
    monkeypatch.setattr(integrity.RestrictedUnpickler, "load", lambda self: pytest.fail("read past the bound"))
    with pytest.raises(CheckpointError, match="more than checkpoint metadata ever needs") as err:
        check_dcp_metadata(tmp_path)
    one_line(err.value)


def _metadata_with(tmp_path: Path, relative_path: str) -> Path:
    """A DCP folder written by torch itself, then its `.metadata` edited to name `relative_path` for every chunk."""
    from torch.distributed.checkpoint import save as dcp_save

    folder = tmp_path / "dist"
    dcp_save({"w": torch.arange(6.0)}, checkpoint_id=str(folder), no_dist=True)
    meta = pickle.loads((folder / ".metadata").read_bytes())
    for info in meta.storage_data.values():
        info.relative_path = relative_path
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    return folder


def test_metadata_naming_data_outside_dist_is_refused(tmp_path):
    check_dcp_metadata(_metadata_with(tmp_path / "ok", "__0_0.distcp"))  # as torch writes it: passes
    for i, name in enumerate(["../outside.distcp", "/etc/hostname"]):
        folder = _metadata_with(tmp_path / f"case{i}", name)
        with pytest.raises(CheckpointError, match="outside") as err:
            check_dcp_metadata(folder)
        assert name in one_line(err.value)


# ---- the tools on a real megatron checkpoint ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained tiny megatron checkpoint and the tokenizers an export needs."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")
    from helpers.megatron_case import case_file, load_case, new_engine, step
    from helpers.megatron_cpu import megatron_in_process

    from models.t2i.text_tokenizer import build_chat_tokenizer
    from models.tokenizer.io import save_tokenizer
    from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config
    from training.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("saved")
    case_file(root / "case.pt", vocab_size=544)
    case = load_case(root / "case.pt")
    with megatron_in_process(init_model_parallel=False):
        engine = new_engine(case)
        assert step(engine, case["batch"]).result.applied
        path = save_checkpoint(root / "run", 1, engine, engine.new_ema(0.5), {}, {"step": 1}, keep_last=1)
    cfg = get_tokenizer_config("tiny")
    save_tokenizer(BinaryAutoencoder(cfg), cfg, root / "ae", name="tiny")
    text = build_chat_tokenizer(["a red circle", "two blue squares"], root / "text")
    return {"path": path, "export": ["--text-tokenizer", str(text), "--image-tokenizer", str(root / "ae")]}


def run_tool(argv, capsys) -> str:
    from training.checkpoint import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return one_line(capsys.readouterr().err)


def test_export_refuses_metadata_that_reads_outside_the_checkpoint(saved, tmp_path, capsys):
    copy = tmp_path / "step_00000001"
    shutil.copytree(saved["path"], copy)
    outside = tmp_path / "stolen.distcp"
    shutil.copy2(copy / "dist" / "__0_0.distcp", outside)
    meta = pickle.loads((copy / "dist" / ".metadata").read_bytes())
    for info in meta.storage_data.values():
        info.relative_path = "../../stolen.distcp"  # the same bytes, read from outside the checkpoint
    (copy / "dist" / ".metadata").write_bytes(pickle.dumps(meta))
    (copy / MANIFEST).unlink()
    write_manifest(copy)  # whoever edits the metadata can rewrite the checksums too
    err = run_tool(["export", "--src", str(copy), "--dst", str(tmp_path / "out"), *saved["export"]], capsys)
    assert "'../../stolen.distcp' resolves to" in err and "outside" in err, err


def test_reshard_refuses_a_symlinked_dist(saved, tmp_path, capsys):
    copy = tmp_path / "step_00000001"
    shutil.copytree(saved["path"], copy)
    shutil.move(copy / "dist", tmp_path / "elsewhere")
    (copy / "dist").symlink_to(tmp_path / "elsewhere")
    err = run_tool(["reshard", "--src", str(copy), "--dst", str(tmp_path / "out"), "--tp", "1", "--pp", "1"], capsys)
    assert "resolves to" in err and "outside" in err and "'dist" in err, err


def test_export_keeps_out_of_a_folder_holding_other_files(saved, tmp_path, capsys):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "config.json").write_text("the user's own file")
    err = run_tool(["export", "--src", str(saved["path"]), "--dst", str(dst), *saved["export"]], capsys)
    assert f"--dst {dst} is not empty" in err and "--overwrite" in err, err
    assert (dst / "config.json").read_text() == "the user's own file"
    from training.checkpoint import main

    main(["export", "--src", str(saved["path"]), "--dst", str(dst), "--overwrite", *saved["export"]])
    assert json.loads((dst / "config.json").read_text())["model_type"] == "qwen3"
