"""A toy model family, written the way a new family is added: one module defining its model, its training task and its
`ModelFamily` (in the repository it would be `models/<family>/` + `training/tasks/<family>.py`); the test registers it
with one line, `FAMILIES.register("toy", "helpers.toys.toy_family:FAMILY")`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.family import ModelFamily
from training.tasks import StepOutput, Task


@dataclass
class ToyConfig:
    width: int = 8


def get_toy_config(name: str) -> ToyConfig:
    if name != "toy-8":
        raise ValueError(f"unknown toy config {name!r}; known: toy-8")
    return ToyConfig()


class ToyModel(nn.Module):
    """Regresses a fixed linear map of its input."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.Tanh(), nn.Linear(cfg.width, cfg.width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.net(x) - y) ** 2).mean()


class ToyBatches:
    """A resumable stream of (x, y) micro-batches, one stream per data-parallel rank."""

    def __init__(self, seed: int, rank: int, micro_batch: int, width: int):
        self.seed, self.rank, self.micro_batch, self.width, self.position = seed, rank, micro_batch, width, 0

    def __iter__(self):
        target = torch.Generator().manual_seed(1234)
        w = torch.randn(self.width, self.width, generator=target)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + self.position)
            x = torch.randn(self.micro_batch, self.width, generator=g)
            self.position += 1
            yield x, x @ w

    def state_dict(self) -> dict:
        return {"rank": self.rank, "position": self.position}

    def load_state_dict(self, state: dict, all_states: list[dict] | None = None) -> None:
        self.position = int(state["position"])


class ToyTask(Task):
    kind = "toy"

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.model_cfg = get_toy_config(cfg.model.name)
        self.model = ToyModel(self.model_cfg).to(device)

    def loader(self, rank: int, world: int) -> ToyBatches:
        return ToyBatches(self.cfg.seed, rank, self.cfg.data.micro_batch, self.model_cfg.width)

    def step(self, forward, batch) -> StepOutput:
        x, y = (t.to(self.device) for t in batch)
        loss = forward(x, y)
        return StepOutput(loss, {"loss/toy": loss.item()}, x.shape[0], x.numel(), 0.0)


FAMILY = ModelFamily(
    kind="toy", config_names="toy-8", get_config=get_toy_config, task="helpers.toys.toy_family:ToyTask"
)
