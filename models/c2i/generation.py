"""The class-conditional family's sampling adapter (`ModelFamily.generator`, used by `eval.generate`): its model
flags, the checkpoint loaded once (its config recognised from the file), and a batch of class ids with one generator
per image turned into ±1 bits."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.c2i.model import get_c2i_config
from models.c2i.presets import recognise_c2i_checkpoint
from models.core.head_sampler import Generators
from models.core.sampling import SamplingConfig


class C2IGenerator:
    """Samples class ids with the checkpoint `--model`."""

    @staticmethod
    def add_arguments(flags) -> None:
        flags.add_argument("--model-config", help="the model's config name (default: recognised from the file)")
        flags.add_argument("--tokenizer", help="tokenizer file when the checkpoint has no vae. weights")
        flags.add_argument("--no-ema", action="store_true", help="the 'model' weights even when 'ema' exists")

    @staticmethod
    def resolve(args: argparse.Namespace) -> str | None:
        """Sets args.model_config (given, else the recognised config, else the preset's); returns the config the
        file is recognised as, or None. A ValueError says what is wrong with the flags."""
        if not Path(args.model).is_file():
            raise ValueError(f"--model {args.model} is not a checkpoint file")
        try:
            recognised = recognise_c2i_checkpoint(args.model)
        except Exception as err:  # not a torch file, or one that needs unpickling beyond tensors
            raise ValueError(
                f"--model {args.model} is not a readable class-conditional checkpoint ({type(err).__name__})"
            ) from None
        if args.model_config is None:
            args.model_config = recognised or args.preset
        if args.model_config is None:
            raise ValueError(f"{args.model} matches no named model config; pass --model-config (e.g. B-16x, tiny-4x)")
        try:
            get_c2i_config(args.model_config)
        except ValueError as err:
            raise ValueError(f"--model-config: {err}") from None
        return recognised

    def __init__(self, args: argparse.Namespace, device: torch.device):
        from models.c2i.io import load_c2i_checkpoint

        cfg = get_c2i_config(args.model_config)
        self.model, self.ae = load_c2i_checkpoint(
            args.model, cfg, use_ema=not args.no_ema, tokenizer_path=args.tokenizer
        )
        self.device = device
        self.model.to(device).eval()
        self.ae.to(device).eval()

    def bits(self, classes: list[int], sampling: SamplingConfig, generators: Generators) -> torch.Tensor:
        """±1 latent grids [len(classes), C, h, w], image i drawn from generators[i]."""
        from models.c2i.sampler import sample_class_conditional

        labels = torch.tensor(classes, device=self.device)
        return sample_class_conditional(self.model, labels, sampling, generators)
