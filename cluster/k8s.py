"""Kubernetes launchers: a KubeRay `RayJob` (a Ray cluster that runs `data_pipeline.tokenize` and shuts down), a
Kubeflow `PyTorchJob` (one pod per node, each running torchrun of `training.train`) and a batch `Job` (one pod running
torchrun of `eval.watch` beside a run), rendered as YAML.

    python -m cluster.k8s tokenize --image REGISTRY/bitdance:TAG --workers 4 --gpus-per-worker 1 \\
        --pvc bitdance-data:/data [--dry-run] -- --source wds --input /data/tars --output /data/tokens ...
    python -m cluster.k8s train --image REGISTRY/bitdance:TAG --nodes 2 --gpus-per-node 8 \\
        --config training/configs/imagenet_B_16x.yaml --pvc bitdance-data:/data [--dry-run] -- overrides...
    python -m cluster.k8s watch --image REGISTRY/bitdance:TAG --gpus 1 --pvc bitdance-data:/data [--dry-run] \\
        -- --run-dir /data/runs/x --task shapes ...

The image holds the repository at --workdir (on PYTHONPATH in every container). Paths in the job's arguments are
paths inside the pods: put data, tokens and run dirs on the mounted PVCs. Without --dry-run the manifest is written
(runs/launch/<job-name>.yaml unless --out) and `kubectl apply -f` submits it. Kubernetes expands `$(NAME)` in a
container's command: each `$` of the job's arguments is written `$$`, so they reach the job as given.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from importlib.metadata import version

from cluster.launch import (
    DEFAULT_ENV_FILE,
    RAY_DASHBOARD_PORT,
    RAY_GCS_PORT,
    LauncherParser,
    LaunchError,
    add_delivery_flags,
    dns_name,
    non_negative_int,
    out_path,
    positive_int,
    read_env_file,
    run_main,
    tokenize_command,
    torchrun,
    training_args,
    watch_args,
    yaml_file,
)


def volumes(a: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(pod volumes, container mounts): the --pvc claims, and a memory-backed /dev/shm (data loader workers, NCCL)."""
    vols = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    for i, spec in enumerate(a.pvc):
        claim, _, path = spec.partition(":")
        if not claim or not path.startswith("/"):
            raise LaunchError(f"--pvc {spec!r} must look like CLAIM:/mount/path, e.g. bitdance-data:/data")
        vols.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"pvc-{i}", "mountPath": path})
    return vols, mounts


def container(a, name: str, mounts: list[dict], limits: dict, command: list | None = None, env=None) -> dict:
    c = {"name": name, "image": a.image, "workingDir": a.workdir}
    if command is not None:
        c["command"] = [str(w) for w in command]
    c["env"] = [{"name": "PYTHONPATH", "value": a.workdir}, *({"name": k, "value": v} for k, v in (env or {}).items())]
    c["resources"] = {"limits": limits, "requests": dict(limits)}
    c["volumeMounts"] = mounts
    return c


def limits(cpus: int | None, memory: str | None, gpus: int) -> dict:
    out = {}
    if cpus:
        out["cpu"] = str(cpus)
    if memory:
        out["memory"] = memory
    if gpus:
        out["nvidia.com/gpu"] = gpus
    return out


def literal(words: list[str]) -> list[str]:
    """`words` as a container command holds them so they reach the job as given: Kubernetes reads `$$` as `$` and
    `$(NAME)` as a variable there."""
    return [w.replace("$", "$$") for w in words]


def metadata(a: argparse.Namespace) -> dict:
    return {"name": dns_name(a.job_name), "namespace": a.namespace, "labels": {"app.kubernetes.io/part-of": "bitdance"}}


def render_train(a: argparse.Namespace):
    args, cfg = training_args(a.config, a.overrides, a.max_restarts)
    env = read_env_file(a.env_file)
    vols, mounts = volumes(a)
    g = a.gpus_per_node
    # the operator sets MASTER_ADDR / MASTER_PORT (the Master pod's service) in every pod; Kubernetes expands $(VAR)
    endpoint = "$(MASTER_ADDR):$(MASTER_PORT)"
    cmd = torchrun(a.nodes, g, endpoint, a.job_name, a.max_restarts, "training.train", literal(args))

    def replica(count: int) -> dict:
        pod = {"containers": [container(a, "pytorch", mounts, limits(a.cpus, a.memory, g), cmd, env)]}
        pod["volumes"] = vols
        return {"replicas": count, "restartPolicy": "OnFailure", "template": {"spec": pod}}

    replicas = {"Master": replica(1)}
    if a.nodes > 1:
        replicas["Worker"] = replica(a.nodes - 1)
    doc = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata(a),
        "spec": {
            "nprocPerNode": str(g),
            "runPolicy": {"backoffLimit": a.max_restarts, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": replicas,
        },
    }
    header = [
        f"BitDance training, {a.nodes} pod(s) x {g} GPU(s); rendered by `{a.rendered_by}`",
        f"Restarts (torchrun's, then the pods') resume from {cfg.run_dir}/checkpoints/latest (checkpoint.resume=auto).",
    ]
    return yaml_file(header, doc), ["kubectl", "apply", "-f", out_path(a)]


def render_tokenize(a: argparse.Namespace):
    entry = tokenize_command(a.tokenize_args)
    vols, mounts = volumes(a)
    head_ports = [
        {"containerPort": RAY_GCS_PORT, "name": "gcs-server"},
        {"containerPort": RAY_DASHBOARD_PORT, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    head = container(a, "ray-head", mounts, limits(a.head_cpus, a.head_memory, 0))
    head["ports"] = head_ports
    worker = container(a, "ray-worker", mounts, limits(a.worker_cpus, a.worker_memory, a.gpus_per_worker))
    doc = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": metadata(a),
        "spec": {
            "entrypoint": shlex.join(entry),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": {
                "rayVersion": version("ray"),
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0"},
                    "template": {"spec": {"containers": [head], "volumes": vols}},
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "encoders",
                        "replicas": a.workers,
                        "minReplicas": a.workers,
                        "maxReplicas": a.workers,
                        "rayStartParams": {},
                        "template": {"spec": {"containers": [worker], "volumes": vols}},
                    }
                ],
            },
        },
    }
    header = [f"BitDance Ray tokenization, 1 head + {a.workers} worker pod(s); rendered by `{a.rendered_by}`"]
    return yaml_file(header, doc), ["kubectl", "apply", "-f", out_path(a)]


def render_watch(a: argparse.Namespace):
    """A batch/v1 Job: one pod running torchrun of eval.watch on its GPUs, restarted on failure (it resumes)."""
    args = watch_args(a.watch_args)
    env = read_env_file(a.env_file)
    vols, mounts = volumes(a)
    g = a.gpus
    cmd = torchrun(1, g, "127.0.0.1:29500", a.job_name, a.max_restarts, "eval.watch", literal(args))
    pod = {
        "restartPolicy": "OnFailure",
        "containers": [container(a, "watch", mounts, limits(a.cpus, a.memory, g), cmd, env)],
        "volumes": vols,
    }
    doc = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(a),
        "spec": {"backoffLimit": a.max_restarts, "template": {"spec": pod}},
    }
    header = [
        f"BitDance checkpoint watcher, 1 pod x {g} GPU(s); rendered by `{a.rendered_by}`",
        "It reads the run folder on the mounted PVCs only; apply it once the run has saved its first checkpoint.",
    ]
    return yaml_file(header, doc), ["kubectl", "apply", "-f", out_path(a)]


def build_parser() -> argparse.ArgumentParser:
    p = LauncherParser(prog="python -m cluster.k8s", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=LauncherParser)

    pod = LauncherParser(add_help=False)
    pod.add_argument("--image", required=True, help="container image holding the repository at --workdir")
    pod.add_argument("--namespace", default="default")
    pod.add_argument("--pvc", action="append", default=[], help="CLAIM:/mount/path, repeatable (data, checkpoints)")
    pod.add_argument("--workdir", default="/workspace/bitdance", help="the repository inside the image")

    t = sub.add_parser("train", parents=[pod], help="a Kubeflow PyTorchJob of training.train")
    t.add_argument("--nodes", type=positive_int, required=True, help="pods, one per node")
    t.add_argument("--gpus-per-node", type=positive_int, default=8)
    t.add_argument("--cpus", type=positive_int, help="CPU limit per pod")
    t.add_argument("--memory", help="memory limit per pod, e.g. 1600Gi")
    t.add_argument("--config", required=True, help="training YAML (training/configs/), a path inside the image")
    t.add_argument("--max-restarts", type=non_negative_int, default=3, help="torchrun restarts, then pod restarts")
    t.add_argument("--env-file", default=DEFAULT_ENV_FILE, help="NCCL / torch.distributed settings (container env)")
    t.add_argument("overrides", nargs="*", help="after --: dotted config overrides")
    add_delivery_flags(t, "bitdance-train", ".yaml")
    t.set_defaults(render=render_train)

    k = sub.add_parser("tokenize", parents=[pod], help="a KubeRay RayJob of data_pipeline.tokenize")
    k.add_argument("--workers", type=positive_int, default=1, help="Ray worker pods")
    k.add_argument("--gpus-per-worker", type=non_negative_int, default=1)
    k.add_argument("--worker-cpus", type=positive_int, default=16)
    k.add_argument("--worker-memory", default="64Gi")
    k.add_argument("--head-cpus", type=positive_int, default=8)
    k.add_argument("--head-memory", default="32Gi")
    k.add_argument("tokenize_args", nargs="*", help="after --: the data_pipeline.tokenize arguments")
    add_delivery_flags(k, "bitdance-tokenize", ".yaml")
    k.set_defaults(render=render_tokenize)

    w = sub.add_parser("watch", parents=[pod], help="a Job running eval.watch beside a training run")
    w.add_argument("--gpus", type=positive_int, default=1, help="GPUs of the pod (generation is split over them)")
    w.add_argument("--cpus", type=positive_int, help="CPU limit of the pod")
    w.add_argument("--memory", help="memory limit of the pod (a DeepSpeed export holds the fp32 model)")
    w.add_argument("--max-restarts", type=non_negative_int, default=3, help="torchrun restarts, then the Job's retries")
    w.add_argument("--env-file", default=DEFAULT_ENV_FILE, help="NCCL / torch.distributed settings (container env)")
    w.add_argument("watch_args", nargs="*", help="after --: the eval.watch arguments (paths inside the pod)")
    add_delivery_flags(w, "bitdance-watch", ".yaml")
    w.set_defaults(render=render_watch)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), argv, lambda a: a.render(a))


if __name__ == "__main__":
    sys.exit(main())
