"""The cluster launchers' dry runs (cluster.slurm, cluster.k8s, cluster.ray_cluster) hold commands their programs
accept: each torchrun line goes through torch's own parser and its training arguments through training.config's
loader, each `ray` line through Ray's own click commands, each tokenize line through data_pipeline.tokenize's parser;
sbatch scripts pass `bash -n`, the manifests carry their resources' required fields, the `ray up` YAML passes Ray's
own schema. Bad input is one line; without --dry-run the file is written and handed to the submit tool."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers.cli import check_arguments

from cluster import k8s, ray_cluster, slurm
from cluster.launch import Shell, joined_lines, read_env_file, shell_line

REPO = Path(__file__).resolve().parents[2]
CONFIG = "training/configs/imagenet_B_16x.yaml"
TOKENIZE = [
    "--source",
    "wds",
    "--input",
    "/data/tars",
    "--output",
    "/data/tokens p16",  # a space: quoting must survive every rendering
    "--tokenizer",
    "/models/ae",
    "--text-tokenizer",
    "/models/qwen",
    "--parallel-num",
    "16",
    "--size=512x512",
]
SLURM_ENV = {"HEAD": "gpu-01", "SLURM_NNODES": "4", "SLURM_JOB_ID": "4242", "WORKERS": "3"}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the launchers resolve configs and the env file from the repository root


def with_flags(argv: list[str], *flags: str) -> list[str]:
    """argv with launcher flags added before the `--` that starts the launched program's arguments."""
    cut = argv.index("--") if "--" in argv else len(argv)
    return [*argv[:cut], *flags, *argv[cut:]]


def dry_run(module, argv: list[str], capsys) -> str:
    assert module.main(with_flags(argv, "--dry-run")) == 0
    return capsys.readouterr().out


def expand(line: str, env: dict[str, str]) -> list[str]:
    """The words bash makes of a rendered command line, with `env` set (no command runs)."""
    r = subprocess.run(
        ["bash", "-c", "printf '%s\\0' " + line], env={"PATH": os.environ["PATH"], **env}, capture_output=True
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().split("\0")[:-1]


def the_line(text: str, needle: str) -> str:
    found = [line for line in joined_lines(text) if needle in line and not line.lstrip().startswith("#")]
    assert len(found) == 1, f"{needle!r} in {found}"
    return found[0].strip().removesuffix("&").strip()


def torchrun_args(argv: list[str]):
    """torch's own parser on the torchrun part of argv (as tests/test_readme.py does)."""
    from torch.distributed.run import get_args_parser

    argv = argv[argv.index("torchrun") :]
    m = argv.index("-m")
    return get_args_parser().parse_args([*argv[1:m], "--module", argv[m + 1], *argv[m + 2 :]])


def training_config(args: list[str], monkeypatch):
    from training.config import load_config

    ns = check_arguments("training.train", args, monkeypatch)
    return load_config(ns.config, ns.overrides)


def tokenize_config(words: list[str]):
    from data_pipeline.tokenize import parse_args

    assert words[:3] == ["python", "-m", "data_pipeline.tokenize"], words
    return parse_args(words[3:])


def ray_submit(words: list[str]):
    """Ray's own `ray job submit` click command on the words after `ray job submit` (parsed, not run)."""
    from ray.dashboard.modules.job.cli import submit

    assert words[:3] == ["ray", "job", "submit"], words
    return submit.make_context("submit", words[3:]).params


# ---------------------------------------------------------------- SLURM


def test_slurm_train_script_runs_preflight_then_one_torchrun_per_node(capsys, monkeypatch, tmp_path):
    argv = ["train", "--nodes", "4", "--gpus-per-node", "8", "--config", CONFIG, "--partition", "gpu"]
    argv += ["--time", "48:00:00", "--account", "proj", "--max-restarts", "2", "--checkpoint-gb", "12"]
    argv += ["--min-allreduce-gbps", "80", "--", "data.data_dir=/data/in256 tokens", "optim.lr=3e-4"]
    text = dry_run(slurm, argv, capsys)
    script = tmp_path / "train.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=bitdance-train",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=64",
        "#SBATCH --exclusive",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=48:00:00",
        "#SBATCH --account=proj",
    ]
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in text
    assert "set -a; source cluster/nccl.env; set +a" in text
    assert "resume from the last checkpoint" in text and "runs/imagenet_B_16x/checkpoints/latest" in text
    assert text.splitlines()[-1] == "# then: sbatch runs/launch/bitdance-train.sbatch"

    train = expand(the_line(text, "-m training.train"), SLURM_ENV)
    assert train[: train.index("torchrun")] == [
        "srun",
        "--cpus-per-task=64",
        "--kill-on-bad-exit=1",
        "--ntasks-per-node=1",
    ]
    run = torchrun_args(train)
    assert (run.nnodes, run.nproc_per_node, run.rdzv_backend) == ("4", "8", "c10d")
    assert (run.rdzv_endpoint, run.rdzv_id, run.max_restarts) == ("gpu-01:29500", "4242", 2)
    assert run.module and run.training_script == "training.train"
    cfg = training_config(run.training_script_args, monkeypatch)
    assert cfg.data.data_dir == "/data/in256 tokens" and cfg.optim.lr == 3e-4 and cfg.checkpoint.resume == "auto"

    pre_words = expand(the_line(text, "-m cluster.preflight"), SLURM_ENV)
    assert "--ntasks-per-node=1" in pre_words[: pre_words.index("torchrun")]
    pre = torchrun_args(pre_words)
    assert (pre.nnodes, pre.nproc_per_node, pre.rdzv_endpoint) == ("4", "8", "gpu-01:29501")
    assert pre.training_script == "cluster.preflight" and pre.max_restarts == 0
    ns = check_arguments("cluster.preflight", pre.training_script_args, monkeypatch)
    assert (ns.backend, ns.expect_gpus, ns.keep_last, ns.checkpoint_gb) == ("nccl", 8, 3, 12.0)
    assert ns.data == ["/data/in256 tokens"] and ns.checkpoint_dir == "runs/imagenet_B_16x/checkpoints"
    assert ns.shared_dir == "runs/imagenet_B_16x" and ns.min_allreduce_gbps == 80.0
    assert text.index("-m cluster.preflight") < text.index("-m training.train")


def test_slurm_tokenize_script_starts_waits_submits_and_stops_its_ray_cluster(capsys, monkeypatch, tmp_path):
    from ray.scripts.scripts import start, status

    text = dry_run(slurm, ["tokenize", "--nodes", "4", "--gpus-per-node", "8", "--", *TOKENIZE], capsys)
    script = tmp_path / "tokenize.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --nodes=4" in text and "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --exclusive" in text

    head = expand(the_line(text, "ray start --head"), SLURM_ENV)
    assert head[:6] == ["srun", "--cpus-per-task=32", "--kill-on-bad-exit=1", "--nodes=1", "--ntasks=1", "-w"]
    assert head[6] == "gpu-01" and the_line(text, "ray start --head") + " &" in joined_lines(text)
    params = start.make_context("start", head[head.index("start") + 1 :]).params  # Ray's own `ray start`
    assert params["head"] and params["block"] and params["port"] == 6379 and params["dashboard_host"] == "0.0.0.0"

    poll = the_line(text, "ray status")
    words = expand(poll.removeprefix("until ").split(">")[0], SLURM_ENV)
    assert status.make_context("status", words[2:]).params["address"] == "gpu-01:6379"
    assert "deadline=$((SECONDS + 300))" in text and "((SECONDS >= deadline))" in text

    worker = expand(the_line(text, "ray start --address"), SLURM_ENV)
    assert worker[:7] == [
        "srun",
        "--cpus-per-task=32",
        "--kill-on-bad-exit=1",
        "--nodes=3",
        "--ntasks=3",
        "--ntasks-per-node=1",
        "-x",
    ]
    params = start.make_context("start", worker[worker.index("start") + 1 :]).params
    assert params["address"] == "gpu-01:6379" and params["block"] and not params["head"]

    wait = expand(the_line(text, "wait-ray"), SLURM_ENV)
    ns = check_arguments("cluster.slurm", wait[3:], monkeypatch)
    assert (ns.address, ns.nodes, ns.timeout) == ("gpu-01:6379", 4, 300)

    job = ray_submit(expand(the_line(text, "ray job submit"), SLURM_ENV))
    assert job["address"] == "http://gpu-01:8265" and job["working_dir"] == "."
    cfg = tokenize_config(list(job["entrypoint"]))
    assert cfg.output == "/data/tokens p16" and cfg.parallel_num == 16 and cfg.sizes == [(512, 512)]

    commands = [line.strip() for line in joined_lines(text) if not line.lstrip().startswith("#")]
    steps = ("ray start --head", "ray status", "ray start --address", "wait-ray", "ray job submit")
    order = [next(i for i, line in enumerate(commands) if step in line) for step in steps]
    assert order == sorted(order)
    assert "trap stop_ray EXIT" in text and 'kill -TERM "${RAY_STEPS[@]}"' in text
    # a token of this job only, exported before any Ray command (srun steps inherit it)
    token = [line for line in text.splitlines() if line.startswith(("export RAY_AUTH", "RAY_AUTH_TOKEN="))]
    assert token[0] == "export RAY_AUTH_MODE=token" and commands.index(token[-1]) < order[0]
    r = subprocess.run(
        ["bash", "-c", "\n".join(["set -euo pipefail", *token[1:], 'echo "$RAY_AUTH_TOKEN"'])],
        capture_output=True,
        text=True,
    )
    assert re.fullmatch(r"[0-9a-f]{64}\n", r.stdout), r.stdout + r.stderr
    assert text.count("RAY_STEPS+=($!)") == 2


def test_head_node_is_the_first_host_name_under_pipefail(tmp_path):
    """`head -n1` closes the pipe before scontrol has written a long node list; the script must not die of the
    SIGPIPE (pipefail), and an empty list stops it with one line."""
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/bash\nfor i in $(seq -w 1 20000); do echo "gpu-$i"; done\n')
    fake.chmod(0o755)
    lines = "\n".join(["set -euo pipefail", *slurm.HEAD, 'echo "head=$HEAD"'])
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[00001-20000]"}
    r = subprocess.run(["bash", "-c", lines], env=env, capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, "head=gpu-00001\n"), r.stderr
    fake.write_text("#!/bin/bash\nexit 1\n")
    r = subprocess.run(["bash", "-c", lines], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "scontrol gave no host names for gpu-[00001-20000]" in r.stderr


def test_wait_ray_polls_until_every_node_joined_or_the_deadline(capsys):
    import argparse

    from cluster.launch import LaunchError

    now, naps = [0.0], []

    def sleep(s):
        naps.append(s)
        now[0] += s

    counts = iter([1, 2, 4])
    a = argparse.Namespace(address="h:6379", nodes=4, timeout=60)
    slurm.wait_ray(a, alive=lambda: next(counts), clock=lambda: now[0], sleep=sleep)
    assert naps == [5.0, 5.0] and "4 Ray node(s) alive" in capsys.readouterr().out

    now[0], naps[:] = 0.0, []
    with pytest.raises(LaunchError, match=r"^2 of 4 Ray nodes joined h:6379 within 60 s"):
        slurm.wait_ray(a, alive=lambda: 2, clock=lambda: now[0], sleep=sleep)
    assert sum(naps) == 60.0


# ---------------------------------------------------------------- Kubernetes


def test_k8s_pytorchjob_runs_torchrun_of_training_in_pytorch_containers(capsys, monkeypatch):
    argv = ["train", "--image", "reg.io/bitdance:1", "--nodes", "3", "--gpus-per-node", "8", "--config", CONFIG]
    argv += ["--namespace", "ml", "--pvc", "bd-data:/data", "--pvc", "bd-ckpt:/ckpt", "--max-restarts", "1"]
    argv += ["--", "data.data_dir=/data/in256", "run_dir=/ckpt/b16"]
    doc = yaml.safe_load(dry_run(k8s, argv, capsys))
    assert (doc["apiVersion"], doc["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert doc["metadata"] == {
        "name": "bitdance-train",
        "namespace": "ml",
        "labels": {"app.kubernetes.io/part-of": "bitdance"},
    }
    spec = doc["spec"]
    assert spec["nprocPerNode"] == "8"
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    nccl = read_env_file("cluster/nccl.env")
    for kind in ("Master", "Worker"):
        assert replicas[kind]["restartPolicy"] == "OnFailure"
        pod = replicas[kind]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch" and c["image"] == "reg.io/bitdance:1"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/dev/shm", "/data", "/ckpt"}
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        mounted = {m["mountPath"]: claims.get(m["name"]) for m in c["volumeMounts"]}
        assert mounted["/data"] == "bd-data" and mounted["/ckpt"] == "bd-ckpt"
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["PYTHONPATH"] == "/workspace/bitdance" and nccl.items() <= env.items()
        # Kubernetes expands $(VAR) from the env the training operator sets
        command = [
            re.sub(
                r"\$\((\w+)\)", lambda m: {"MASTER_ADDR": "bitdance-train-master-0", "MASTER_PORT": "23456"}[m[1]], w
            )
            for w in c["command"]
        ]
        run = torchrun_args(command)
        assert (run.nnodes, run.nproc_per_node, run.rdzv_backend) == ("3", "8", "c10d")
        assert (run.rdzv_endpoint, run.max_restarts, run.training_script) == (
            "bitdance-train-master-0:23456",
            1,
            "training.train",
        )
        cfg = training_config(run.training_script_args, monkeypatch)
        assert cfg.data.data_dir == "/data/in256" and cfg.run_dir == "/ckpt/b16"


def test_k8s_rayjob_has_the_tokenize_entrypoint_and_a_ray_cluster(capsys):
    argv = ["tokenize", "--image", "reg.io/bitdance:1", "--workers", "3", "--gpus-per-worker", "2"]
    argv += ["--pvc", "bd-data:/data", "--job-name", "tok-p16", "--", *TOKENIZE]
    doc = yaml.safe_load(dry_run(k8s, argv, capsys))
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == ("ray.io/v1", "RayJob", "tok-p16")
    spec = doc["spec"]
    cfg = tokenize_config(shlex.split(spec["entrypoint"]))
    assert cfg.output == "/data/tokens p16" and cfg.source == "wds"
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert head["image"] == "reg.io/bitdance:1" and {p["containerPort"] for p in head["ports"]} >= {6379, 8265}
    assert all(isinstance(v, str) for v in cluster["headGroupSpec"]["rayStartParams"].values())
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert {m["mountPath"] for m in worker["volumeMounts"]} == {"/dev/shm", "/data"}


# ---------------------------------------------------------------- Ray cluster launcher


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize(
    "provider", [["aws"], ["gcp", "--project-id", "my-proj", "--image", "projects/p/global/images/family/dl-gpu"]]
)
def test_ray_up_yaml_passes_rays_schema_and_names_a_submit_line(provider, capsys):
    argv = ["--provider", *provider, "--workers", "3", "--worker-gpus", "1", "--", *TOKENIZE]
    text = dry_run(ray_cluster, argv, capsys)
    doc = yaml.safe_load(text)
    jsonschema.validate(doc, ray_schema())
    assert doc["provider"]["type"] == provider[0] and doc["max_workers"] == 3
    nodes = doc["available_node_types"]
    assert nodes[doc["head_node_type"]]["max_workers"] == 0
    assert nodes["gpu_worker"]["min_workers"] == nodes["gpu_worker"]["max_workers"] == 3
    assert nodes["gpu_worker"]["resources"]["GPU"] == 1
    assert doc["head_start_ray_commands"] and doc["worker_start_ray_commands"] and doc["setup_commands"]
    submit = [line.removeprefix("#").strip() for line in text.splitlines() if "ray job submit" in line]
    (words,) = [shlex.split(line) for line in submit]
    job = ray_submit(words)
    assert job["address"] == "http://127.0.0.1:8265"
    assert tokenize_config(list(job["entrypoint"])).output == "/data/tokens p16"
    assert text.splitlines()[-1] == "# then: ray up -y runs/launch/bitdance-tokenize.yaml"


# ---------------------------------------------------------------- errors and submission


BAD = [
    (slurm, ["train", "--nodes", "0", "--config", CONFIG], "argument --nodes: must be >= 1, got 0"),
    (
        slurm,
        ["train", "--nodes", "2", "--config", "training/configs/nope.yaml"],
        "config file training/configs/nope.yaml does not exist",
    ),
    (slurm, ["train", "--nodes", "2", "--config", CONFIG, "--", "optim.nope=1"], "invalid config"),
    (slurm, ["train", "--nodes", "2", "--config", CONFIG, "--", "checkpoint.resume=none"], "would restart from step 0"),
    (
        slurm,
        ["train", "--nodes", "2", "--config", CONFIG, "--env-file", "nope.env"],
        "env file nope.env does not exist",
    ),
    (slurm, ["tokenize", "--nodes", "2", "--", "--input", "/x"], "data_pipeline.tokenize arguments rejected"),
    (slurm, ["tokenize", "--nodes", "2"], "no tokenize arguments"),
    (
        k8s,
        ["train", "--image", "i", "--nodes", "1", "--config", CONFIG, "--pvc", "data"],
        "must look like CLAIM:/mount/path",
    ),
    (k8s, ["tokenize", "--image", "i", "--job-name", "Bad_Name", "--", *TOKENIZE], "must be lower-case letters"),
    (ray_cluster, ["--provider", "gcp", "--image", "x"], "--provider gcp needs --project-id"),
    (ray_cluster, ["--provider", "aws", "--workers", "2", "--min-workers", "3"], "--min-workers 3 exceeds --workers 2"),
]


@pytest.mark.parametrize("module,argv,message", BAD, ids=[" ".join(b[1][:4]) for b in BAD])
def test_bad_input_is_one_line_naming_the_problem(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(with_flags(argv, "--dry-run"))
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith(f"python -m {module.__name__}"), lines


@pytest.mark.parametrize(
    "module,argv,tool",
    [
        (slurm, ["train", "--nodes", "2", "--config", CONFIG], ["sbatch"]),
        (k8s, ["tokenize", "--image", "i", "--", *TOKENIZE], ["kubectl", "apply", "-f"]),
        (ray_cluster, ["--provider", "aws", "--", *TOKENIZE], ["ray", "up", "-y"]),
    ],
)
def test_without_dry_run_the_file_is_written_and_submitted(module, argv, tool, tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / tool[0]
    fake.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/called\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "job" / "file"
    expected = dry_run(module, with_flags(argv, "--out", str(out)), capsys).splitlines()
    assert expected[-1] == f"# then: {shlex.join([*tool, str(out)])}"
    assert module.main(with_flags(argv, "--out", str(out))) == 0
    written = out.read_text().splitlines()
    unrendered = lambda lines: [line for line in lines if "rendered by" not in line]  # noqa: E731 (holds --dry-run)
    assert unrendered(written) == unrendered(expected[:-1])
    assert (tmp_path / "called").read_text().splitlines() == [*tool[1:], str(out)]
    assert f"wrote {out}; running {shlex.join([*tool, str(out)])}" in capsys.readouterr().out


# ---------------------------------------------------------------- shared pieces


def test_rendered_lines_expand_back_to_the_same_words():
    words = ["run", "it's", "two words", "$HOME-literal", "a;b", Shell("$HEAD:29500"), Shell("--n=$N"), "x" * 130]
    line = shell_line(words, width=40)
    assert len(line.splitlines()) > 2
    (joined,) = joined_lines(line)
    assert expand(joined, {"HEAD": "gpu-07", "N": "3"}) == [*words[:5], "gpu-07:29500", "--n=3", "x" * 130]


def test_nccl_env_file_holds_real_variable_names_and_sources_like_it_reads():
    import torch

    text = (REPO / "cluster" / "nccl.env").read_text()
    names = set(re.findall(r"^#? ?((?:NCCL|TORCH_NCCL)_[A-Z_]+)=", text, flags=re.M))
    torch_sources = " ".join(
        p.read_text(errors="ignore")
        for p in (Path(torch.__file__).parent / "include").rglob("*.h*")
        if "c10d" in str(p)
    )
    unknown = {n for n in names if n.startswith("TORCH_") and n not in torch_sources}
    assert not unknown, f"not torch variables: {unknown}"
    assert {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "TORCH_NCCL_ASYNC_ERROR_HANDLING"} <= names
    r = subprocess.run(
        ["bash", "-c", "set -a; source cluster/nccl.env; set +a; env -0"], cwd=REPO, env={}, capture_output=True
    )
    sourced = dict(item.split("=", 1) for item in r.stdout.decode().split("\0") if "=" in item)
    active = read_env_file(REPO / "cluster" / "nccl.env")
    assert active == {
        "NCCL_DEBUG": "WARN",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # the flight recorder
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # read by torch's elastic rendezvous (a Python module)
    }
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" in Path(dynamic_rendezvous.__file__).read_text()
    assert {k: sourced.get(k) for k in names} == {k: active.get(k) for k in names}


# ---------------------------------------------------------------- the checkpoint watcher (eval.watch)

WATCH = ["--run-dir", "/ckpt/runs/b16 x", "--task", "shapes", "--per-tag", "2", "--interval", "30"]


def watch_config(args: list[str], monkeypatch):
    ns = check_arguments("eval.watch", args, monkeypatch)  # eval.watch's own parser
    assert (ns.run_dir, ns.task, ns.per_tag, ns.interval) == ("/ckpt/runs/b16 x", "shapes", 2, 30.0), ns
    return ns


def test_slurm_watch_script_runs_torchrun_of_eval_watch_on_nodes_of_its_own(capsys, monkeypatch, tmp_path):
    argv = ["watch", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--max-restarts", "5"]
    text = dry_run(slurm, [*argv, "--", *WATCH], capsys)
    script = tmp_path / "watch.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert sbatch[:5] == [
        "#SBATCH --job-name=bitdance-watch",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=16",
    ]
    assert "#SBATCH --partition=gpu" in sbatch and "set -a; source cluster/nccl.env; set +a" in text
    words = expand(the_line(text, "-m eval.watch"), SLURM_ENV)
    assert words[: words.index("torchrun")] == [
        "srun",
        "--cpus-per-task=16",
        "--kill-on-bad-exit=1",
        "--ntasks-per-node=1",
    ]
    run = torchrun_args(words)
    assert (run.nnodes, run.nproc_per_node, run.rdzv_endpoint, run.max_restarts) == ("4", "4", "gpu-01:29500", 5)
    assert run.module and run.training_script == "eval.watch"
    watch_config(run.training_script_args, monkeypatch)
    assert text.splitlines()[-1] == "# then: sbatch runs/launch/bitdance-watch.sbatch"


def test_k8s_watch_is_a_job_running_torchrun_of_eval_watch_in_one_pod(capsys, monkeypatch):
    argv = ["watch", "--image", "reg.io/bitdance:1", "--gpus", "2", "--memory", "200Gi", "--pvc", "bd-ckpt:/ckpt"]
    doc = yaml.safe_load(dry_run(k8s, [*argv, "--namespace", "ml", "--", *WATCH], capsys))
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == ("batch/v1", "Job", "bitdance-watch")
    assert doc["metadata"]["namespace"] == "ml" and doc["spec"]["backoffLimit"] == 3
    pod = doc["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    (c,) = pod["containers"]
    assert c["image"] == "reg.io/bitdance:1" and c["workingDir"] == "/workspace/bitdance"
    assert c["resources"]["limits"] == {"memory": "200Gi", "nvidia.com/gpu": 2}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/dev/shm", "/ckpt"}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    assert {m["mountPath"]: claims.get(m["name"]) for m in c["volumeMounts"]}["/ckpt"] == "bd-ckpt"
    assert read_env_file("cluster/nccl.env").items() <= {e["name"]: e["value"] for e in c["env"]}.items()
    run = torchrun_args(c["command"])
    assert (run.nnodes, run.nproc_per_node, run.training_script) == ("1", "2", "eval.watch")
    watch_config(run.training_script_args, monkeypatch)


@pytest.mark.parametrize("gpus", [1, 2])
def test_ray_watch_script_submits_eval_watch_as_a_ray_job(gpus, capsys, monkeypatch, tmp_path):
    argv = ["watch", "--address", "http://head:8265", "--gpus", str(gpus), "--", *WATCH]
    text = dry_run(ray_cluster, argv, capsys)
    script = tmp_path / "watch.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    job = ray_submit(expand(the_line(text, "ray job submit"), {}))
    assert job["address"] == "http://head:8265" and job["working_dir"] == "." and job["no_wait"]
    assert (job["entrypoint_num_gpus"], job["entrypoint_num_cpus"]) == (gpus, 8)
    entry = list(job["entrypoint"])
    if gpus == 1:
        assert entry[:3] == ["python", "-m", "eval.watch"]
        watch_config(entry[3:], monkeypatch)
    else:
        run = torchrun_args(entry)
        assert run.standalone and run.nproc_per_node == "2" and run.training_script == "eval.watch"
        watch_config(run.training_script_args, monkeypatch)
    assert text.splitlines()[-1] == "# then: bash runs/launch/bitdance-watch.sh"


BAD_WATCH = [
    (slurm, ["watch", "--nodes", "1"], "no eval.watch arguments; pass them after `--`"),
    (slurm, ["watch", "--nodes", "1", "--gpus-per-node", "0", "--", *WATCH], "--gpus-per-node: must be >= 1, got 0"),
    (k8s, ["watch", "--image", "i", "--", "--run-dir", "r", "--task", "nope"], "argument --task: invalid choice"),
    (k8s, ["watch", "--image", "i", "--job-name", "Watch", "--", *WATCH], "must be lower-case letters"),
    (ray_cluster, ["watch", "--", "--run-dir", "r", "--task", "prompts"], "--task prompts has no scorer"),
    (ray_cluster, ["watch", "--", *WATCH, "--geneval-repo", "/g"], "--geneval-repo goes with --task geneval"),
    (slurm, ["watch", "--nodes", "1", "--", "--task", "shapes"], "the following arguments are required: --run-dir"),
]


@pytest.mark.parametrize("module,argv,message", BAD_WATCH, ids=[" ".join(b[1][:4]) for b in BAD_WATCH])
def test_bad_watch_input_is_one_line_naming_the_problem(module, argv, message, capsys):
    test_bad_input_is_one_line_naming_the_problem(module, argv, message, capsys)
