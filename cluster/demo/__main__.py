"""`python -m cluster.demo [KEY=VALUE ...]` (`make demo ARGS=...`): the DemoConfig overrides, then the demo."""

from __future__ import annotations

import argparse

import cluster.demo
from cluster.demo.config import load_demo_config
from cluster.demo.runner import run_demo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cluster.demo", description=cluster.demo.__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="DemoConfig fields, e.g. out=runs/demo t2i_steps=400")
    args = p.parse_args(argv)
    try:
        cfg = load_demo_config(args.overrides)
    except ValueError as e:
        p.error(str(e))
    run_demo(cfg)


if __name__ == "__main__":
    main()
