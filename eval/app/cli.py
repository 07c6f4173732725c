"""The command line of `python -m eval.app`: the model flags (`loading`), the server's and the page's limits; the
model is loaded once, then the page is served until interrupted. Errors before serving (a bad --model, a bad flag)
are one line (`--debug` or BITDANCE_DEBUG=1: the traceback)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from eval.app.loading import add_model_arguments, default_device, load_model
from eval.app.session import MAX_CFG, MAX_STEPS, Session
from training.cli_errors import add_debug_flag, one_line_errors

PROG = "python -m eval.app"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="A web playground for one trained BitDance model.")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on; 0: a free one")
    p.add_argument("--out", help="folder for the generated files (default: a new temporary folder)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-images", type=int, default=8, help="images a request may ask for")
    p.add_argument("--batch-size", type=int, default=4, help="images per sampler call (does not change the images)")
    p.add_argument("--max-prompt-tokens", type=int, help="text budget of a prompt (default: what the model allows)")
    p.add_argument("--class-names", help="class-conditional models: names (JSON {index: name} or one a line)")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait for their turn")
    add_debug_flag(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be in [0, 65535], got {args.port}")
    for flag in ("max_images", "batch_size", "max_prompt_tokens", "queue_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        p.error(f"--steps must be in [1, {MAX_STEPS}], got {args.steps}")
    if args.cfg_scale is not None and not 0 <= args.cfg_scale <= MAX_CFG:
        p.error(f"--cfg-scale must be in [0, {MAX_CFG:g}], got {args.cfg_scale}")
    if args.class_names is not None and not Path(args.class_names).is_file():
        p.error(f"--class-names {args.class_names} is not a file")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors(PROG, args.debug):
        device = torch.device(args.device) if args.device else default_device()
        loaded = load_model(args, device)
        session = Session(
            loaded,
            device,
            args.max_images,
            args.batch_size,
            args.max_prompt_tokens,
            Path(args.class_names) if args.class_names else None,
        )
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bitdance-app-"))
        out.mkdir(parents=True, exist_ok=True)
        print(f"{session.title}: files go to {out}", flush=True)
        from eval.app.page import serve  # gradio is imported once the model has loaded

        serve(session, out, args.host, args.port, args.queue_size)
