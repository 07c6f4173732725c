"""The text-to-image family's sampling adapter (`ModelFamily.generator`, used by `eval.generate`): its model flags,
the official-layout folder loaded once, and a batch of prompts with one generator per image turned into ±1 bits."""

from __future__ import annotations

import argparse

import torch

from models.core.head_sampler import Generators
from models.core.sampling import SamplingConfig
from models.t2i.presets import recognise_t2i_folder


def image_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes look like 512x512 (HxW), got {text!r}") from None
    return h, w


class T2IGenerator:
    """Samples prompts at `--height` x `--width` with the folder `--model` (and the adapter `--lora`, unmerged)."""

    @staticmethod
    def add_arguments(flags) -> None:
        flags.add_argument("--height", type=int, default=1024)
        flags.add_argument("--width", type=int, default=1024)
        flags.add_argument(
            "--image-size",
            action="append",
            type=image_size,
            help="supported HxW sizes of the model (default: official)",
        )
        flags.add_argument(
            "--lora",
            help="a LoRA adapter folder (PEFT's save_pretrained) applied unmerged to --model (models/t2i/lora.py)",
        )

    @staticmethod
    def resolve(args: argparse.Namespace) -> str | None:
        """The preset the folder is recognised as, or None; a ValueError for a --lora folder that is no adapter or
        records another base."""
        if args.lora is not None:
            from models.t2i.lora import check_base, read_adapter_config

            read_adapter_config(args.lora)
            check_base(args.lora, args.model)
        return recognise_t2i_folder(args.model)

    def __init__(self, args: argparse.Namespace, device: torch.device):
        from models.t2i.io import load_t2i_folder

        sizes = args.image_size  # [(h, w), ...] or None: the official list
        self.model, self.text, self.ae = load_t2i_folder(args.model, image_sizes=sizes, device=str(device))
        if args.lora is not None:
            from models.t2i.lora import apply_adapter

            apply_adapter(self.model, args.lora)  # in place: self.model samples with the adapter, unmerged
        try:
            self.model.cfg.grid(args.height, args.width)
        except ValueError as err:
            raise SystemExit(f"{err} (--height/--width, or list the size with --image-size)") from None
        self.height, self.width = args.height, args.width
        self.model.to(device).eval()
        self.ae.to(device).eval()

    def bits(self, prompts: list[str], sampling: SamplingConfig, generators: Generators) -> torch.Tensor:
        """±1 latent grids [len(prompts), C, h, w], image i drawn from generators[i]."""
        from models.t2i.sampler import sample_t2i

        return sample_t2i(self.model, self.text, prompts, self.height, self.width, sampling, generators)
