"""One-line errors for the command-line tools: an `OSError`/`ValueError` that reaches a tool's `main` is printed as
`prog: error: <first line>` with exit status 2; `--debug` or `BITDANCE_DEBUG=1` shows the traceback instead."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

DEBUG_ENV = "BITDANCE_DEBUG"


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks (or set {DEBUG_ENV}=1)")


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


@contextmanager
def one_line_errors(prog: str, debug: bool = False, kinds: tuple[type[BaseException], ...] = (OSError, ValueError)):
    """Turn `kinds` raised inside into one line on stderr and exit 2 (the traceback under --debug)."""
    try:
        yield
    except kinds as err:
        if debug_requested(debug):
            raise
        print(f"{prog}: error: {first_line(err)}", file=sys.stderr, flush=True)
        sys.exit(2)
