"""What is being trained: the `Task` interface the loop talks to, and `build_task`, which takes the task of the run's
model family from the family registry (`models.family.FAMILIES`).

A task builds its model and data loader, turns a batch into a loss (`step`), counts samples, tokens and model FLOPs,
and optionally evaluates (tokenizer reconstruction), draws sample grids and exports the official layout. Models stay
plain PyTorch modules; engines wrap them from outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from models.family import FAMILIES
from training.config import TrainConfig


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, float]
    samples: int
    tokens: int
    flops: float  # model FLOPs of this micro-batch's forward and backward


class Task:
    """Defaults shared by every task; `kind`, `__init__`, `loader` and `step` are each task's own."""

    kind: str
    model: nn.Module | None
    model_cfg: object = None
    init_checkpoint: Path | None = None  # a megatron checkpoint the engine loads itself (t2i)
    init_folder: Path | None = None  # an official / Qwen3 folder the megatron engine reads per rank (t2i)
    current_step: int = 0  # the optimizer step being computed (set by the loop)
    evaluates_at_ends: bool = False  # also evaluate before the first step and after the last
    whole_parameters: bool = False  # needs every parameter whole on every rank (engines that shard them refuse it)
    # the parts of its model that fine-tuning adapts (`training.finetune.Targets`); None: finetune.method=full only
    finetune_targets = None
    validation_kind: str | None = None  # loader kind of its held-out set (`training.validation`); None: none

    def loader(self, rank: int, world: int): ...

    def step(self, forward, batch) -> StepOutput: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of the EMA weights, logged at `eval.every` (and by the tokenizer at the start and the end)."""
        return {}

    def validation_inputs(self, batch, index: int) -> tuple:
        """The model's positional arguments for held-out batch `index` (on the CPU; engines move them): the batch and
        the diffusion head's draws, fixed by (seed, index) so that every engine and layout computes the same loss."""
        raise NotImplementedError

    def validation_sums(self, out, inputs: tuple) -> torch.Tensor:
        """float64 [text CE sum, text tokens, vision loss sum, vision tokens] of the held-out forward `out` of the
        model on `inputs` (what `validation_inputs` returned)."""
        raise NotImplementedError

    def validation_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """`val/*` metrics from the sums over the whole held-out set: token-weighted means, and the loss they make."""
        raise NotImplementedError

    def sample_grid(self, model: nn.Module) -> Image.Image | None:
        return None

    def export(self, model: nn.Module, out_dir: Path) -> Path | None:
        return None


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = max(i.width for i in images), max(i.height for i in images)
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for k, img in enumerate(images):
        grid.paste(img, ((k % columns) * w, (k // columns) * h))
    return grid


def build_task(cfg: TrainConfig, device: torch.device) -> Task:
    """The task of the run's model family (`models.family.FAMILIES[model.kind].task`)."""
    return FAMILIES.get(cfg.model.kind).task_class()(cfg, device)
