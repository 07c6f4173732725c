"""cluster.preflight in gloo mode on this machine: it passes under `torchrun --standalone --nproc-per-node 2`, and each
check fails with its one line, naming the node and rank, when its fault is planted (real processes). The GPU-health
parsing runs against a stand-in `nvidia-smi`; the rank environment of srun is read without torchrun."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import preflight

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HOST = re.escape(socket.gethostname())


def run_preflight(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    (tmp_path / "data").mkdir(exist_ok=True)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "cluster.preflight"]
    cmd += ["--backend", "gloo", "--data", str(tmp_path / "data"), "--checkpoint-dir", str(tmp_path / "ckpt")]
    cmd += ["--keep-last", "2", "--checkpoint-gb", "0.001", "--shared-dir", str(tmp_path / "shared")]
    cmd += ["--allreduce-mb", "4", "--p2p-mb", "2", "--iters", "2", "--timeout", "60", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=180)


def failed_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("preflight FAILED")]


@pytest.mark.slow
def test_preflight_passes_on_this_machine_with_a_table_per_node(tmp_path):
    proc = run_preflight(tmp_path, "--expect-gpus", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert not failed_lines(proc)
    out = proc.stdout
    assert "preflight: 2 rank(s) on 1 node(s), backend gloo" in out
    rows = {tuple(re.split(r"\s{2,}", line)[:4]) for line in out.splitlines()}  # node, ranks, check, status
    host = socket.gethostname()
    for check in ("devices", "data", "checkpoint dir", "disk", "shared fs", "versions", "p2p"):
        assert (host, "0-1", check, "ok") in rows, f"{check} row missing in\n{out}"
    assert (host, "0", "all-reduce", "ok") in rows and (host, "0", "gpu health", "skip") in rows
    assert re.search(r"all-reduce\s+ok\s+4 MiB over 2 ranks: [\d.]+ GB/s bus bandwidth", out)
    assert "preflight passed on 1 node(s), 2 rank(s)" in out
    assert not list((tmp_path / "shared").iterdir()) and not list((tmp_path / "ckpt").iterdir())  # no litter


def unwritable_dir(tmp_path: Path) -> Path:
    """A checkpoint folder this process cannot write into: chmod 0o500 where that stops writes; running as root (or
    with CAP_DAC_OVERRIDE) it does not, so then the folder lies under a regular file."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").write_text("x")
    except PermissionError:
        return locked / "ckpt"
    (locked / "probe").unlink()
    locked.chmod(0o700)
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path / "a_file" / "ckpt"


FAULTS = {
    "missing data folder": (
        lambda t: (["--data", str(t / "missing")], {}),
        r"\(ranks 0-1\): data path .*/missing is missing",
    ),
    "unwritable checkpoint folder": (
        lambda t: (["--checkpoint-dir", str(unwritable_dir(t))], {}),
        r"\(ranks 0-1\): checkpoint folder .*/ckpt is not writable: ",
    ),
    "too little disk": (
        lambda t: (["--checkpoint-gb", "1e9"], {}),
        r"\(ranks 0-1\): checkpoint folder .*/ckpt has [\d.]+ GB free, needs 3000000000.0 GB",
    ),
    "package version mismatch": (
        lambda t: ([], {preflight.FAKE_VERSION_ENV: "1:torch=0.0.0"}),
        r"\(rank 1\): versions differ from rank 0's: torch 0.0.0 \(rank 0 has [\w.+]+\)",
    ),
    "fewer devices than asked": (
        lambda t: (["--expect-gpus", "4"], {}),
        r"\(ranks 0-1\): 2 CPU device\(s\) \(processes on this node, backend gloo\), expected 4 \(--expect-gpus\)",
    ),
    "folder not shared": (
        lambda t: (["--shared-dir", str(t / "per_rank_$RANK")], {}),
        r"\(rank 1\): shared folder .*/per_rank_1 does not show the file rank 0 \(.+\) wrote there",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_planted_fault_fails_its_check_in_one_line(fault, tmp_path):
    plant, pattern = FAULTS[fault]
    args, env = plant(tmp_path)
    proc = run_preflight(tmp_path, *args, env=env)
    assert proc.returncode != 0
    lines = failed_lines(proc)
    assert len(lines) == 1, proc.stdout + proc.stderr[-3000:]
    assert re.fullmatch(rf"preflight FAILED on node {HOST} {pattern}.*", lines[0]), lines[0]
    assert " FAIL " in proc.stdout  # the table on rank 0 shows it too


# ---------------------------------------------------------------- without torchrun


def fake_nvidia_smi(tmp_path: Path, monkeypatch, rows: str, event_reasons: str | None) -> None:
    """An `nvidia-smi` on PATH answering --query-gpu like the real one (CSV rows; exit 2 for a field it lacks)."""
    reasons = (
        f'    *clocks_event_reasons*) printf "{event_reasons}" ;;'
        if event_reasons is not None
        else '    *clocks_event_reasons*) echo "Field is not a valid field to query."; exit 2 ;;'
    )
    script = "\n".join(
        [
            "#!/bin/bash",
            'case "$1" in',
            reasons,
            '    *clocks_throttle_reasons*) printf "0, Not Active\\n1, Active\\n" ;;',
            f'    *memory.used*) printf "{rows}" ;;',
            "    *) exit 2 ;;",
            "esac",
        ]
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(script + "\n")
    (bin_dir / "nvidia-smi").chmod(0o755 | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_gpu_health_reads_ecc_errors_slowdown_and_memory_in_use(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, "0, 812, 0\\n1, 70000, 3\\n", event_reasons=None)
    r = preflight.check_gpu_health("nccl", local_rank=0, max_used_gb=4.0)
    assert r.status == "FAIL"
    assert r.detail == (
        "GPU 1 has 3 uncorrected ECC error(s); GPU 1 clocks are held down by a hardware slowdown; "
        "GPU 1 already has 73.4 GB in use (another process?)"
    )
    assert preflight.check_gpu_health("nccl", local_rank=1, max_used_gb=4.0) is None  # the node's first rank asks


def test_gpu_health_passes_healthy_gpus_and_ecc_off(tmp_path, monkeypatch):
    fake_nvidia_smi(
        tmp_path, monkeypatch, "0, 812, 0\\n1, 600, [N/A]\\n", event_reasons="0, Not Active\\n1, Not Active\\n"
    )
    r = preflight.check_gpu_health("nccl", local_rank=0, max_used_gb=4.0)
    assert (r.status, r.detail) == ("ok", "2 GPU(s): no uncorrected ECC errors, no hardware slowdown")


def test_srun_environment_and_its_missing_rendezvous(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(preflight.PreflightError, match="^MASTER_ADDR and MASTER_PORT are not set; run under torchrun"):
        preflight.environment()
    monkeypatch.setenv("MASTER_ADDR", "gpu-01")
    monkeypatch.setenv("MASTER_PORT", "29501")
    assert preflight.environment() == (5, 16, 1)


def test_fake_version_hook_is_checked(monkeypatch):
    monkeypatch.setenv(preflight.FAKE_VERSION_ENV, "1:torch=0.0.0,0:ray=9")
    assert preflight.fake_versions(1) == {"torch": "0.0.0"} and preflight.fake_versions(0) == {"ray": "9"}
    monkeypatch.setenv(preflight.FAKE_VERSION_ENV, "torch=0.0.0")
    with pytest.raises(preflight.PreflightError, match="must look like RANK:PACKAGE=VERSION"):
        preflight.fake_versions(0)
