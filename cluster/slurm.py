"""SLURM launchers: sbatch scripts for multi-node training (one torchrun per node, preflight first), for Ray
tokenization (a Ray cluster started inside the allocation, one `ray job submit`, the cluster stopped at the end) and
for the checkpoint watcher (torchrun of `eval.watch` on nodes of its own).

    python -m cluster.slurm train --nodes 4 --gpus-per-node 8 --config training/configs/imagenet_B_16x.yaml \\
        --partition gpu --time 48:00:00 [--max-restarts 3 --env-file cluster/nccl.env] [--dry-run] -- overrides...
    python -m cluster.slurm tokenize --nodes 8 --gpus-per-node 8 [--dry-run] -- --source wds --input /data/tars ...
    python -m cluster.slurm watch --nodes 1 --gpus-per-node 8 [--dry-run] -- --run-dir runs/x --task geneval ...

Without --dry-run the script is written (runs/launch/<job-name>.sbatch unless --out) and `sbatch` submits it; submit
from the repository root (the job runs there). `wait-ray` is the tokenize script's own wait for its Ray nodes.
The values of the `#SBATCH` lines (--job-name, --partition, --time, --account) are single words without quotes,
backslashes, '#' or 'hetjob' (`sbatch_value`): sbatch, not the shell, reads those lines.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from cluster.launch import (
    DEFAULT_ENV_FILE,
    RAY_DASHBOARD_PORT,
    RAY_GCS_PORT,
    LauncherParser,
    LaunchError,
    Shell,
    add_delivery_flags,
    comment,
    non_negative_int,
    one_line,
    out_path,
    positive_float,
    positive_int,
    quote,
    ray_job_submit,
    read_env_file,
    run_main,
    shell_line,
    tokenize_command,
    torchrun,
    training_args,
    watch_args,
)

# head closes the pipe early: scontrol's SIGPIPE must not fail the script under pipefail
HEAD = [
    'HEAD=$(set +o pipefail; scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
    ': "${HEAD:?scontrol gave no host names for $SLURM_JOB_NODELIST}"',
]


def sbatch_value(text: str) -> str:
    """The argparse type of the values on `#SBATCH` lines. sbatch splits those lines at whitespace (a second word
    would be an option of its own), strips quotes and backslashes, ends them at '#' and takes a `hetjob` / `packjob`
    anywhere on them for a heterogeneous-job separator: a value holds none of these."""
    one_line(text)
    if found := re.search(r"[\s'\"\\#]|hetjob|packjob", text, flags=re.IGNORECASE):
        raise argparse.ArgumentTypeError(
            f"{text!r} holds {found[0]!r}, which sbatch reads specially on an #SBATCH line; give a value without "
            "whitespace, quotes, backslashes, '#', 'hetjob' or 'packjob'"
        )
    return text


def sbatch_header(a: argparse.Namespace, what: str) -> list[str]:
    lines = [
        "#!/bin/bash",
        comment(f"{what}; rendered by `{a.rendered_by}`"),
        f"#SBATCH --job-name={a.job_name}",
        f"#SBATCH --nodes={a.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if a.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={a.gpus_per_node}")
    lines += [f"#SBATCH --cpus-per-task={a.cpus_per_task}", "#SBATCH --exclusive"]
    lines += [f"#SBATCH --{flag}={value}" for flag in ("partition", "time", "account") if (value := getattr(a, flag))]
    return lines


def prologue(a: argparse.Namespace) -> list[str]:
    """Strict mode, the submit directory (the repository root), the user's setup lines and $HEAD, the first node."""
    setup = ["set +u  # setup lines (venv or module activation) may read unset variables", *a.setup, "set -u"]
    return ["set -euo pipefail", 'cd "$SLURM_SUBMIT_DIR"', *(setup if a.setup else []), *HEAD]


def srun(a: argparse.Namespace, *extra: str) -> list:
    # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): without it every task gets one CPU
    return ["srun", f"--cpus-per-task={a.cpus_per_task}", "--kill-on-bad-exit=1", *extra]


def render_train(a: argparse.Namespace):
    args, cfg = training_args(a.config, a.overrides, a.max_restarts)
    read_env_file(a.env_file)  # exists and is KEY=VALUE lines
    from training.checkpoint import checkpoint_root

    g = a.gpus_per_node
    node_run = srun(a, "--ntasks-per-node=1")
    rdzv = Shell(f"$HEAD:{a.port}")
    train = torchrun(Shell("$SLURM_NNODES"), g, rdzv, Shell("$SLURM_JOB_ID"), a.max_restarts, "training.train", args)
    resume = "the last checkpoint" if cfg.checkpoint.resume == "auto" else f"checkpoint.resume={cfg.checkpoint.resume}"
    restarts = [
        f"Restarts resume from {resume}: torchrun restarts every worker up to {a.max_restarts} time(s) after a",
        "failure, and a requeued or resubmitted job starts training.train again; with checkpoint.resume=auto (the",
        f"default) each start continues from {checkpoint_root(cfg.run_dir)}/latest. SIGTERM writes a checkpoint.",
    ]
    lines = [
        *sbatch_header(a, f"BitDance training, {a.nodes} node(s) x {g} GPU(s), config {a.config}"),
        "#",
        *map(comment, restarts),
        *prologue(a),
        f"set -a; source {quote(a.env_file)}; set +a  # NCCL and torch.distributed settings",
        'echo "$SLURM_NNODES node(s), rendezvous on $HEAD"',
    ]
    if not a.no_preflight:
        pre = ["--backend", "nccl", "--expect-gpus", g, "--shared-dir", cfg.run_dir, "--data", cfg.data.data_dir]
        if cfg.model.init_from:
            pre += ["--data", cfg.model.init_from]
        pre += ["--checkpoint-dir", checkpoint_root(cfg.run_dir), "--keep-last", cfg.checkpoint.keep_last]
        if a.checkpoint_gb:
            pre += ["--checkpoint-gb", a.checkpoint_gb]
        if a.min_allreduce_gbps:
            pre += ["--min-allreduce-gbps", a.min_allreduce_gbps]
        rdzv_pre = Shell(f"$HEAD:{a.port + 1}")
        preflight = torchrun(
            Shell("$SLURM_NNODES"), g, rdzv_pre, Shell("$SLURM_JOB_ID-preflight"), 0, "cluster.preflight", pre
        )
        lines += ["", "# preflight on every node (stops the job with one line naming the node and the check)"]
        lines.append(shell_line([*node_run, *preflight]))
    lines += ["", "# training: one torchrun per node, c10d rendezvous on the first node"]
    lines.append(shell_line([*node_run, *train]))
    return "\n".join(lines) + "\n", ["sbatch", out_path(a)]


def render_tokenize(a: argparse.Namespace):
    entry = tokenize_command(a.tokenize_args)
    gcs, dashboard = Shell(f"$HEAD:{RAY_GCS_PORT}"), Shell(f"http://$HEAD:{RAY_DASHBOARD_PORT}")
    head = [
        *srun(a, "--nodes=1", "--ntasks=1", "-w", Shell("$HEAD")),
        *("ray", "start", "--head", f"--port={RAY_GCS_PORT}", f"--dashboard-host={a.dashboard_host}"),
        *(f"--dashboard-port={RAY_DASHBOARD_PORT}", f"--num-cpus={a.cpus_per_task}", "--block"),
    ]
    workers = [
        *srun(a, Shell("--nodes=$WORKERS"), Shell("--ntasks=$WORKERS"), "--ntasks-per-node=1", "-x", Shell("$HEAD")),
        *("ray", "start", "--address", gcs, f"--num-cpus={a.cpus_per_task}", "--block"),
    ]
    wait = ["python", "-m", "cluster.slurm", "wait-ray", "--address", gcs, "--nodes", a.nodes]
    wait += ["--timeout", a.ray_timeout]
    lines = [
        *sbatch_header(a, f"BitDance Ray tokenization on {a.nodes} node(s)"),
        *prologue(a),
        "# token authentication with a token of this job only (srun passes the environment to every step); without",
        "# it, a ~/.ray/auth_token turns authentication on in the head but not in `ray status` / `ray job submit`",
        "export RAY_AUTH_MODE=token",
        "RAY_AUTH_TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n')",
        "export RAY_AUTH_TOKEN",
        "RAY_STEPS=()",
        "stop_ray() {  # stops the Ray cluster this job started: its srun steps (srun forwards SIGTERM to them)",
        '    if ((${#RAY_STEPS[@]})); then kill -TERM "${RAY_STEPS[@]}" 2>/dev/null || true; wait || true; fi',
        "}",
        "trap stop_ray EXIT",
        "",
        "# the Ray head on the first node",
        shell_line(head) + " &",
        "RAY_STEPS+=($!)",
        f"deadline=$((SECONDS + {a.ray_timeout}))",
        f"until ray status --address {quote(gcs)} >/dev/null 2>&1; do  # poll the head, up to --ray-timeout",
        '    if ((SECONDS >= deadline)); then echo "the Ray head on $HEAD did not answer within '
        f'{a.ray_timeout} s" >&2; exit 1; fi',
        "    sleep 5",
        "done",
        "",
        "# one Ray worker on every other node, then wait until all nodes have joined",
        "WORKERS=$((SLURM_NNODES - 1))",
        "if ((WORKERS > 0)); then",
        "    " + shell_line(workers, indent="        ") + " &",
        "    RAY_STEPS+=($!)",
        "fi",
        shell_line(wait),
        "",
        "# the tokenize job (its driver runs on the head; the repository is its working dir)",
        shell_line(ray_job_submit(dashboard, entry)),
    ]
    return "\n".join(lines) + "\n", ["sbatch", out_path(a)]


def render_watch(a: argparse.Namespace):
    args = watch_args(a.watch_args)
    read_env_file(a.env_file)
    g = a.gpus_per_node
    rdzv = Shell(f"$HEAD:{a.port}")
    watcher = torchrun(Shell("$SLURM_NNODES"), g, rdzv, Shell("$SLURM_JOB_ID"), a.max_restarts, "eval.watch", args)
    lines = [
        *sbatch_header(a, f"BitDance checkpoint watcher, {a.nodes} node(s) x {g} GPU(s)"),
        "#",
        "# Samples and scores every new checkpoint of the run on nodes of its own: it needs only the shared",
        "# filesystem that holds the run folder. Submit it once the run has saved its first checkpoint; a restart",
        "# (torchrun's, or a resubmitted job) goes on where it stopped and evaluates no checkpoint twice.",
        *prologue(a),
        f"set -a; source {quote(a.env_file)}; set +a  # NCCL and torch.distributed settings",
        'echo "watcher on $SLURM_NNODES node(s), rendezvous on $HEAD"',
        "",
        "# export on the first rank, generation over every rank, scores and logging on the first",
        shell_line([*srun(a, "--ntasks-per-node=1"), *watcher]),
    ]
    return "\n".join(lines) + "\n", ["sbatch", out_path(a)]


def wait_ray(a: argparse.Namespace, alive=None, clock=time.monotonic, sleep=time.sleep, poll_s: float = 5.0):
    """Wait until `--nodes` Ray nodes are alive at `--address`, polling until `--timeout` seconds have passed."""
    if alive is None:
        import ray

        ray.init(address=a.address, log_to_driver=False)
        alive = lambda: sum(1 for node in ray.nodes() if node["Alive"])  # noqa: E731
    deadline = clock() + a.timeout
    while (n := alive()) < a.nodes:
        if clock() >= deadline:
            raise LaunchError(
                f"{n} of {a.nodes} Ray nodes joined {a.address} within {a.timeout} s; see the worker steps' output"
            )
        sleep(poll_s)
    print(f"{n} Ray node(s) alive at {a.address}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = LauncherParser(prog="python -m cluster.slurm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=LauncherParser)

    shape = LauncherParser(add_help=False)
    shape.add_argument("--nodes", type=positive_int, required=True)
    shape.add_argument("--partition", type=sbatch_value)
    shape.add_argument("--time", type=sbatch_value, help="SLURM time limit, e.g. 48:00:00")
    shape.add_argument("--account", type=sbatch_value)
    shape.add_argument(
        "--setup",
        action="append",
        default=[],
        help="a shell line run before launching (repeatable), e.g. 'source .venv/bin/activate'",
    )

    t = sub.add_parser("train", parents=[shape], help="multi-node training.train under torchrun")
    t.add_argument("--gpus-per-node", type=positive_int, default=8)
    t.add_argument("--cpus-per-task", type=positive_int, default=64, help="CPUs per node for torchrun and its workers")
    t.add_argument("--config", required=True, help="training YAML (training/configs/)")
    t.add_argument("--max-restarts", type=non_negative_int, default=3, help="torchrun worker restarts")
    t.add_argument("--env-file", default=DEFAULT_ENV_FILE, help="NCCL / torch.distributed settings, sourced")
    t.add_argument("--port", type=positive_int, default=29500, help="rendezvous port (preflight uses port + 1)")
    t.add_argument("--checkpoint-gb", type=positive_float, help="size of one checkpoint, for the disk-space check")
    t.add_argument("--min-allreduce-gbps", type=positive_float, help="preflight's all-reduce bus-bandwidth floor, GB/s")
    t.add_argument("--no-preflight", action="store_true", help="skip cluster.preflight before training")
    t.add_argument("overrides", nargs="*", help="after --: dotted config overrides, e.g. data.data_dir=/data/x")
    add_delivery_flags(t, "bitdance-train", ".sbatch", name_type=sbatch_value)
    t.set_defaults(render=render_train)

    k = sub.add_parser("tokenize", parents=[shape], help="a Ray cluster in the allocation + data_pipeline.tokenize")
    k.add_argument("--gpus-per-node", type=non_negative_int, default=0, help="GPUs per node for the encoder actors")
    k.add_argument("--cpus-per-task", type=positive_int, default=32, help="CPUs per node given to Ray")
    k.add_argument("--dashboard-host", default="0.0.0.0", help="where the head's dashboard (job API) listens")
    k.add_argument("--ray-timeout", type=positive_int, default=300, help="seconds to wait for the Ray nodes")
    k.add_argument("tokenize_args", nargs="*", help="after --: the data_pipeline.tokenize arguments")
    add_delivery_flags(k, "bitdance-tokenize", ".sbatch", name_type=sbatch_value)
    k.set_defaults(render=render_tokenize)

    v = sub.add_parser("watch", parents=[shape], help="eval.watch under torchrun on nodes of its own")
    v.add_argument("--gpus-per-node", type=positive_int, default=1, help="GPUs per node for generation")
    v.add_argument("--cpus-per-task", type=positive_int, default=16, help="CPUs per node (export, scoring)")
    v.add_argument("--max-restarts", type=non_negative_int, default=3, help="torchrun restarts (the watcher resumes)")
    v.add_argument("--env-file", default=DEFAULT_ENV_FILE, help="NCCL / torch.distributed settings, sourced")
    v.add_argument("--port", type=positive_int, default=29500, help="rendezvous port")
    v.add_argument("watch_args", nargs="*", help="after --: the eval.watch arguments (--run-dir, --task, ...)")
    add_delivery_flags(v, "bitdance-watch", ".sbatch", name_type=sbatch_value)
    v.set_defaults(render=render_watch)

    w = sub.add_parser("wait-ray", help="(used by the tokenize script) wait for the Ray nodes to join")
    w.add_argument("--address", required=True, help="GCS address, HOST:6379")
    w.add_argument("--nodes", type=positive_int, required=True)
    w.add_argument("--timeout", type=positive_int, default=300)
    w.set_defaults(render=wait_ray)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), argv, lambda a: a.render(a))


if __name__ == "__main__":
    sys.exit(main())
