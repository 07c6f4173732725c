"""Where the demo's torchrun stages run on this machine: one process per GPU (NCCL), else 2 CPU processes (gloo), and
the training settings a GPU adds (bf16 under ZeRO-1); on CPU the training YAMLs run as written."""

from __future__ import annotations

from dataclasses import dataclass

import torch

CPU_PROCESSES = 2


@dataclass(frozen=True)
class Launch:
    nproc: int  # torchrun processes of every training and sampling stage
    backend: str  # what training.engines.init_distributed picks: nccl with GPUs, gloo without

    def overrides(self, config: str) -> list[str]:
        """Training overrides for `config` on this machine: none on CPU; on GPUs bf16 under ZeRO-1 (DeepSpeed keeps
        the fp32 master weights there) and data.global_batch rounded up to a multiple of micro_batch x nproc."""
        if self.backend == "gloo":
            return []
        from training.config import load_config

        data = load_config(config).data
        per_step = data.micro_batch * self.nproc
        global_batch = -(-data.global_batch // per_step) * per_step
        return ["engine.zero_stage=1", "engine.precision=bf16", f"data.global_batch={global_batch}"]


def plan_launch(nproc: int | None = None) -> Launch:
    """One process per GPU when CUDA is present, else CPU_PROCESSES; `nproc` sets the count (at most the GPUs)."""
    if not torch.cuda.is_available():
        return Launch(CPU_PROCESSES if nproc is None else nproc, "gloo")
    gpus = torch.cuda.device_count()
    if nproc is not None and nproc > gpus:
        raise ValueError(f"nproc={nproc} but this machine has {gpus} GPU(s), one process each; pass nproc<={gpus}")
    return Launch(gpus if nproc is None else nproc, "nccl")
