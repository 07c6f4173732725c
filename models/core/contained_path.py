"""Paths that must stay inside a folder: the files a checkpoint, index or metadata names, and the files a tool writes.

A name resolves (symlinks followed) against its root folder and must land inside that folder; anything else (an
absolute path, `..`, a symlink out) is refused in one line naming the entry and where it points.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def resolve_inside(root: str | Path, name: str | Path, what: str = "file") -> Path:
    """`root/name` with symlinks resolved, refused (ValueError, one line) unless it stays inside `root`."""
    root_real = Path(os.path.realpath(root))
    name = str(name)
    if not name or "\x00" in name:
        raise ValueError(f"{what} {name!r} in {root} is not a usable file name")
    target = Path(os.path.realpath(root_real / name))
    if target != root_real and root_real not in target.parents:
        raise ValueError(
            f"{what} {name!r} resolves to {target}, outside {root_real}; "
            "every file it names must lie inside that folder"
        )
    return target


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_name(name: str, max_len: int = 120) -> str:
    """`name` reduced to letters, digits, `.`, `_` and `-` (runs of anything else become `_`), never `.`/`..`/empty."""
    cleaned = _UNSAFE.sub("_", str(name)).strip("._") or "_"
    return cleaned[:max_len]
