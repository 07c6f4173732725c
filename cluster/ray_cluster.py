"""Ray cluster launcher YAML (`ray up`) for tokenization on cloud VMs, AWS or GCP: a CPU head node and a fixed number
of GPU workers that install this repository; the YAML's header says how to submit the tokenize job and tear down. And
(`watch`) a script that submits the checkpoint watcher `eval.watch` to a Ray cluster as a job.

    python -m cluster.ray_cluster --provider aws --region us-west-2 --workers 4 [--dry-run] \\
        [-- --source wds --input s3://... --output ... (data_pipeline.tokenize arguments, for the submit line)]
    python -m cluster.ray_cluster --provider gcp --project-id my-project --image projects/.../family/... --workers 4
    python -m cluster.ray_cluster watch --address http://HEAD:8265 --gpus 1 [--dry-run] -- --run-dir /shared/runs/x \\
        --task shapes ...

Without --dry-run the YAML is written (runs/launch/<cluster-name>.yaml unless --out) and `ray up -y` starts it; the
watch script is written (runs/launch/<job-name>.sh) and run, which submits the job (from the repository root).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from cluster.launch import (
    RAY_DASHBOARD_PORT,
    RAY_GCS_PORT,
    REPO,
    LauncherParser,
    LaunchError,
    add_delivery_flags,
    comment,
    non_negative_int,
    out_path,
    positive_int,
    ray_job_submit,
    run_main,
    shell_line,
    tokenize_command,
    watch_args,
    yaml_file,
)

DEFAULTS = {  # provider: region, head instance, worker instance (one GPU each)
    "aws": ("us-west-2", "m5.2xlarge", "g5.2xlarge"),
    "gcp": ("us-central1", "n2-standard-8", "g2-standard-8"),
}
REMOTE_REPO = "~/bitdance"


def node_config(a: argparse.Namespace, instance: str, gpus: int) -> dict:
    if a.provider == "aws":
        cfg = {
            "InstanceType": instance,
            "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": a.disk_gb}}],
        }
        if a.image:
            cfg["ImageId"] = a.image
        return cfg
    disk = {"diskSizeGb": a.disk_gb, "sourceImage": a.image}
    cfg = {
        "machineType": instance,
        "disks": [{"boot": True, "autoDelete": True, "type": "PERSISTENT", "initializeParams": disk}],
    }
    if gpus:  # GPU VMs cannot live-migrate; Deep Learning VM images install the driver on request
        cfg["scheduling"] = [{"onHostMaintenance": "TERMINATE"}]
        cfg["metadata"] = {"items": [{"key": "install-nvidia-driver", "value": "True"}]}
    return cfg


def provider(a: argparse.Namespace) -> dict:
    region = a.region or DEFAULTS[a.provider][0]
    if a.provider == "aws":
        return {"type": "aws", "region": region, "cache_stopped_nodes": False}
    if not a.project_id:
        raise LaunchError("--provider gcp needs --project-id (the GCP project to create the VMs in)")
    if not a.image:
        raise LaunchError("--provider gcp needs --image (a GPU Deep Learning VM image, projects/<p>/global/images/...)")
    return {"type": "gcp", "region": region, "availability_zone": a.zone or f"{region}-a", "project_id": a.project_id}


def render(a: argparse.Namespace):
    if a.min_workers is not None and a.min_workers > a.workers:
        raise LaunchError(f"--min-workers {a.min_workers} exceeds --workers {a.workers}; lower it")
    entry = tokenize_command(a.tokenize_args) if a.tokenize_args else None
    _, head_type, worker_type = DEFAULTS[a.provider]
    prov = provider(a)
    auth = {"ssh_user": a.ssh_user}
    if a.ssh_private_key:
        auth["ssh_private_key"] = a.ssh_private_key
    doc = {
        "cluster_name": a.job_name,
        "max_workers": a.workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": prov,
        "auth": auth,
        "available_node_types": {
            "head": {
                "node_config": node_config(a, a.head_type or head_type, 0),
                "resources": {"CPU": a.head_cpus},
                "min_workers": 0,
                "max_workers": 0,
            },
            "gpu_worker": {
                "node_config": node_config(a, a.worker_type or worker_type, a.worker_gpus),
                "resources": {"CPU": a.worker_cpus, "GPU": a.worker_gpus},
                "min_workers": a.workers if a.min_workers is None else a.min_workers,
                "max_workers": a.workers,
            },
        },
        "head_node_type": "head",
        "file_mounts": {REMOTE_REPO: str(REPO)},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": ["**/.git", "**/.git/**", ".venv", "runs", "data"],
        "initialization_commands": [],
        "setup_commands": [f"cd {REMOTE_REPO} && python3 -m pip install -q -e '.[data]'"],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [
            "ray stop",
            f"ulimit -n 65536; ray start --head --port={RAY_GCS_PORT} --object-manager-port=8076 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=0.0.0.0",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"ulimit -n 65536; ray start --address=$RAY_HEAD_IP:{RAY_GCS_PORT} --object-manager-port=8076",
        ],
    }
    path = out_path(a)
    submit = shlex.join(ray_job_submit(f"http://127.0.0.1:{RAY_DASHBOARD_PORT}", entry or ["<tokenize command>"]))
    header = [
        f"Ray cluster {a.job_name} on {a.provider}, 1 head + {a.workers} GPU worker(s); rendered by `{a.rendered_by}`",
        "Start it, forward its dashboard, submit the tokenize job from the repository root, tear it down:",
        f"  {shlex.join(['ray', 'up', '-y', path])}",
        f"  {shlex.join(['ray', 'dashboard', path])}  # keeps a tunnel to the head's port {RAY_DASHBOARD_PORT} open",
        f"  {submit}",
        f"  {shlex.join(['ray', 'down', '-y', path])}",
    ]
    return yaml_file(header, doc), ["ray", "up", "-y", path]


def render_watch(a: argparse.Namespace):
    """A script holding the `ray job submit` of eval.watch (torchrun over the job's GPUs when it has several)."""
    args = watch_args(a.watch_args)
    if a.gpus > 1:
        entry = ["torchrun", "--standalone", "--nproc-per-node", a.gpus, "-m", "eval.watch", *args]
    else:
        entry = ["python", "-m", "eval.watch", *args]
    options = ("--entrypoint-num-gpus", a.gpus, "--entrypoint-num-cpus", a.cpus, "--no-wait")
    submit = shell_line(ray_job_submit(a.address, entry, options))
    lines = [
        "#!/bin/bash",
        comment(f"BitDance checkpoint watcher as a Ray job ({a.gpus} GPU(s)); rendered by `{a.rendered_by}`"),
        "# The run folder must be on a filesystem the Ray node that runs the job mounts at the same path. Follow it",
        "# with `ray job logs -f <submission id>`; stop it with `ray job stop <submission id>`.",
        "set -euo pipefail",
        submit,
    ]
    return "\n".join(lines) + "\n", ["bash", out_path(a)]


def build_watch_parser() -> argparse.ArgumentParser:
    p = LauncherParser(prog="python -m cluster.ray_cluster watch", description=render_watch.__doc__)
    p.add_argument("--address", default=f"http://127.0.0.1:{RAY_DASHBOARD_PORT}", help="the Ray dashboard (job API)")
    p.add_argument("--gpus", type=non_negative_int, default=1, help="GPUs of the job (generation is split over them)")
    p.add_argument("--cpus", type=positive_int, default=8, help="CPUs of the job (export, scoring)")
    p.add_argument("watch_args", nargs="*", help="after --: the eval.watch arguments (--run-dir, --task, ...)")
    add_delivery_flags(p, "bitdance-watch", ".sh")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = LauncherParser(prog="python -m cluster.ray_cluster", description=__doc__.splitlines()[0])
    p.add_argument("--provider", choices=sorted(DEFAULTS), required=True)
    p.add_argument("--region", help="default: us-west-2 (aws), us-central1 (gcp)")
    p.add_argument("--zone", help="gcp availability zone (default <region>-a)")
    p.add_argument("--project-id", help="gcp project")
    p.add_argument("--workers", type=positive_int, default=2, help="GPU worker nodes")
    p.add_argument("--min-workers", type=non_negative_int, help="workers kept up when idle (default: --workers)")
    p.add_argument("--head-type", help="head instance / machine type (default m5.2xlarge, n2-standard-8)")
    p.add_argument("--worker-type", help="worker instance / machine type (default g5.2xlarge, g2-standard-8)")
    p.add_argument("--head-cpus", type=positive_int, default=8)
    p.add_argument("--worker-cpus", type=positive_int, default=8)
    p.add_argument("--worker-gpus", type=non_negative_int, default=1)
    p.add_argument("--disk-gb", type=positive_int, default=200, help="boot disk per node")
    p.add_argument("--image", help="AMI id (aws; default Ray's) or boot image (gcp, required)")
    p.add_argument("--ssh-user", default="ubuntu")
    p.add_argument("--ssh-private-key", help="default: Ray creates a key pair")
    p.add_argument("tokenize_args", nargs="*", help="after --: data_pipeline.tokenize arguments for the submit line")
    add_delivery_flags(p, "bitdance-tokenize", ".yaml", name_flag="--cluster-name")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["watch"]:  # the watcher's submit script; everything else is the `ray up` YAML
        return run_main(build_watch_parser(), argv[1:], render_watch)
    return run_main(build_parser(), argv, render)


if __name__ == "__main__":
    sys.exit(main())
