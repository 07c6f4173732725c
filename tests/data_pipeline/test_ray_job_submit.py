"""`ray job submit` of the tokenize entry point to a local head node that the test starts (127.0.0.1 only)."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig
from data_pipeline.shapes import benchmark_prompts, write_shapes_dataset
from models.t2i.text_tokenizer import build_chat_tokenizer
from models.tokenizer.io import save_tokenizer
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path_factory):
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("ray CLI not installed")
    # token authentication on, with a token that only this test's head and client know
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    env.pop("RAY_ADDRESS", None)
    temp = tmp_path_factory.mktemp("r", numbered=True)
    port, dash = free_port(), free_port()
    start = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        address = f"http://127.0.0.1:{dash}"
        wait_until_jobs_are_accepted(env, address)
        yield env, address
    finally:
        stop_processes_started_with(env["RAY_AUTH_TOKEN"])


def wait_until_jobs_are_accepted(env: dict, address: str, timeout: float = 300) -> None:
    """Readiness: `ray start` returns before the head's job agent has registered, and a submission before that fails
    with "No available agent to submit job" (the head waits only 10 s for it). Submit a trivial job until one is
    accepted, or fail at the deadline; each refused attempt is the head's own wait, not a sleep."""
    deadline = time.monotonic() + timeout
    probe = [str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait", "--", "python", "-c", "pass"]
    while True:
        r = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            output = r.stdout[-1500:] + r.stderr[-1500:]
            raise AssertionError(f"the Ray head accepted no job within {timeout} s: {output}")


def stop_processes_started_with(token: str) -> None:
    """Stop only the Ray processes this test started: those that inherited the test's own auth token, and all their
    descendants (the raylet's agents get a cleaned environment); never a forced global `ray stop`, which would end
    every Ray process of the user."""
    import psutil

    ours = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_AUTH_TOKEN") == token:
                ours += [proc, *proc.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    ours = list({proc.pid: proc for proc in ours}.values())
    for proc in ours:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(ours, timeout=30)
    for proc in alive:
        proc.kill()


def test_ray_job_submit_tokenizes(head, tmp_path):
    env, address = head
    sizes = [(64, 64), (32, 32), (32, 64), (64, 32), (48, 48)]
    write_shapes_dataset(tmp_path / "raw", 48, sizes=sizes, samples_per_shard=16)
    cfg = get_tokenizer_config("tiny")
    torch.manual_seed(0)
    save_tokenizer(BinaryAutoencoder(cfg), cfg, tmp_path / "ae", name="tiny")
    text = build_chat_tokenizer([p["prompt"] for p in benchmark_prompts()], tmp_path / "text", vocab_size=400)
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "-m",
        "data_pipeline.tokenize",
        "--source",
        "wds",
        "--input",
        str(tmp_path / "raw"),
        "--output",
        str(tmp_path / "tokens"),
        "--tokenizer",
        str(tmp_path / "ae"),
        "--text-tokenizer",
        str(text),
        "--parallel-num",
        "4",
        "--num-actors",
        "1",
        *[f"--size={h}x{w}" for h, w in sizes],
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout
    manifest = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    assert manifest["samples"] == 48 and len(manifest["shards"]) == 3
    assert set(manifest["size_histogram"]) == {"64x64", "32x32", "32x64", "64x32", "48x48"}

    # the packing loader fills its token budget on this mixed-size shapes data
    loader = BinaryTokenLoader(LoaderConfig(tmp_path / "tokens", token_budget=8192, num_workers=0))
    for i, _ in enumerate(loader):
        if i == 20:
            break
    assert loader.stats()["fill_ratio"] >= 0.97
