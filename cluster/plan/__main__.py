"""`python -m cluster.plan`: the planner's command line (the table and command of one cluster, or the 14B report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cluster.plan
from cluster.plan.report import full_report, report
from cluster.plan.search import ASSUMED_MFU, Cluster, train_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.plan", description=cluster.plan.__doc__.split("\n")[0])
    ap.add_argument("--model", default="14B-16x", help="T2I config name (14B-16x, 14B-64x)")
    ap.add_argument("--config", help="training YAML (default: the model's t2i_14b_*.yaml)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-mem", type=float, default=141.0, help="GiB per GPU (H200: 141, H100: 80)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--token-budget", type=int, help="positions per packed row (default: the YAML's)")
    ap.add_argument("--micro-batches", type=int, help="micro-batches per step per pipeline (default: from the YAML)")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--mfu", type=float, default=ASSUMED_MFU)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--report", help="write the 14B tables (both models, H200 and H100 clusters) to this file")
    args = ap.parse_args(argv)
    try:
        if args.report:
            Path(args.report).write_text(full_report() + "\n")
            print(f"wrote {args.report}")
            return 0
        if args.gpus < 1 or args.gpus_per_node < 1 or args.gpu_mem <= 0:
            raise ValueError("--gpus, --gpus-per-node and --gpu-mem must be positive")
        if args.gpus > args.gpus_per_node and args.gpus % args.gpus_per_node:
            raise ValueError(f"--gpus {args.gpus} is not whole nodes of {args.gpus_per_node}; use a multiple")
        config, train = train_config(args.model, args.config, args.token_budget)
        cl = Cluster(args.gpus, args.gpu_mem, args.gpus_per_node, mfu=args.mfu)
        print(report(args.model, cl, config, train, args.micro_batches, args.top, args.markdown)[0])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
