"""Parse a command line with a module's own argument parser, through its `main(argv)`, without running the module."""

from __future__ import annotations

import argparse
import importlib

import pytest


class _Parsed(Exception):
    pass


def check_arguments(module: str, args: list[str], monkeypatch) -> argparse.Namespace:
    """Parse `args` with the module's own parser (through its main(argv)), stopping right after parsing."""
    original, seen = argparse.ArgumentParser.parse_args, {}

    def parse_only(self, argv=None, namespace=None):
        try:
            seen["ns"] = original(self, argv, namespace)
        except SystemExit:
            raise AssertionError(f"command rejected by {module}: {' '.join(args)}") from None
        raise _Parsed

    mod = importlib.import_module(module)
    if mod.__spec__.submodule_search_locations is not None:  # a package: `python -m` runs its __main__
        mod = importlib.import_module(f"{module}.__main__")
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        with pytest.raises(_Parsed):
            mod.main(args)
    return seen["ns"]
