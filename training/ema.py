"""Exponential moving average of the trainable weights, kept in fp32 on each rank's own parameter data.

Under ZeRO-3 a parameter's local data is its shard (`ds_tensor`), so the EMA is sharded the same way.
"""

from __future__ import annotations

import torch
from torch import nn


def local_data(p: nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: local_data(params[n]).detach().float().clone() for n in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        shadows = [self.shadow[n] for n in self.names]
        current = [local_data(params[n]).float() for n in self.names]
        torch._foreach_lerp_(shadows, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:5]}")
        for n in self.names:
            self.shadow[n].copy_(state[n])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into `model` (a full, unsharded copy of the trained model)."""
        params = dict(model.named_parameters())
        for n in self.names:
            params[n].data.copy_(self.shadow[n].view_as(params[n]).to(params[n].dtype))
