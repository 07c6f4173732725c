"""Bad settings are one-line errors before any work starts: the training config (YAML that does not parse,
out-of-range or non-finite fields, settings that do not fit together or with the model, the machine or the data
folder) and the tokenize CLI (missing or unusable paths, a non-square P, a zero-sized bucket), which
validates before it creates its output folder and lets a corrected rerun claim a folder that holds no shard yet."""

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import training.config as training_config
from data_pipeline.tokenize import TokenizeConfig, main, run_tokenize
from models.t2i.text_tokenizer import build_chat_tokenizer
from models.tokenizer.io import save_tokenizer
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config
from training.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "training" / "configs"
TRAIN = "python -m training.train: error: "


# ---- training config --------------------------------------------------------------------------------------------


def test_a_yaml_parse_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1e-3\nseed: 0\n")
    with pytest.raises(ValueError, match=r"bad.yaml:3:5: YAML does not parse \(did not find expected") as err:
        load_config(bad)
    assert "\n" not in str(err.value)
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", str(bad)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.startswith(TRAIN) and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        ("logging.every=0", "logging.every must be >= 1, got 0"),
        ("schedule.min_lr=-1", "schedule.min_lr must be >= 0, got -1.0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0, got -0.1"),
        ("checkpoint.every=-5", "checkpoint.every must be >= 0 (0: only at the end and on SIGTERM), got -5"),
        ("optim.grad_clip=-1", "optim.grad_clip must be >= 0 (0 turns clipping off), got -1.0"),
        ("seed=-3", "seed must be >= 0, got -3"),
        ("optim.eps=0", "optim.eps must be > 0, got 0.0"),
        ("optim.betas=[0.9,1.5]", "optim.betas must be two values in [0, 1), got [0.9, 1.5]"),
        ("data.caption_dropout=2", "data.caption_dropout must be in [0, 1], got 2.0"),
        ("optim.lr=inf", "optim.lr=inf is not a finite number; give a finite value"),
        ("optim.lr=nan", "optim.lr=nan is not a finite number; give a finite value"),
        ("optim.betas=[0.9,nan]", "optim.betas[1]=nan is not a finite number; give a finite value"),
        ("data.cache_gb=-inf", "data.cache_gb=-inf is not a finite number; give a finite value"),
        ("eval.height=30 eval.width=-8", "eval.width must be >= 1, got -8"),
        (
            "model.name=no-such-model",
            "model.name=no-such-model is not a model.kind=t2i config; choose one of 14B-16x, 14B-64x, tiny-<P>x, "
            "demo-<P>x",
        ),
    ],
)
def test_out_of_range_fields_are_one_line_errors(override, message):
    with pytest.raises(ValueError) as err:
        load_config(CONFIGS / "tiny_t2i.yaml", override.split())
    assert str(err.value) == message


def test_a_crop_size_the_tokenizer_cannot_tile_is_refused():
    with pytest.raises(ValueError) as err:
        load_config(CONFIGS / "tiny_tokenizer.yaml", ["data.image_size=31"])
    assert str(err.value) == (
        "data.image_size=31 is not a multiple of the downsample stride 2 of model.name=tiny; use e.g. 32"
    )


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["data.micro_batch=3"], 1, "data.global_batch 2 is not divisible by micro_batch 3 x data-parallel size 1"),
        (["data.global_batch=4"], 3, "data.global_batch 4 is not divisible by micro_batch 1 x data-parallel size 3"),
        (
            ["engine.kind=megatron", "parallel.tp=3"],
            3,
            "parallel.tp=3 does not divide the 4 attention heads; choose tp dividing the number of heads",
        ),
        (
            ["engine.kind=megatron", "parallel.pp=64"],
            64,
            "parallel.pp=64 does not divide the 2 layers; choose pp dividing the number of layers",
        ),
        (
            ["engine.kind=megatron", "parallel.tp=2"],
            3,
            "world size 3 is not divisible by parallel.tp 2 x parallel.pp 1; launch a multiple of 2 processes",
        ),
    ],
)
def test_batches_and_layouts_the_model_or_the_world_cannot_run_are_refused_at_start_up(overrides, world, message):
    cfg = load_config(CONFIGS / "tiny_t2i.yaml", overrides)
    with pytest.raises(ValueError) as err:
        training_config.startup_checks(cfg, world)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), err.value


def test_a_missing_local_data_folder_is_named_by_its_key(tmp_path):
    def missing(*overrides: str) -> str | None:
        return training_config.missing_data_folder(load_config(None, list(overrides)))

    assert missing(f"data.data_dir={tmp_path}") is None
    assert missing("data.data_dir=s3://bucket/tokens", f"data.val_dir={tmp_path}") is None  # URLs: the loader's
    assert missing(f"data.data_dir={tmp_path}", f"data.val_dir={tmp_path}/val").startswith(
        f"data.val_dir={tmp_path}/val does not exist; point it at the dataset's folder"
    )
    (tmp_path / "file").write_text("")
    mixture = f"data.sources=[{{dir: {tmp_path}}}, {{dir: {tmp_path}/file}}]"
    assert missing(mixture).startswith(f"data.sources[1].dir={tmp_path}/file is not a folder")


def test_a_missing_data_folder_is_one_line_from_the_cli(tmp_path):
    cmd = [sys.executable, "-m", "training.train", "--config", str(CONFIGS / "tiny_t2i.yaml")]
    cmd += [f"run_dir={tmp_path / 'run'}", f"data.data_dir={tmp_path / 'nonexistent'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"{TRAIN}data.data_dir={tmp_path / 'nonexistent'} does not exist"), proc.stderr
    env = {**os.environ, "BITDANCE_DEBUG": "1"}  # (or --debug): the traceback
    debug = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "does not exist" in debug.stderr


def test_a_sample_size_the_model_cannot_draw_is_refused_before_the_first_step():
    from models.t2i.model import get_t2i_config

    model = get_t2i_config("tiny-4x", image_sizes=((32, 32), (32, 64)))
    grids = ["eval.every=2", "eval.prompts=[a red square]"]

    def check(*overrides: str) -> None:
        training_config.check_eval_size(load_config(CONFIGS / "tiny_t2i.yaml", list(overrides)), model)

    check(*grids, "eval.height=32", "eval.width=64")
    check("eval.height=30")  # no grids are drawn
    with pytest.raises(ValueError) as err:
        check(*grids, "eval.height=30", "eval.width=32")
    assert str(err.value) == (
        "eval.height=30 eval.width=32: image size 30x32 (HxW) is not supported; choose one of: 32x32, 32x64"
    )


# ---- tokenize CLI -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    cfg = get_tokenizer_config("tiny")
    torch.manual_seed(0)
    save_tokenizer(BinaryAutoencoder(cfg), cfg, root / "ae", name="tiny")
    text = build_chat_tokenizer(["a red square"], root / "text", vocab_size=300)
    raw = root / "raw"
    raw.mkdir()
    with tarfile.open(raw / "a.tar", "w") as tar:
        for name, payload in (("x.png", png()), ("x.txt", b"a red square")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return {"ae": root / "ae", "text": text, "raw": raw}


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def argv(tools, out: Path, *extra: str, source: str | None = None) -> list[str]:
    return [
        *("--source", "wds", "--input", str(source or tools["raw"]), "--output", str(out)),
        *("--tokenizer", str(tools["ae"]), "--text-tokenizer", str(tools["text"]), "--parallel-num", "4"),
        *extra,
    ]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--parallel-num", "3"], "error: --parallel-num must be a square number (1, 4, 16, 64, ...), got 3"),
        (["--size", "0x32"], "error: --size needs positive sides (e.g. 512x512), got 0x32"),
        (["--max-member-mb", "0"], "error: --max-member-mb must be >= 1, got 0"),
    ],
)
def test_bad_flags_are_refused_before_the_output_exists(tools, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as err:
        main(argv(tools, tmp_path / "out", *extra))
    assert err.value.code == 2 and capsys.readouterr().err.strip() == message
    assert not (tmp_path / "out").exists()


def test_unusable_paths_are_one_line_errors_before_the_output_exists(tools, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a folder")
    cases = [
        (argv(tools, tmp_path / "out", source=tmp_path / "missing"), "--input .*missing does not exist"),
        (argv(tools, tmp_path / "file"), "--output .*file is a file; give a folder"),
        (argv(tools, tmp_path / "out", source=tmp_path / "empty"), "no input found for source wds .* .tar files"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit, match=message) as err:
            main(args)
        assert isinstance(err.value.code, str) and "\n" not in err.value.code
        assert not (tmp_path / "out").exists()


def test_a_corrected_rerun_claims_a_folder_that_holds_no_shard(tools, tmp_path, monkeypatch):
    import data_pipeline.tokenize as tok

    def crash(*args):
        raise RuntimeError("the job died before finishing a shard")

    base = dict(
        source="wds",
        input=str(tools["raw"]),
        output=str(tmp_path / "out"),
        tokenizer=str(tools["ae"]),
        text_tokenizer=str(tools["text"]),
        parallel_num=4,
    )
    with monkeypatch.context() as m:
        m.setattr(tok, "_run_local", crash)
        with pytest.raises(RuntimeError):
            run_tokenize(TokenizeConfig(**base, sizes=[(64, 64)]), local=True)
    assert (tmp_path / "out" / "tokenize_config.json").is_file()  # claimed, no shard finished
    manifest = run_tokenize(TokenizeConfig(**base, sizes=[(32, 32)]), local=True)
    assert manifest["samples"] == 1 and manifest["identity"]["sizes"] == [[32, 32]]
    with pytest.raises(SystemExit, match="differs in: sizes"):  # once shards exist, another config is refused
        run_tokenize(TokenizeConfig(**base, sizes=[(64, 64)]), local=True)
