"""Strict, well-reported state-dict loading shared by every model loader."""

from collections.abc import Iterable, Mapping

import torch
from torch import nn

_SHOW = 20


class StateDictMismatchError(ValueError):
    """A state dict whose keys or shapes do not match the module it is loaded into."""


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove any of ``prefixes`` (repeatedly, e.g. "module.vae.") from the start of every key."""
    prefixes = tuple(prefixes)
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for p in prefixes:
                if key.startswith(p):
                    key, stripped = key[len(p) :], True
        out[key] = value
    return out


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW]) + (", ..." if len(items) > _SHOW else "")
    return f"  {len(items)} {title}: {shown}"


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, assign: bool = False
) -> None:
    """Load ``state_dict`` into ``module`` requiring identical keys and shapes, else raise a clear error."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k} (checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        lines = [f"state dict does not match {what}:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                lines.append(_listing(title, items))
        raise StateDictMismatchError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True, assign=assign)
