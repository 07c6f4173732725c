"""The model families and what each brings, in one registry (`FAMILIES`, keyed by `model.kind`).

A family is a folder `models/<family>/` with a `family.py` that defines a `ModelFamily`: its named configs, the
training task that trains it, the module prefixes torchao FP8 converts, its published sampling presets and the
recogniser of its released checkpoints. Adding a family is that folder plus one `FAMILIES.register` line below.
Models import no training code, so the task is named by its import path and imported only by the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.core.registry import Registry, import_object
from models.core.sampling import Preset


@dataclass(frozen=True)
class ModelFamily:
    kind: str  # the `model.kind` value
    config_names: str  # the named configs `get_config` knows, as users write them (for help and errors)
    get_config: Callable[..., object]  # a named config (`model.name`) -> the model's config dataclass
    task: str  # "package.module:Class" of its training task (training/tasks/), imported by the trainer only
    fp8_prefixes: tuple[str, ...] = ()  # module-name prefixes of the backbone linears torchao FP8 converts; () = no FP8
    presets: tuple[Preset, ...] = ()  # published sampling settings of its released models
    recognise: Callable[[str | Path], str | None] | None = None  # a released checkpoint -> its preset / config name
    generator: str | None = None  # "package.module:Class" of its sampling adapter (eval.generate), imported on use

    def task_class(self) -> type:
        return import_object(self.task)  # type: ignore[return-value]


FAMILIES: Registry[ModelFamily] = Registry("model.kind")
FAMILIES.register("t2i", "models.t2i.family:FAMILY")
FAMILIES.register("c2i", "models.c2i.family:FAMILY")
FAMILIES.register("tokenizer", "models.tokenizer.family:FAMILY")


def all_presets() -> dict[str, Preset]:
    """Every family's presets by name."""
    return {p.name: p for _, family in FAMILIES.items() for p in family.presets}
