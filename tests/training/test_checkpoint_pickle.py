"""A pickle payload planted in a megatron checkpoint's `dist/.metadata` (which torch DCP reads with `pickle.load`) is
refused in one line by every path that reads checkpoints (export, reshard, resume, `model.init_from`, the metadata
helpers) before it can run, even when the attacker rewrote the checksum manifest to match."""

import pickle
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from helpers.megatron_case import case_file, load_case, new_engine, step  # noqa: E402
from helpers.megatron_cpu import megatron_in_process  # noqa: E402

from models.t2i.text_tokenizer import build_chat_tokenizer  # noqa: E402
from models.tokenizer.io import save_tokenizer  # noqa: E402
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config  # noqa: E402
from training.checkpoint import load_checkpoint, main, save_checkpoint  # noqa: E402
from training.checkpoint_integrity import CheckpointError, write_manifest  # noqa: E402
from training.engines.megatron_checkpoint import DIST, load_full, single_process, tensor_meta  # noqa: E402


class Payload:
    """Unpickling this opens (creates) `marker`: what a planted payload could do with any callable."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A trained megatron checkpoint whose `.metadata` is a payload, its manifest rewritten to match; tokenizers."""
    root = tmp_path_factory.mktemp("pickle")
    case_file(root / "case.pt", vocab_size=544)
    case = load_case(root / "case.pt")
    with megatron_in_process(init_model_parallel=False):
        engine = new_engine(case)
        ema = engine.new_ema(0.5)
        assert step(engine, case["batch"]).result.applied
        path = save_checkpoint(root / "run", 1, engine, ema, {}, {"step": 1}, keep_last=1)
    probe = root / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))  # the payload is live: plain pickle runs it
    assert probe.exists()
    marker = root / "marker"
    (path / DIST / ".metadata").write_bytes(pickle.dumps({"metadata": Payload(marker)}))
    (path / "manifest.json").unlink()
    write_manifest(path)  # whoever planted it can rewrite the checksums too
    text = build_chat_tokenizer(["a red circle", "two blue squares"], root / "text")
    cfg = get_tokenizer_config("tiny")
    torch.manual_seed(0)
    save_tokenizer(BinaryAutoencoder(cfg), cfg, root / "ae", name="tiny")
    return {"root": root, "path": path, "marker": marker, "case": case, "text": text, "ae": root / "ae"}


def refused(err: str, planted: dict) -> None:
    assert "holds a pickled io.open" in err and "refusing to load it" in err, err
    assert "\n" not in err.strip(), err
    assert not planted["marker"].exists(), "the planted payload ran"


@pytest.mark.parametrize("command", ["export", "reshard"])
def test_the_checkpoint_tools_refuse_a_planted_payload(planted, command, capsys, tmp_path):
    src = str(planted["path"])
    args = {
        "export": ["--text-tokenizer", str(planted["text"]), "--image-tokenizer", str(planted["ae"])],
        "reshard": ["--tp", "1", "--pp", "1"],
    }[command]
    for source in (src, str(planted["root"] / "run")):  # the checkpoint, or its run folder
        with pytest.raises(SystemExit) as info:
            main([command, "--src", source, "--dst", str(tmp_path / f"out_{len(source)}"), *args])
        assert info.value.code == 2
        refused(capsys.readouterr().err, planted)


def test_resume_and_init_from_refuse_a_planted_payload(planted):
    from training.engines.megatron import MegatronEngine
    from training.engines.megatron_checkpoint import model_config_of

    case, path = planted["case"], planted["path"]
    with megatron_in_process(init_model_parallel=False):
        engine = new_engine(case, reference=False)
        for verify in (True, False):  # the manifest matches: the gate itself refuses, not the checksums
            with pytest.raises(CheckpointError) as err:
                load_checkpoint(path, engine, engine.new_ema(0.5), verify=verify)
            refused(str(err.value), planted)
        from helpers.megatron_case import train_config

        with pytest.raises(CheckpointError) as err:
            MegatronEngine(train_config(), model_config_of(path), None, path)
        refused(str(err.value), planted)


def test_the_metadata_helpers_refuse_a_planted_payload(planted):
    for fn, args in ((tensor_meta, ()), (load_full, ("model.",))):
        with pytest.raises(CheckpointError) as err:
            single_process(fn, planted["path"] / DIST, *args)
        refused(str(err.value), planted)


def test_a_planted_common_pt_is_refused(planted, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(planted["path"], copy)
    shutil.copy2(planted["root"] / "run" / "checkpoints" / "step_00000001" / DIST / "common.pt", copy / DIST)
    marker = tmp_path / "common_marker"
    torch.save({"x": Payload(marker)}, copy / DIST / "common.pt")
    from training.checkpoint_integrity import check_dcp_metadata

    with pytest.raises(CheckpointError, match="common.pt holds pickled objects that are not tensors"):
        check_dcp_metadata(copy / DIST)
    assert not marker.exists()
