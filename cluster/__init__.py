"""Cluster: what launches the stages. On a cluster: the launchers (`slurm`: sbatch scripts for training and Ray
tokenization; `k8s`: PyTorchJob and RayJob manifests; `ray_cluster`: `ray up` YAML for AWS/GCP) with their shared
rendering (`launch`) and the NCCL settings file (`nccl.env`), the per-node `preflight` run before training, the 14B
layout and memory planner (`plan/`) and the one-GPU checks (`gpu_check/`: megatron BF16, torchao FP8). On one
machine: the end-to-end demo (`demo/`)."""
