"""`ray job submit` of the tokenize entry point to a local head node that the module starts (127.0.0.1 only): local
paths, and the README's object-storage form against a real S3 API (a `moto` server on 127.0.0.1, `helpers.moto_s3`)."""

import io
import json
import os
import posixpath
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import fsspec
import pytest
import torch
from helpers import moto_s3
from helpers.data import make_tokenizers
from helpers.moto_s3 import puts

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig
from data_pipeline.shapes import benchmark_prompts, write_shapes_dataset
from data_pipeline.shard_format import read_shard
from data_pipeline.tokenize import FAULT_MARKER, parse_args, run_tokenize
from models.t2i.text_tokenizer import build_chat_tokenizer
from models.tokenizer.io import save_tokenizer
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUCKET = "bitdance-ray-jobs"
moto, s3 = moto_s3.moto, moto_s3.s3  # module fixtures: the server, and its filesystem (AWS environment of this process)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """One head for the module's tests. Its environment holds no AWS variable, and no AWS config or credentials file
    of the machine: a job reaches S3 only with what its --runtime-env-json gives it."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("ray CLI not installed")
    temp = tmp_path_factory.mktemp("r", numbered=True)
    # token authentication on, with a token that only this test's head and client know
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"},
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "AWS_CONFIG_FILE": str(temp / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(temp / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    port, dash, agent, client = free_port(), free_port(), free_port(), free_port()
    start = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        # `ray start` binds these to fixed defaults (52365, 10001): taken by any other Ray head on the machine (the
        # user's, or a second test run), the job agent would never come up
        f"--dashboard-agent-listen-port={agent}",
        f"--ray-client-server-port={client}",
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
    _, alive = psutil.wait_procs(ours, timeout=10)  # then SIGKILL: some Ray processes ignore SIGTERM
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


def output_files(url: str | Path) -> dict:
    """Every file of a tokenized output (a local folder or an s3:// URL), by its path inside it: shards as their tar
    members' bytes, stats without their duration ("seconds"), json and jsonl as bytes; not the fault hook's marker."""
    fs, root = fsspec.core.url_to_fs(str(url))
    fs.invalidate_cache()
    found: dict = {}
    for path in fs.find(root):
        rel, data = posixpath.relpath(path, root), fs.cat_file(path)
        if rel.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                found[rel] = {m.name: tar.extractfile(m).read() for m in tar}
        elif rel.endswith(".stats.json"):
            stats = json.loads(data)
            assert stats.pop("seconds") >= 0
            found[rel] = stats
        elif rel != FAULT_MARKER:
            found[rel] = data
    return found


def jobs_api(env: dict, address: str, path: str, method: str = "GET") -> dict:
    """A call of the head's Jobs REST API (what `ray job status` / `ray job stop` call), without a CLI's start-up."""
    auth = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    req = urllib.request.Request(f"{address}/api/jobs/{path}", headers=auth, method=method)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def object_storage():
    """Skips where the S3 client or the moto server is not installed (before a server or a head is started)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")


def test_ray_job_submit_reads_and_writes_s3(object_storage, head, moto, s3, tmp_path):
    """The README form `ray job submit --working-dir . --runtime-env-json '{"env_vars": {AWS_ENDPOINT_URL, keys}}' --
    python -m data_pipeline.tokenize --input s3://... --output s3://...` (with --val-fraction), on the object-storage
    tests' raw data (shapes, and samples skipped). A job stopped half-way, then re-run, holds every sample once and the
    very shards and manifests of a local run of the same input; one more run skips every shard.
    Half-way: the fault hook kills the encoder actor on its third chunk (one input shard each), after a shard was
    written; Ray Data restarts the actor (the job would survive), and in the seconds that takes the test stops the job
    through the Jobs API (`ray job stop` starts slower than the actor restarts). Not with --dedup: it writes shards in
    input order, and the first may be the one whose chunk died, so none would be finished."""
    from test_object_storage import write_odd_tar  # the object-storage tests' odd samples (skipped, copies)

    env, address = head
    endpoint, log = moto
    raw = tmp_path / "raw"
    write_shapes_dataset(raw, 60, sizes=((32, 32), (32, 64)), samples_per_shard=20)
    write_odd_tar(raw / "zodd.tar", raw)
    text, ae = make_tokenizers(tmp_path)
    s3.mkdir(BUCKET)
    s3.put(f"{raw}/", f"{BUCKET}/raw/", recursive=True)
    flags = ["--source", "wds", "--tokenizer", str(ae), "--text-tokenizer", str(text), "--parallel-num", "4"]
    flags += ["--size", "32x32", "--size", "32x64", "--batch-size", "4", "--num-actors", "1"]
    flags += ["--val-fraction", "0.3"]
    run_tokenize(parse_args([*flags, "--input", str(raw), "--output", str(tmp_path / "local")]), local=True)

    out = f"s3://{BUCKET}/tokens"
    aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", "."]
    submit += ["--runtime-env-json", json.dumps({"env_vars": aws})]
    tokenize = ["--", "python", "-m", "data_pipeline.tokenize", *flags, "--input", f"s3://{BUCKET}/raw"]
    tokenize += ["--output", out]

    def run(cmd: list[str]) -> str:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    def finished() -> set[str]:  # input shards whose train and val shards are both finished
        stats = [posixpath.relpath(p, f"{BUCKET}/tokens") for p in s3.find(f"{BUCKET}/tokens")]
        stems = {p.removesuffix(".stats.json") for p in stats if p.endswith(".stats.json")}
        return {s for s in stems if f"val/{s}" in stems}

    # 1. stopped half-way
    job = f"killed-{secrets.token_hex(4)}"
    run([*submit, "--no-wait", "--submission-id", job, *tokenize, "--fault-kill-after", "3"])
    deadline = time.monotonic() + 300
    while True:
        s3.invalidate_cache()
        if s3.exists(f"{BUCKET}/tokens/{FAULT_MARKER}") and finished():
            break
        status = jobs_api(env, address, job)["status"]
        assert status in ("PENDING", "RUNNING"), f"job {status} before the fault hook fired"
        assert time.monotonic() < deadline, "the fault hook did not fire within 300 s"
        time.sleep(0.1)
    assert jobs_api(env, address, f"{job}/stop", "POST")["stopped"]  # (a CLI's start-up is longer than a restart)
    while (status := jobs_api(env, address, job)["status"]) in ("PENDING", "RUNNING"):
        time.sleep(0.1)
    assert status == "STOPPED", jobs_api(env, address, f"{job}/logs")["logs"][-3000:]
    s3.invalidate_cache()
    done = finished()
    assert 1 <= len(done) < 4 and not s3.exists(f"{BUCKET}/tokens/manifest.json"), done

    # 2. re-run: resumes, and holds every sample once, in the shards and manifests of the local run
    log_out = run([*submit, *tokenize])
    assert "succeeded" in log_out
    assert f"4 input shards, {len(done)} already done, {4 - len(done)} to tokenize" in log_out
    s3.invalidate_cache()
    tars = [p for p in s3.find(f"{BUCKET}/tokens") if p.endswith(".tar")]
    keys = [r.key for p in tars for r in read_shard(io.BytesIO(s3.cat_file(p)))]
    local_keys = [r.key for p in sorted((tmp_path / "local").rglob("*.tar")) for r in read_shard(p)]
    assert len(keys) == len(set(keys)) == len(local_keys) and set(keys) == set(local_keys)
    assert output_files(out) == output_files(tmp_path / "local")  # manifests, shard members, stats, errors

    # 3. one more run: every shard skipped, only the manifests and error lists rewritten
    before = len(puts(log, f"{BUCKET}/tokens"))
    log_out = run([*submit, *tokenize])
    assert "4 input shards, 4 already done, 0 to tokenize" in log_out
    written = puts(log, f"{BUCKET}/tokens")[before:]
    assert sorted(written) == ["errors.jsonl", "manifest.json", "val/errors.jsonl", "val/manifest.json"]
