"""Cluster: the launchers (`slurm`: sbatch scripts for training and Ray tokenization; `k8s`: PyTorchJob and RayJob
manifests; `ray_cluster`: `ray up` YAML for AWS/GCP) with their shared rendering (`launch`) and the NCCL settings file
(`nccl.env`); the per-node `preflight` run before training; the 14B layout and memory planner (`plan`); the one-GPU
check (`gpu_check`); the end-to-end demo (`demo/`)."""
