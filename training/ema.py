"""Exponential moving averages of the trainable weights in fp32: `EMA` on each rank's own parameter data (under ZeRO-3
a parameter's local data is its shard, `ds_tensor`, so the EMA is sharded the same way) and `ShardedEMA` on the
data-parallel shards of megatron's distributed optimizer."""

from __future__ import annotations

import torch
import torch.distributed as dist
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


class ShardedEMA:
    """The EMA of this data-parallel rank's shard of every parameter: the flat range the distributed optimizer owns,
    kept in fp32 and updated in place from the optimizer's fp32 main shard (or the fp32 parameter itself), so no rank
    holds a full copy and an update allocates no temporary beyond one non-fp32 shard. `full()` assembles whole
    (tensor-parallel local) tensors over the data-parallel group for checkpoints and sample grids."""

    def __init__(self, shards: dict[str, tuple[nn.Parameter, slice, torch.Tensor]], decay: float, group=None):
        """`shards`: key -> (model parameter, its flat range owned here, the fp32 source of that range)."""
        self.decay, self.group, self.shards = decay, group, shards
        self.shadow = {k: src.detach().float().clone() for k, (_, _, src) in shards.items()}

    @torch.no_grad()
    def update(self, model: nn.Module | None = None) -> None:
        same = [(self.shadow[k], src) for k, (_, _, src) in self.shards.items() if src.dtype == torch.float32]
        if same:
            torch._foreach_lerp_([s for s, _ in same], [c for _, c in same], 1.0 - self.decay)
        for k, (_, _, src) in self.shards.items():
            if src.dtype != torch.float32:
                self.shadow[k].lerp_(src.float(), 1.0 - self.decay)

    @torch.no_grad()
    def reset_to_params(self) -> None:
        """Start the EMA at the current weights (a model-only checkpoint was loaded)."""
        for k, (_, _, src) in self.shards.items():
            self.shadow[k].copy_(src)

    @torch.no_grad()
    def full(self) -> dict[str, torch.Tensor]:
        """Whole fp32 tensors, shaped like the parameters, on every data-parallel rank (collective)."""
        out = {}
        for k, (p, rows, _) in self.shards.items():
            t = torch.zeros(p.numel(), dtype=torch.float32, device=self.shadow[k].device)
            t[rows] = self.shadow[k]
            if dist.is_initialized():
                dist.all_reduce(t, group=self.group)
            out[k] = t.view(p.shape)
        return out

    @torch.no_grad()
    def load_full(self, state: dict[str, torch.Tensor]) -> None:
        for k, (_, rows, _) in self.shards.items():
            self.shadow[k].copy_(state[k].reshape(-1)[rows])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shadow.values())
