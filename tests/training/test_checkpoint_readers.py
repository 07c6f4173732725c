"""Keep-last-N and checkpoint readers (training.checkpoint_readers): a live reader keeps the checkpoints it has not
read, a stale one does not, `latest` is never deleted, a claim stops a deletion (also one already under way), and a
reader claiming a checkpoint that a deletion moved aside for an instant gets it back."""

import json
import os
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from training.checkpoint import save_checkpoint
from training.checkpoint_readers import ASIDE, Registration, delete_checkpoint, readers_dir, registered_readers


class FakeEngine:
    """The part of `training.engines.Engine` that checkpoints use: one weight file."""

    def save_state(self, directory: Path, ema) -> tuple[dict, dict]:
        save_file({"w": torch.ones(4)}, str(directory / "model.safetensors"))
        return {}, {}

    def when_saved(self, finalize) -> None:
        finalize()


def write(run_dir: Path, step: int, keep_last: int = 1) -> Path:
    return save_checkpoint(run_dir, step, FakeEngine(), None, {}, {"step": step}, keep_last)


def names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*step_*"))


def register(run_dir: Path, name: str, age_s: float = 0.0, stale_after_s: float = 600.0, **fields) -> Path:
    """A reader's registration as its file says it (no heartbeat thread), last refreshed `age_s` ago."""
    path = readers_dir(run_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"stale_after_s": stale_after_s, "needs_after": -1, "until_step": None, "reading": None, **fields}
    path.write_text(json.dumps(state))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_live_reader_keeps_what_it_has_not_read_then_lets_it_go(tmp_path, capsys):
    with Registration(tmp_path, "shapes") as reader:
        for step in (1, 2, 3):
            write(tmp_path, step)
        assert names(tmp_path) == ["step_00000001", "step_00000002", "step_00000003"]
        assert "keep-last: keeping step_00000001, step_00000002 for checkpoint reader shapes" in capsys.readouterr().out
        reader.done_through(2)
        write(tmp_path, 4)
        assert names(tmp_path) == ["step_00000003", "step_00000004"]
        reader.update(until_step=3)  # it wants nothing after step 3
        reader.done_through(3)
        write(tmp_path, 5)
        assert names(tmp_path) == ["step_00000005"]
    assert not (readers_dir(tmp_path) / "shapes.json").exists()  # a clean exit unregisters


def test_the_heartbeat_keeps_a_reader_live_and_a_stale_reader_is_ignored(tmp_path, capsys):
    with Registration(tmp_path, "fresh", stale_after_s=0.4):  # a heartbeat every 0.1 s
        renewals, last, deadline = 0, None, time.monotonic() + 60  # a loaded machine may stall the thread a while
        while renewals < 5:  # the file is rewritten again and again: its age keeps dropping back
            assert time.monotonic() < deadline, f"{renewals} heartbeats in 60 s"
            (reader,) = registered_readers(tmp_path)
            renewals += last is not None and reader.age_s < last
            last = reader.age_s
            time.sleep(0.05)
    recent = register(tmp_path, "recent", age_s=1.0, stale_after_s=600.0)
    register(tmp_path, "dead", age_s=30.0, stale_after_s=10.0)
    assert {r.name: r.live for r in registered_readers(tmp_path)} == {"recent": True, "dead": False}
    recent.unlink()
    for step in (1, 2):
        write(tmp_path, step)
    assert names(tmp_path) == ["step_00000002"]
    out = capsys.readouterr().out
    assert "keep-last: ignoring checkpoint reader dead (no heartbeat for 30 s, stale after 10 s)" in out


def test_latest_is_never_deleted_even_for_a_reader_that_is_done(tmp_path):
    register(tmp_path, "done", needs_after=10**9)
    for step in (100, 101):  # an earlier run's checkpoints, with higher step numbers
        write(tmp_path, step, keep_last=3)
    write(tmp_path, 5)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    assert names(tmp_path) == ["step_00000005", "step_00000101"]


def test_a_claim_keeps_a_checkpoint_the_reader_is_reading(tmp_path, capsys):
    register(tmp_path, "reader", needs_after=10**9, reading="step_00000001")
    for step in (1, 2, 3):
        write(tmp_path, step)
    assert names(tmp_path) == ["step_00000001", "step_00000003"]
    assert "keeping step_00000001 for checkpoint reader reader" in capsys.readouterr().out


def test_a_claim_made_while_a_deletion_is_under_way_puts_the_checkpoint_back(tmp_path, capsys):
    path = write(tmp_path, 1, keep_last=3)
    aside = path.with_name(f".{path.name}{ASIDE}")
    os.rename(path, aside)  # the trainer moved it aside, and died (or was about to read the claims)
    register(tmp_path, "late", needs_after=10**9, reading=path.name)
    assert delete_checkpoint(aside) is False
    assert (path / "trainer.json").is_file() and not aside.exists()
    assert "put step_00000001 back for checkpoint reader late (claimed meanwhile)" in capsys.readouterr().out
    (readers_dir(tmp_path) / "late.json").unlink()
    os.rename(path, aside)
    write(tmp_path, 2, keep_last=3)  # an interrupted deletion nobody wants is finished at the next save
    assert names(tmp_path) == ["step_00000002"]


def test_a_reader_claims_a_checkpoint_that_comes_back_and_gives_up_on_one_that_is_gone(tmp_path):
    path = write(tmp_path, 1)
    aside = path.with_name(f".{path.name}{ASIDE}")
    os.rename(path, aside)
    with Registration(tmp_path, "reader") as reader:
        back = threading.Timer(0.3, os.rename, (aside, path))
        back.start()
        assert reader.claim(path, attempts=40, wait_s=0.05)
        back.join()
        assert json.loads(reader.path.read_text())["reading"] == "step_00000001"
        assert not reader.claim(tmp_path / "checkpoints" / "step_00000009", attempts=2, wait_s=0.01)
        assert json.loads(reader.path.read_text())["reading"] is None
