"""Checkpoint safety: retention never deletes what `latest` names, a run never starts behind the run folder's
checkpoints without `checkpoint.overwrite=true`, a missing `latest` resumes from the newest complete checkpoint, one
run per folder (lock), workers that die with their launcher, damaged files refused by their checksums, and a disk that
fills up during a save reported in one line while `latest` stays on the last complete checkpoint."""

import errno
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from training.checkpoint import latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from training.checkpoint_integrity import MANIFEST, CheckpointError
from training.config import load_config
from training.run_guard import RunDirError, RunLock

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TRAIN = "python -m training.train: error: "


class FakeEngine:
    """The part of `training.engines.Engine` that checkpoints use: one weight file."""

    def __init__(self, value: float = 1.0, size: int = 4):
        self.weight = torch.full((size,), value)

    def save_state(self, directory: Path, ema) -> tuple[dict, dict]:
        save_file({"w": self.weight}, str(directory / "model.safetensors"))
        return {}, {}

    def when_saved(self, finalize) -> None:
        finalize()

    def load_state(self, directory: Path, ema, trainer: dict, per_rank) -> str:
        self.weight = load_file(str(directory / "model.safetensors"))["w"]
        return "all"


def write(run_dir: Path, step: int, keep_last: int = 3, value: float = 1.0, size: int = 4) -> Path:
    return save_checkpoint(run_dir, step, FakeEngine(value, size), None, {}, {"step": step}, keep_last)


def names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


# ---- retention --------------------------------------------------------------------------------------------------


def test_retention_never_deletes_the_checkpoint_latest_names(tmp_path):
    for step in (100, 101, 102):  # an earlier run's checkpoints, with higher step numbers
        write(tmp_path, step)
    path = write(tmp_path, 5, keep_last=2)
    assert path.is_dir() and (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    assert latest_checkpoint(tmp_path) == path


def test_keep_last_below_one_is_refused():
    with pytest.raises(ValueError, match="checkpoint.keep_last must be >= 1, got 0"):
        load_config(None, ["checkpoint.keep_last=0"])


# ---- starting in a used run folder ------------------------------------------------------------------------------


def test_fresh_run_in_a_folder_with_checkpoints_is_refused_unless_overwrite(tmp_path, capsys):
    for step in (10, 20):
        write(tmp_path, step)
    with pytest.raises(RunDirError, match="checkpoint.overwrite=true") as err:
        resolve_resume(tmp_path, "none", overwrite=False)
    assert "\n" not in str(err.value) and "up to step 20" in str(err.value)
    assert names(tmp_path) == ["step_00000010", "step_00000020"]
    assert resolve_resume(tmp_path, "none", overwrite=True) is None
    assert names(tmp_path) == [] and not (tmp_path / "checkpoints" / "latest").exists()
    assert "deleted 2 checkpoint(s)" in capsys.readouterr().out


def test_resume_from_an_older_checkpoint_refuses_the_newer_ones(tmp_path):
    old = write(tmp_path, 10)
    write(tmp_path, 20)
    with pytest.raises(RunDirError, match="a run from step 10"):
        resolve_resume(tmp_path, str(old), overwrite=False)
    assert resolve_resume(tmp_path, str(old), overwrite=True) == old
    assert names(tmp_path) == ["step_00000010"]
    assert resolve_resume(tmp_path / "elsewhere", str(old), overwrite=False) == old  # another run folder: fine


# ---- missing `latest` -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "folder"])
def test_missing_latest_resumes_from_the_newest_complete_checkpoint(tmp_path, capsys, damage):
    for step in (2, 4):
        write(tmp_path, step, value=float(step))
    root = tmp_path / "checkpoints"
    (root / "step_00000006").mkdir()  # incomplete: no trainer.json
    (root / "latest").unlink()
    if damage == "folder":
        (root / "latest").mkdir()
    assert resolve_resume(tmp_path, "auto", overwrite=False) == root / "step_00000004"
    assert f"using the newest complete checkpoint {root / 'step_00000004'}" in capsys.readouterr().out
    engine = FakeEngine(0.0)
    trainer, _, _ = load_checkpoint(root / "step_00000004", engine, None)
    assert trainer["step"] == 4 and torch.equal(engine.weight, torch.full((4,), 4.0))


def test_latest_naming_an_incomplete_checkpoint_is_one_line(tmp_path):
    write(tmp_path, 2)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009\n")
    with pytest.raises(RunDirError, match="not a complete checkpoint") as err:
        latest_checkpoint(tmp_path)
    assert "\n" not in str(err.value)


def test_train_cli_refuses_a_fresh_run_in_a_used_folder_in_one_line(tmp_path):
    write(tmp_path / "run", 3)
    cmd = [sys.executable, "-m", "training.train", f"run_dir={tmp_path / 'run'}", "checkpoint.resume=none"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert err.startswith(TRAIN) and "checkpoint.overwrite=true" in err and "\n" not in err, err
    assert names(tmp_path / "run") == ["step_00000003"]


def test_train_cli_refuses_keep_last_zero_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "training.train", f"run_dir={tmp_path}", "checkpoint.keep_last=0"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == f"{TRAIN}checkpoint.keep_last must be >= 1, got 0"


# ---- checksums ----------------------------------------------------------------------------------------------------


def test_flipped_bits_in_the_weights_are_refused_naming_the_file(tmp_path):
    path = write(tmp_path, 1, size=16384)  # 64 KiB of weights
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 8192, len(data) - 4096):  # 4 KiB of tensor bytes: still a loadable safetensors file
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert not torch.equal(load_file(str(weights))["w"], torch.ones(16384))  # the damage loads silently by itself
    with pytest.raises(CheckpointError, match="model.safetensors does not match the sha256") as err:
        load_checkpoint(path, FakeEngine(), None)
    assert "\n" not in str(err.value)
    load_checkpoint(path, FakeEngine(), None, checksums=False)  # sizes only (huge checkpoints): same size, loads


def test_missing_truncated_or_unlisted_files_are_refused(tmp_path):
    path = write(tmp_path, 1)
    listed = set(json.loads((path / MANIFEST).read_text())["files"])
    assert listed == {"model.safetensors", "rank_00000.pt", "trainer.json"}
    (path / "extra.pt").write_bytes(b"planted")
    with pytest.raises(CheckpointError, match="extra.pt is not listed in"):
        load_checkpoint(path, FakeEngine(), None, checksums=False)
    (path / "extra.pt").unlink()
    with open(path / "rank_00000.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="rank_00000.pt has 100 bytes, its manifest says"):
        load_checkpoint(path, FakeEngine(), None, checksums=False)
    (path / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointError, match="rank_00000.pt is missing"):
        load_checkpoint(path, FakeEngine(), None)


def test_train_cli_reports_a_damaged_checkpoint_in_one_line(tmp_path):
    path = write(tmp_path / "run", 1)
    (path / "trainer.json").write_text((path / "trainer.json").read_text().replace('"step": 1', '"step": 7'))
    cmd = [sys.executable, "-m", "training.train", f"run_dir={tmp_path / 'run'}", "data.data_dir=/nonexistent"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert err.startswith(f"{TRAIN}checkpoint damaged: ") and "trainer.json" in err and "\n" not in err, err


# ---- a full disk -------------------------------------------------------------------------------------------------


class FillsTheDisk(FakeEngine):
    """Writes part of its weights, then fails as a write to a full disk does: Python's own writes raise OSError
    ENOSPC, torch.save a RuntimeError that carries no errno."""

    def __init__(self, error: Exception):
        super().__init__()
        self.error = error

    def save_state(self, directory: Path, ema) -> tuple[dict, dict]:
        (directory / "model.safetensors").write_bytes(bytes(3000))
        raise self.error


def free_space(monkeypatch, free: int) -> None:
    usage = SimpleNamespace(total=1 << 30, used=(1 << 30) - free, free=free)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("[enforce fail at inline_container.cc:672] .")],
)
def test_a_full_disk_during_a_save_is_one_line_naming_the_folder_and_the_space(tmp_path, monkeypatch, error):
    first = write(tmp_path, 2, size=4096)  # 16 KiB of weights: what the next checkpoint needs too
    free_space(monkeypatch, 1024)
    with pytest.raises(OSError) as err:
        save_checkpoint(tmp_path, 4, FillsTheDisk(error), None, {}, {"step": 4}, 3)
    msg, size = str(err.value), sum(f.stat().st_size for f in first.iterdir())
    assert msg.startswith(f"disk full writing checkpoint {tmp_path / 'checkpoints' / '.step_00000004.tmp'}: "), msg
    assert f"about {size / 1024:.1f} KiB (the size of step_00000002)" in msg and "1.0 KiB free" in msg, msg
    assert "\n" not in msg and err.value.__cause__ is error
    assert latest_checkpoint(tmp_path) == first and names(tmp_path) == ["step_00000002"]
    first_run = tmp_path / "first"  # no earlier checkpoint: what was written before the disk filled
    with pytest.raises(OSError, match=r"needs more than the 2.9 KiB written before the disk filled, 1.0 KiB free"):
        save_checkpoint(first_run, 1, FillsTheDisk(error), None, {}, {"step": 1}, 3)


def test_other_save_errors_on_a_disk_with_room_pass_unchanged(tmp_path, monkeypatch):
    write(tmp_path, 2)
    free_space(monkeypatch, 1 << 30)
    with pytest.raises(RuntimeError, match="enforce fail"):
        save_checkpoint(tmp_path, 4, FillsTheDisk(RuntimeError("[enforce fail] a bug")), None, {}, {"step": 4}, 3)


def test_train_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    import training.train as train_cli

    def full(cfg):
        free_space(monkeypatch, 0)
        save_checkpoint(tmp_path, 1, FillsTheDisk(OSError(errno.ENOSPC, "No space left on device")), None, {}, {}, 3)

    monkeypatch.setattr(train_cli, "train", full)
    with pytest.raises(SystemExit) as exit_:
        train_cli.main([f"run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{TRAIN}disk full writing checkpoint {tmp_path / 'checkpoints'}"), err


# ---- one writer per run folder ----------------------------------------------------------------------------------

LOCKER = """
import sys
from training.run_guard import RunDirError, RunLock
try:
    RunLock(sys.argv[1])
except RunDirError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
print("locked")
"""


def test_a_second_process_cannot_lock_a_locked_run_folder(tmp_path):
    lock = RunLock(tmp_path / "run")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", LOCKER, str(tmp_path / "run")], env=ENV, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2, proc.stdout + proc.stderr
        err = proc.stderr.strip()
        assert f"is in use by another training run (pid {os.getpid()} holds" in err and "\n" not in err, err
    finally:
        lock.release()
    proc = subprocess.run(
        [sys.executable, "-c", LOCKER, str(tmp_path / "run")], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "locked", proc.stderr


PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(600)
"""
CHILD = """
import time
from training.run_guard import exit_with_parent
assert exit_with_parent()
print("ready", flush=True)
time.sleep(600)
"""


def read_line(stream, timeout: float) -> str:
    """One line from a pipe, or AssertionError after `timeout` seconds (a readiness wait with a deadline)."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise AssertionError(f"no line within {timeout} s")
    return stream.readline()


def gone(pid: int, timeout: float) -> bool:
    """Whether process `pid` has ended (or is a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)  # polling the process table, not synchronising on time


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_worker_exits_when_its_launcher_is_sigkilled(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD], env=ENV, stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    pid = None
    try:
        pid, state = read_line(parent.stdout, 120).split()
        assert state == "ready"
        parent.kill()
        parent.wait(timeout=60)
        assert gone(int(pid), 60), "the worker outlived its SIGKILLed parent"
    finally:
        parent.kill()
        if pid is not None and not gone(int(pid), 0):
            os.kill(int(pid), signal.SIGKILL)


def free_within(run: Path, timeout: float) -> None:
    """Lock and release `run`, retrying until `timeout`: a SIGKILLed process shows as a zombie while its other
    threads are still exiting, and its files (the lock) close with the last of them."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            RunLock(run).release()
            return
        except RunDirError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{e}; processes holding {run / '.lock'}: {lock_holders(run / '.lock')}") from e
            time.sleep(0.1)


def lock_holders(path: Path) -> list[str]:
    """'pid status cmdline' of every process with `path` open (diagnostics for a lock that is not released)."""
    out = []
    for proc in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if any(f.path == str(path) for f in proc.open_files()):
                out.append(f"{proc.pid} {proc.info['status']} {' '.join(proc.info['cmdline'] or [])[:200]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


@pytest.mark.slow
def test_torchrun_sigkill_takes_its_workers_and_their_lock_with_it(tmp_path):
    """A run holds its folder: a second run on it fails in one line; SIGKILL on torchrun ends the workers (no more
    checkpoints from them) and frees the folder."""
    from helpers.data import make_t2i_data

    data = make_t2i_data(tmp_path / "data")
    run = tmp_path / "run"
    args = [
        "-m",
        "training.train",
        "--config",
        str(REPO / "training" / "configs" / "tiny_t2i.yaml"),
        f"run_dir={run}",
        f"data.data_dir={data['tokens']}",
        "logging.every=1",
        "logging.wandb=disabled",
        "checkpoint.every=1",
        "schedule.total_steps=100000",
    ]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=1"]
    launcher = subprocess.Popen(
        [*torchrun, *args], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 600
        while not (run / "checkpoints" / "latest").is_file():  # the worker is training and checkpointing
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        workers = psutil.Process(launcher.pid).children()
        assert workers
        second = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        refused = second.returncode == 2 and "is in use by another training run" in second.stderr
        assert refused, f"exit {second.returncode}: {second.stderr[-3000:]}"
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        launcher.kill()
        launcher.wait(timeout=60)
        alive = [w for w in workers if not gone(w.pid, 120)]
        assert not alive, f"workers {[w.pid for w in alive]} outlived their SIGKILLed torchrun"
        free_within(run, 120)  # the folder is free again once the killed worker's last thread is gone
    finally:
        launcher.kill()
        for w in psutil.Process(os.getpid()).children(recursive=True):
            if w.pid != launcher.pid:
                w.kill()
