"""The DeepSpeed engine behind the training loop: ZeRO stage 0-3, bf16 (GPU) or fp32 (CPU), gloo on CPU and NCCL
on GPU, gradient clipping, and steps skipped (not applied) when the gradients are not finite.

The loop sees only `train_step`, `set_lr`, `module` and the checkpoint hooks, so other engines
(training/engines/megatron.py) stand behind the same calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from training.config import TrainConfig
from training.optim import set_lr


@dataclass
class StepResult:
    applied: bool  # False at accumulation micro-steps and for skipped (non-finite) steps
    boundary: bool
    grad_norm: float


@dataclass
class StepStats:
    """One optimizer step as the training loop logs it: this rank's means over its micro-batches, and the samples /
    tokens it counts (summed over all ranks by the loop)."""

    loss: float
    metrics: dict[str, float]
    samples: int
    tokens: int
    result: StepResult


def init_distributed(engine_kind: str = "deepspeed") -> tuple[int, int, torch.device]:
    """Process group from the torchrun / deepspeed launcher env (single process when absent). The megatron engine
    needs no DeepSpeed: its process group comes from torch.distributed directly."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # gloo next to NCCL on GPUs: the loop's small CPU collectives (metrics, flags) need it
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    if engine_kind == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")  # adopts the process group above
    return dist.get_rank(), dist.get_world_size(), device


def precision(cfg: TrainConfig) -> str:
    if cfg.engine.precision != "auto":
        return cfg.engine.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


class DeepSpeedEngine:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, grad_accum: int):
        import deepspeed

        self.zero_stage = cfg.engine.zero_stage
        self.precision = precision(cfg)
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError("engine.precision bf16 needs engine.zero_stage >= 1 (fp32 master weights live there)")
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.data.micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": self.precision == "bf16", "check_grad_overflow": True},
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.base_optimizer = optimizer

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def set_lr(self, lr: float) -> None:
        set_lr(self.base_optimizer, lr)

    def train_step(self, batches, task, grad_accum: int, poison: bool = False) -> StepStats:
        """Forward/backward over `grad_accum` micro-batches from `batches`, the update applied at the last one.
        `poison` makes the loss NaN (fault injection: the step must be skipped)."""
        losses, metrics, samples, tokens = [], {}, 0, 0
        for _ in range(grad_accum):
            out = task.step(self, next(batches))
            loss = out.loss * float("nan") if poison else out.loss
            self.backward(loss)
            result = self.step()
            losses.append(loss.item())
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v / grad_accum
            samples += out.samples
            tokens += out.tokens
        return StepStats(sum(losses) / len(losses), metrics, samples, tokens, result)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def _grads_finite_stage0(self) -> tuple[bool, float]:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()
        return bool(torch.isfinite(torch.tensor(norm))), norm

    def step(self) -> StepResult:
        """Call after every micro-batch's backward; applies the update at the accumulation boundary."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if not boundary:
            self.engine.step()
            return StepResult(False, False, float("nan"))
        if self.zero_stage == 0:  # DeepSpeed would apply non-finite fp32 gradients: skip its step ourselves
            finite, norm = self._grads_finite_stage0()
            if finite:
                self.engine.step()
            else:  # what engine.step() does at a boundary, minus the update (keeps its step counters in sync)
                self.engine.zero_grad()
                self.engine.global_steps += 1
                self.engine.micro_steps += 1
            return StepResult(finite, True, norm)
        self.engine.step()  # ZeRO optimizers detect the non-finite norm, clear the gradients and skip
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return StepResult(not self.optimizer.overflow, True, norm)

    # ---- checkpoint hooks: every tensor state this rank owns, loadable with torch.load(weights_only=True)
    def optimizer_state(self) -> dict:
        if self.zero_stage == 0:
            return {"base": self.base_optimizer.state_dict()}
        if self.zero_stage in (1, 2):
            return {
                "base": self.optimizer.optimizer.state_dict(),
                "fp32_partitions": [t.detach().clone() for t in self.optimizer.single_partition_of_fp32_groups],
            }
        flats = self.optimizer.fp32_partitioned_groups_flat  # ZeRO-3 steps its sub-groups one flat tensor at a time
        base = self.optimizer.optimizer
        return {
            "base_state": [
                {k: (v.clone() if torch.is_tensor(v) else v) for k, v in base.state[f].items()}
                if f in base.state
                else {}
                for f in flats
            ],
            "fp32_partitions": [t.detach().clone() for t in flats],
            "param_shards": [p.ds_tensor.detach().clone() for p in self.module.parameters()],
        }

    @torch.no_grad()
    def load_optimizer_state(self, state: dict) -> None:
        if self.zero_stage == 0:
            self.base_optimizer.load_state_dict(state["base"])
            return
        if self.zero_stage == 3:
            base = self.optimizer.optimizer
            for flat, st in zip(self.optimizer.fp32_partitioned_groups_flat, state["base_state"], strict=True):
                if st:
                    base.state[flat] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        else:
            self.optimizer.optimizer.load_state_dict(state["base"])
        mine = (
            self.optimizer.single_partition_of_fp32_groups
            if self.zero_stage in (1, 2)
            else self.optimizer.fp32_partitioned_groups_flat
        )
        if len(mine) != len(state["fp32_partitions"]) or any(
            a.shape != b.shape for a, b in zip(mine, state["fp32_partitions"], strict=False)
        ):
            raise ValueError("optimizer partitions differ from the checkpoint's (same world size and ZeRO stage?)")
        for dst, src in zip(mine, state["fp32_partitions"], strict=True):
            dst.copy_(src)
        if self.zero_stage == 3:
            for p, shard in zip(self.module.parameters(), state["param_shards"], strict=True):
                p.ds_tensor.copy_(shard)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights (gathered under ZeRO-3); every rank must call it."""
        if self.zero_stage == 3:
            import deepspeed

            params = list(self.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.zero_stage == 3:
            return  # shards come back with the optimizer state
        missing, unexpected = self.module.load_state_dict(state, strict=True)
        del missing, unexpected
