"""`python -m cluster.plan`: the planner's command line (the table and command of one cluster, a model's fine-tuning
memory with `--finetune`, or the 14B report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cluster.plan
from cluster.plan.report import full_report, report
from cluster.plan.search import ASSUMED_MFU, Cluster, load_train_config, train_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.plan", description=cluster.plan.__doc__.split("\n")[0])
    ap.add_argument("--model", default="14B-16x", help="T2I config name (14B-16x, 14B-64x)")
    ap.add_argument("--config", help="training YAML (default: the model's t2i_14b_*.yaml)")
    ap.add_argument("--gpus", type=int, help="GPUs (default: 8; with --finetune 1, the data-parallel size)")
    ap.add_argument(
        "--gpu-mem", type=float, help="GiB per GPU (H200: 141, H100: 80; default: 141; with --finetune: 80 and 24)"
    )
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--token-budget", type=int, help="positions per packed row (default: the YAML's)")
    ap.add_argument("--micro-batches", type=int, help="micro-batches per step per pipeline (default: from the YAML)")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--mfu", type=float, default=ASSUMED_MFU)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--report", help="write the 14B tables (both models, H200 and H100 clusters) to this file")
    ap.add_argument("--finetune", help="the fine-tuning memory of --model under this finetune.method: lora, head, full")
    ap.add_argument("--lora-rank", type=int, help="finetune.lora.rank (default: the config's)")
    ap.add_argument("--offload", help="engine.offload: none, optimizer or params (default: each)")
    ap.add_argument("--zero-stage", type=int, help="engine.zero_stage (default: 3 with --offload params, else 2)")
    args = ap.parse_args(argv)
    tuning = args.finetune is not None
    if args.gpus is None:
        args.gpus = 1 if tuning else 8
    try:
        if args.report:
            from cluster.plan.finetune_report import finetune_section

            Path(args.report).write_text(full_report() + "\n" + finetune_section() + "\n")
            print(f"wrote {args.report}")
            return 0
        if tuning:
            return finetune(args)
        args.gpu_mem = 141.0 if args.gpu_mem is None else args.gpu_mem
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


def finetune(args: argparse.Namespace) -> int:
    """`--finetune`: the memory table of --model's fine-tuning runs (--offload or each) on --gpus GPUs."""
    from cluster.plan.finetune_report import SINGLE_GPUS, finetune_table
    from training.engines.deepspeed import OFFLOADS

    if args.gpus < 1 or (args.gpu_mem is not None and args.gpu_mem <= 0):
        raise ValueError("--gpus and --gpu-mem must be positive")
    _, train = load_train_config(args.model, args.config, args.token_budget)
    offloads = OFFLOADS if args.offload is None else (args.offload,)
    mems = SINGLE_GPUS if args.gpu_mem is None else (args.gpu_mem,)
    table = finetune_table(
        args.model, train, (args.finetune,), offloads, args.lora_rank, args.zero_stage, args.gpus, mems, args.markdown
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
