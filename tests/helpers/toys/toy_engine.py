"""A toy engine, written the way a new engine is added: one module with an `EngineBase` subclass that owns its setup,
its config checks and its checkpoint state; the test registers it with one line,
`ENGINES.register("plain", "helpers.toys.toy_engine:PlainEngine")`. Plain PyTorch: the whole model and an AdamW
optimizer on every rank, gradients averaged over ranks with all_reduce."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from training.ema import EMA
from training.engines import EngineBase, StepResult, StepStats


class PlainEngine(EngineBase):
    kind = "plain"
    precisions = ("fp32",)
    export_how = "the run's export folder"
    full_model_on_rank0 = True

    @classmethod
    def check(cls, cfg) -> list[tuple[bool, str]]:
        return [(cfg.engine.precision in ("auto", "fp32"), "engine.kind=plain trains in fp32 only")]

    @classmethod
    def auto_precision(cls, cfg, cuda: bool) -> str:
        return "fp32"

    @classmethod
    def build(cls, cfg, task, grad_accum: int) -> PlainEngine:
        return cls(task.model, cfg)

    def __init__(self, model: torch.nn.Module, cfg):
        self.model, self.cfg = model, cfg
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def __call__(self, *args):
        return self.model(*args)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def new_ema(self, decay: float) -> EMA:
        return EMA(self.model, decay)

    def ema_model(self, ema: EMA) -> None:
        return None

    def train_step(self, batches, task, grad_accum: int, poison: bool = False) -> StepStats:
        self.optimizer.zero_grad()
        losses, samples, tokens = [], 0, 0
        for _ in range(grad_accum):
            out = task.step(self, next(batches))
            loss = out.loss * float("nan") if poison else out.loss
            (loss / grad_accum).backward()
            losses.append(loss.item())
            samples, tokens = samples + out.samples, tokens + out.tokens
        for p in self.model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= self.dp_size
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip or float("inf")))
        applied = bool(torch.isfinite(torch.tensor(norm)))
        if applied:
            self.optimizer.step()
        mean = sum(losses) / len(losses)
        return StepStats(mean, {"loss/toy": mean}, samples, tokens, 0.0, StepResult(applied, True, norm))

    def save_state(self, directory: Path, ema: EMA) -> tuple[dict, dict]:
        if dist.get_rank() == 0:
            save_file(
                {k: v.contiguous() for k, v in self.model.state_dict().items()}, str(directory / "model.safetensors")
            )
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(directory / "ema.safetensors"))
        return {"optimizer": self.optimizer.state_dict()}, {"plain": True}

    def when_saved(self, finalize) -> None:
        finalize()

    def poll_saves(self) -> None:
        pass

    def wait_saves(self) -> None:
        pass

    def load_state(self, directory: Path, ema: EMA, trainer: dict, per_rank: dict | None):
        if "plain" not in trainer or per_rank is None:
            raise ValueError(f"{directory} was not written by engine.kind=plain on this world size")
        self.model.load_state_dict(load_file(str(directory / "model.safetensors")))
        ema.load_state_dict(load_file(str(directory / "ema.safetensors")))
        self.optimizer.load_state_dict(per_rank["optimizer"])
        return "all"
