"""`eval.generate` writes the official layouts, resumes, and gives the same images on 1 and 2 ranks."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import tiny_t2i_folder
from PIL import Image

from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_t2i_folder(tmp_path_factory.mktemp("evalmodel"))


def generate(folder, out, task, *extra, nproc=1):
    args = [
        "-m",
        "eval.generate",
        "--task",
        task,
        "--model",
        str(folder),
        "--out",
        str(out),
        "--limit",
        "3",
        "--image-size",
        "32x32",
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "2",
        "--cfg-scale",
        "2",
        "--batch-size",
        "1",
        *extra,
    ]
    cmd = (
        [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *args]
        if nproc > 1
        else [sys.executable, *args]
    )
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}


@pytest.mark.slow
def test_geneval_layout_resume_and_rank_independence(folder, tmp_path):
    out = tmp_path / "g1"
    generate(folder, out, "geneval")
    shared = (REPO.parent / "shared" / "eval_prompts" / "evaluation_metadata.jsonl").read_text().splitlines()
    for i in range(3):
        assert json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) == json.loads(shared[i])
        assert sorted(p.name for p in (out / f"{i:05d}" / "samples").iterdir()) == [f"{k:04d}.png" for k in range(4)]
        assert Image.open(out / f"{i:05d}" / "samples" / "0000.png").size == (32, 32)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = generate(folder, out, "geneval")
    assert "0 left" in again.stdout and {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    (out / "00001" / "metadata.jsonl").unlink()  # a half-written prompt folder
    generate(folder, out, "geneval")
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert all(after[p] == t for p, t in before.items() if "00001" not in str(p))
    assert all(after[p] != t for p, t in before.items() if "00001" in str(p))
    generate(folder, tmp_path / "g2", "geneval", nproc=2)
    assert files(out) == files(tmp_path / "g2")


@pytest.mark.slow
def test_dpg_layout(folder, tmp_path):
    generate(folder, tmp_path / "d", "dpg")
    ids = list(json.loads((REPO.parent / "shared" / "eval_prompts" / "dpg_prompts.json").read_text()))[:3]
    assert sorted(p.stem for p in (tmp_path / "d").glob("*.png")) == sorted(ids)
    grid = np.asarray(Image.open(tmp_path / "d" / f"{ids[0]}.png"))
    assert grid.shape == (64, 64, 3)


@pytest.mark.slow
def test_shapes_generation_scoring_and_report(folder, tmp_path):
    from eval.report import write_report
    from eval.shapes_bench import main as shapes_main

    out = tmp_path / "s"
    generate(folder, out, "shapes", "--images-per-prompt", "2", "--batch-size", "4")
    result = shapes_main([str(out), "--chance-samples", "20"])
    assert set(result["per_tag"]) <= {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    summary = json.loads((out / "summary.json").read_text())
    assert "shapes" in summary and 0.0 <= summary["shapes"]["overall"] <= 1.0
    report = write_report(out).read_text()
    assert "| tag | accuracy |" in report and "report_samples.png" in report and "| steps | 2 |" in report
    assert Image.open(out / "report_samples.png").size[0] > 0


@pytest.mark.slow
def test_imagenet_npz_has_the_adm_layout(tmp_path):
    from models.c2i.io import save_c2i_checkpoint
    from models.c2i.model import ClassConditionalBitDance, get_c2i_config

    ckpt = tmp_path / "c2i.pt"
    torch.manual_seed(0)
    save_c2i_checkpoint(
        ckpt, ClassConditionalBitDance(get_c2i_config("tiny-4x")), BinaryAutoencoder(get_tokenizer_config("tiny"))
    )
    cmd = [
        sys.executable,
        "-m",
        "eval.generate",
        "--task",
        "imagenet",
        "--model",
        str(ckpt),
        "--model-config",
        "tiny-4x",
        "--out",
        str(tmp_path / "in"),
        "--num-classes",
        "3",
        "--per-class",
        "2",
        "--steps",
        "2",
        "--cfg-scale",
        "2",
        "--cfg-schedule",
        "linear",
        "--batch-size",
        "4",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arr = np.load(tmp_path / "in" / "samples.npz")["arr_0"]
    assert arr.shape == (6, 32, 32, 3) and arr.dtype == np.uint8
    assert list(np.load(tmp_path / "in" / "samples.npz").keys()) == ["arr_0"]


def test_sampler_flags_default_to_sampling_config():
    from eval.generate import parse_args, sampling_config
    from models.core.sampling import SamplingConfig

    args = parse_args(["--task", "prompts", "--model", "m", "--out", "o", "--prompt", "a cat"])
    assert sampling_config(args) == SamplingConfig()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "prompts"], "needs --prompt TEXT (repeatable) or --prompts-file FILE"),
        (["--task", "prompts", "--prompt", " "], "--prompt text must not be empty"),
        (["--task", "prompts", "--prompts-file", "/no/such.txt"], "--prompts-file /no/such.txt does not exist"),
        (["--task", "geneval", "--prompt", "a cat"], "--prompt goes with --task prompts"),
        (["--task", "geneval", "--classes", "1,2"], "--classes goes with --task imagenet"),
        (["--task", "dpg", "--no-ema"], "--no-ema goes with --task imagenet"),
        (["--task", "geneval", "--image-size", "512"], "sizes look like 512x512"),
        (["--task", "geneval", "--cfg-schedule", "cosine"], "invalid choice: 'cosine'"),
        (["--task", "imagenet", "--model-config", "XL"], "unknown model config 'XL'"),
        (["--task", "imagenet", "--per-class", "0"], "--per-class must be >= 1"),
        (["--task", "geneval", "--batch-size", "0"], "--batch-size and --images-per-prompt must be >= 1"),
        (["--task", "geneval", "--limit", "0"], "--limit must be >= 1, got 0"),
        (["--task", "shapes", "--per-tag", "0"], "--per-tag: per_tag must be in [1, 30], got 0"),
        (["--task", "dpg", "--prompts-file", "/no/such.json"], "DPG-Bench prompts /no/such.json does not exist"),
    ],
)
def test_bad_arguments_are_one_line_errors(extra, message, capsys, tmp_path):
    from eval.generate import parse_args

    model = "m"
    if "imagenet" in extra:  # a real (tiny) class-conditional checkpoint: its config is read from the file
        from models.c2i.io import save_c2i_checkpoint
        from models.c2i.model import ClassConditionalBitDance, get_c2i_config

        model = str(tmp_path / "tiny.pt")
        save_c2i_checkpoint(model, ClassConditionalBitDance(get_c2i_config("tiny-4x")))
    with pytest.raises(SystemExit) as err:
        parse_args(["--model", model, "--out", "o", *extra])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.value.code == 2 and last.startswith("python -m eval.generate: error:") and message in last


def test_shapes_prompts_file_gives_its_prompts_and_refuses_a_bad_line_in_one_line(capsys, tmp_path):
    """--task shapes --prompts-file: JSON lines of shapes prompt dicts (extra keys kept) are the jobs, in file order; a
    line the scorer could not read is one line naming it."""
    from eval.benchmarks import get_benchmark
    from eval.generate import load_jobs, parse_args
    from eval.shapes_bench import shapes_prompts

    specs = [p | {"seed": k} for k in (0, 1) for p in shapes_prompts(k, 2)]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(p) + "\n" for p in specs))
    args = parse_args(["--model", "m", "--out", "o", "--task", "shapes", "--prompts-file", str(good)])
    assert [j.meta for j in load_jobs(get_benchmark("shapes"), args)] == specs
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(specs[0]) + "\n" + json.dumps(specs[1] | {"tag": "vibes"}) + "\n")
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--out", "o", "--task", "shapes", "--prompts-file", str(bad)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"shapes prompts {bad} prompt 2 is no shapes prompt" in last


def test_low_memory_flags_sample_what_fp32_samples(folder, tmp_path):
    """--offload keeps every image bit for bit; --weights bf16 / int8 change pixels only slightly (same seeds)."""
    from eval.generate import main as eval_generate_main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    runs = {"fp32": [], "offload": ["--offload"], "bf16": ["--weights", "bf16"], "int8": ["--weights", "int8"]}
    images = {}
    for name, extra in runs.items():
        argv = ["--task", "prompts", "--model", str(folder), "--out", str(tmp_path / name), "--prompts-file"]
        argv += [str(prompts), "--images-per-prompt", "2", "--image-size", "32x32", "--height", "32", "--width", "32"]
        eval_generate_main([*argv, "--steps", "2", "--cfg-scale", "2", *extra])  # in this process: no start-up
        images[name] = {k: np.asarray(Image.open(io.BytesIO(v))) for k, v in files(tmp_path / name).items()}
    assert len(images["fp32"]) == 2
    assert all(np.array_equal(images["offload"][k], v) for k, v in images["fp32"].items())
    for name in ("bf16", "int8"):
        diff = [np.abs(images[name][k].astype(int) - v.astype(int)).mean() / 255 for k, v in images["fp32"].items()]
        print(name, "mean |pixel difference| per image vs fp32:", [f"{d:.4f}" for d in diff])
        assert max(diff) < 0.05, (name, diff)
