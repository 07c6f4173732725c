"""`eval.generate`'s output folder and inputs under a careless or hostile user: an unrelated non-empty `--out` is
refused (its files untouched) unless `--overwrite`, which generates everything afresh; a folder it made resumes; DPG
ids that would leave `--out` and symlinks out of it are refused; a non-UTF-8 prompt file and a bad image size are one
line, before anything is written. Every check that needs no model runs with a placeholder `--model`."""

import json

import pytest
from helpers.data import tiny_t2i_folder
from PIL import Image

from eval.generate import main
from training.output_folder import MARKER, made_by

PROG = "python -m eval.generate: error:"
TINY = ["--image-size", "32x32", "--height", "32", "--width", "32", "--steps", "1", "--cfg-scale", "1"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny exported text-to-image folder (32x32 images)."""
    return tiny_t2i_folder(tmp_path_factory.mktemp("genout_model"), head_std=None)


def prompts(model, out, *extra) -> list[str]:
    return ["--task", "prompts", "--model", str(model), "--out", str(out), "--images-per-prompt", "1", *TINY, *extra]


def refused(argv, capsys) -> str:
    """The one error line of a run that must stop with exit status 2."""
    with pytest.raises(SystemExit) as err:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and "Traceback" not in "\n".join(lines), lines
    assert lines[-1].startswith(PROG), lines
    return lines[-1]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def foreign_folder(path):
    """A folder eval.generate did not make, holding what looks like its layout (a finished prompt 0) and more."""
    (path / "00000" / "samples").mkdir(parents=True)
    (path / "00000" / "metadata.jsonl").write_text(json.dumps({"prompt": "someone else's"}) + "\n")
    (path / "00000" / "samples" / "0000.png").write_bytes(b"not mine")
    (path / "run.json").write_text('{"theirs": true}')
    (path / "notes.txt").write_text("keep me")
    return path


def test_unrelated_non_empty_out_is_refused_and_left_untouched(tmp_path, capsys):
    out = foreign_folder(tmp_path / "theirs")
    before = snapshot(out)
    line = refused(prompts("no-model-needed", out, "--prompt", "a cat"), capsys)
    assert f"--out {out} is not empty" in line and "--overwrite" in line
    assert snapshot(out) == before


def test_overwrite_writes_into_it_afresh_and_then_it_resumes(model, tmp_path, capsys):
    out = foreign_folder(tmp_path / "theirs")
    main(prompts(model, out, "--prompt", "a cat", "--overwrite"))
    assert "generating all 1 prompts afresh" in capsys.readouterr().out  # its metadata.jsonl was not trusted
    assert json.loads((out / "00000" / "metadata.jsonl").read_text()) == {"prompt": "a cat"}
    assert Image.open(out / "00000" / "samples" / "0000.png").size == (32, 32)
    assert (out / "notes.txt").read_text() == "keep me" and json.loads((out / "run.json").read_text())["overwrite"]
    assert made_by(out) == "eval.generate"  # complete: from now on it is its own folder
    main(prompts(model, out, "--prompt", "a cat"))
    assert "rank 0 has 0 left" in capsys.readouterr().out


def test_own_folder_resumes_and_a_half_written_prompt_is_redone(model, tmp_path, capsys):
    out = tmp_path / "mine"
    main(prompts(model, out, "--prompt", "a cat", "--prompt", "a dog"))
    assert made_by(out) == "eval.generate" and (out / MARKER).is_file()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    (out / "00001" / "metadata.jsonl").unlink()
    capsys.readouterr()
    main(prompts(model, out, "--prompt", "a cat", "--prompt", "a dog"))
    assert "rank 0 has 1 left" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert all((after[p] == t) == ("00001" not in str(p)) for p, t in before.items())


@pytest.mark.parametrize("key", ["../../x", "ABSOLUTE", "a/b", ".."])
def test_dpg_ids_that_leave_out_are_refused_in_one_line(model, tmp_path, capsys, key):
    """A DPG id names its image `<out>/<id>.png`: one that is not a plain file name is refused (not renamed: the
    scorer looks images up by id), before anything is written."""
    key = str(tmp_path / "abs") if key == "ABSOLUTE" else key
    file = tmp_path / "dpg.json"
    file.write_text(json.dumps({"fine": "a cat", key: "a dog"}))
    out = tmp_path / "deep" / "er" / "out"
    argv = ["--task", "dpg", "--model", str(model), "--out", str(out), "--prompts-file", str(file), *TINY]
    line = refused(argv, capsys)
    assert f"id {key!r}" in line and "not a plain file name" in line
    assert not out.exists() and not list(tmp_path.rglob("*.png"))


def test_symlink_out_of_an_own_folder_is_refused(tmp_path, capsys):
    out, elsewhere = tmp_path / "mine", tmp_path / "elsewhere"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"tool": "eval.generate"}))
    elsewhere.mkdir()
    (out / "00000").symlink_to(elsewhere, target_is_directory=True)
    line = refused(prompts("no-model-needed", out, "--prompt", "a cat"), capsys)
    assert "outside" in line and "00000" in line
    assert not (out / "run.json").exists() and not list(elsewhere.iterdir())


@pytest.mark.parametrize("task", ["prompts", "dpg", "geneval"])
def test_non_utf8_prompt_file_is_one_line_naming_the_file_and_offset(tmp_path, capsys, task):
    file = tmp_path / "prompts.txt"
    file.write_bytes('{"prompt": "a café"}\n'.encode("latin-1"))  # é is byte 0xe9 at offset 17
    out = tmp_path / "out"
    line = refused(["--task", task, "--model", "m", "--out", str(out), "--prompts-file", str(file)], capsys)
    assert str(file) in line and "not UTF-8" in line and "byte offset 17" in line
    assert not out.exists()


def test_bad_height_is_refused_before_anything_is_written(model, tmp_path):
    out = tmp_path / "out"
    argv = prompts(model, out, "--prompt", "a cat")
    argv[argv.index("--height") + 1] = "20"
    with pytest.raises(SystemExit, match="20x32"):
        main(argv)
    assert not (out / "run.json").exists() and not out.exists()
