"""Named model configs carry P, the tokens predicted per step, as a `-<P>x` suffix ("14B-16x", "B-4x", "tiny-4x"):
the one parser of that suffix, for every family."""

from __future__ import annotations

import re

_NAME = re.compile(r"(\w+?)(?:-(\d+)x)?")


def split_parallel_suffix(name: str) -> tuple[str, int | None]:
    """("14B", 16) for "14B-16x"; ("B", None) for "B"; a one-line error for a name of another shape."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"model config names look like <base> or <base>-<P>x (e.g. B-4x, 14B-16x), got {name!r}")
    return m.group(1), int(m.group(2)) if m.group(2) else None
