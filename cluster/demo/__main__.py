"""`python -m cluster.demo [--overwrite] [KEY=VALUE ...]` (`make demo ARGS=...`): the DemoConfig overrides, then the
demo; errors (a bad override, an `out=` folder that is not the demo's) are one line (`--debug`: the traceback)."""

from __future__ import annotations

import argparse

import cluster.demo
from cluster.demo.config import load_demo_config
from cluster.demo.runner import run_demo
from training.cli_errors import add_debug_flag, one_line_errors

PROG = "python -m cluster.demo"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=PROG, description=cluster.demo.__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="DemoConfig fields, e.g. out=runs/demo t2i_steps=400")
    p.add_argument(
        "--overwrite", action="store_true", help="run in a non-empty out= folder the demo did not make (afresh)"
    )
    add_debug_flag(p)
    args = p.parse_args(argv)
    try:
        cfg = load_demo_config(args.overrides)
    except ValueError as e:
        p.error(str(e))
    with one_line_errors(PROG, args.debug):
        run_demo(cfg, args.overwrite)


if __name__ == "__main__":
    main()
