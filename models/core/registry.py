"""`Registry`: the one way the code base maps a setting's value (the model family, the engine, `--source`, `--task`)
to what implements it, so that adding a model family, an engine, a data source or a benchmark is one module plus one
registration, and no caller switches on the string.

Entries may be given lazily as "package.module:attribute" (imported on first use, so registering the megatron engine
does not import megatron-core). A value that is not a registered name but has the form "package.module:attribute" is
imported as is: a plugin outside this repository needs no registration (it must be importable in every process,
Ray workers and torchrun ranks included).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def import_object(path: str) -> object:
    """The object a "package.module:attribute" path names; a one-line error when it does not exist."""
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {path!r} ({err}); check the module path and that it is importable") from None
    return obj


class Registry(Generic[T]):
    """Named entries of one extension point. `setting` is what the user writes the name into, for the errors."""

    def __init__(self, setting: str) -> None:
        self.setting = setting
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, entry: T | str) -> T | str:
        """Add `entry` (an object, or a lazy "module:attribute" path) under `name`; a name is registered once."""
        if name in self._entries:
            raise ValueError(f"{self.setting} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._entries:
            if ":" in name:
                return import_object(name)  # type: ignore[return-value]
            raise ValueError(f"unknown {self.setting} {name!r}; choose one of {', '.join(self.names())}")
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = self._entries[name] = import_object(entry)  # type: ignore[assignment]
        return entry  # type: ignore[return-value]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        for name in list(self._entries):
            yield name, self.get(name)
