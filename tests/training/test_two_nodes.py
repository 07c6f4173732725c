"""Multi-node on one machine: training as 2 nodes x 1 process, two torchrun invocations (`--nnodes 2 --node-rank
0/1`) meeting at a c10d rendezvous on localhost. Node 1's process is SIGKILLed mid-run; torchrun (`--max-restarts`)
restarts the job on both nodes, the workers resume from the last checkpoint, and the losses equal those of a run
that was never interrupted."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.data import make_c2i_data, make_t2i_data
from helpers.train_runs import losses

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
CONFIG = REPO / "training" / "configs" / "tiny_c2i.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_nodes")
    return make_c2i_data(root / "c2i", make_t2i_data(root / "t2i", samples=24)["ae"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(run_dir: Path, data_dir: Path) -> list[str]:
    return [
        "-m",
        "training.train",
        "--config",
        str(CONFIG),
        f"run_dir={run_dir}",
        f"data.data_dir={data_dir}",
        "data.global_batch=8",
        "data.micro_batch=4",
        "schedule.total_steps=12",
        "schedule.warmup_steps=1",
        "checkpoint.every=4",
        "logging.every=1",
        "logging.wandb=disabled",
        "checkpoint.export_official=false",
    ]


def run_two_nodes(run_dir: Path, data_dir: Path, env_extra: dict[str, str]) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            TORCHRUN,
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(node),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            f"two-nodes-{port}",
            "--rdzv-conf",
            f"is_host={int(node == 0)}",  # node 0 hosts the rendezvous store, as the first node of a cluster does
            "--max-restarts",
            "1",
            *train_args(run_dir, data_dir),
        ]
        # cluster/nccl.env: a bootstrap store per rendezvous round (the shared one hands restarted workers stale
        # peer addresses)
        env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **env_extra}
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    return outs


def test_node_killed_mid_run_restarts_and_resumes_with_the_uninterrupted_losses(data, tmp_path):
    straight = run_two_nodes(tmp_path / "straight", data, {})
    assert all(r.returncode == 0 for r in straight), straight[0].stdout[-3000:] + straight[1].stdout[-3000:]
    # rank 1 (node 1's only process) dies after step 6, between the checkpoints of steps 4 and 8
    killed = run_two_nodes(tmp_path / "killed", data, {"BITDANCE_FAULT_KILL_RANK": "1:6"})
    log = killed[0].stdout + killed[1].stdout
    assert all(r.returncode == 0 for r in killed), log[-6000:]
    assert "resumed from" in log and "step_00000004" in log, log[-4000:]
    assert "failed (exitcode: -9)" in log, log[-4000:]  # torchrun saw the worker die of SIGKILL, then restarted
    want, got = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(want) == sorted(got) == list(range(1, 13))
    assert got == want
