"""Output folders a tool may write into: a new or empty folder, or one the same tool made before (its marker file).

A tool claims its output folder before writing anything. A folder that holds other files and no marker of this tool
is refused in one line unless the user passes `--overwrite`, so an `--out`/`--dst` mistyped as an unrelated folder
never loses that folder's files or has them mistaken for this tool's earlier output. The marker is written once and
atomically (the ranks of a torchrun job check the folder while the first one claims it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MARKER = ".bitdance-output.json"


def made_by(folder: str | Path) -> str | None:
    """The tool whose marker the folder holds, or None."""
    marker = Path(folder) / MARKER
    try:
        return json.loads(marker.read_text()).get("tool")
    except (OSError, ValueError, AttributeError):
        return None


def check_output_folder(folder: str | Path, tool: str, overwrite: bool = False, flag: str = "--out") -> bool:
    """Whether `tool` may write into `folder`, writing nothing: True for a new or empty folder or one `tool` marked,
    False for another non-empty folder when `overwrite` (the caller takes it over); otherwise a one-line ValueError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is a file; give a folder")
    if not folder.is_dir() or not any(folder.iterdir()) or made_by(folder) == tool:
        return True
    if overwrite:
        return False
    other = made_by(folder)
    whose = f"written by {other}" if other else "not written by this tool"
    raise ValueError(f"{flag} {folder} is not empty and was {whose}; give a new or empty folder, or pass --overwrite")


def claim_output_folder(folder: str | Path, tool: str, overwrite: bool = False, flag: str = "--out") -> Path:
    """Create `folder` (or accept it: empty, or marked by `tool`, or `overwrite`) and mark it as `tool`'s output."""
    folder = Path(folder)
    check_output_folder(folder, tool, overwrite, flag)
    folder.mkdir(parents=True, exist_ok=True)
    if made_by(folder) != tool:  # written once, atomically: other ranks may be checking the folder right now
        tmp = folder.parent / f".{folder.name}{MARKER}.{os.getpid()}.tmp"  # beside it: the folder stays empty
        tmp.write_text(json.dumps({"tool": tool}) + "\n")
        os.replace(tmp, folder / MARKER)
    return folder
