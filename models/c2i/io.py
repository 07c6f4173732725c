"""Official class-conditional (ImageNet) checkpoints in and out: torch files with "model" and/or "ema".

The official training code keeps the frozen tokenizer as a submodule `vae`, so its weights appear in the
same dict under `vae.`; here they are split off into a separate `BinaryAutoencoder`. A checkpoint without
them takes the tokenizer from its own file (`ae_d16c32.pt` or `ae_*.safetensors`), which also overrides
weights found in the checkpoint, as the official sampler does. Everything loads with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.c2i.model import C2IConfig, ClassConditionalBitDance
from models.core.state_dict import load_state_dict_strict, strip_prefixes
from models.tokenizer.io import load_tokenizer
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_c2i_state_dict(path: str | Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The "ema" (default, when present) or "model" state dict of an official checkpoint file."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a checkpoint dict with 'model' or 'ema' entries")
    key = "ema" if use_ema and "ema" in obj else "model"
    if key not in obj:
        raise ValueError(f"{path} has neither 'model' nor 'ema' state dict (found keys: {sorted(obj)[:10]})")
    return strip_prefixes(obj[key], WRAPPER_PREFIXES)


def split_tokenizer_weights(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(model weights, tokenizer weights with the `vae.` prefix removed)."""
    vae = {k[len("vae.") :]: v for k, v in state.items() if k.startswith("vae.")}
    rest = {k: v for k, v in state.items() if not k.startswith("vae.")}
    return rest, vae


def load_c2i_checkpoint(
    path: str | Path,
    cfg: C2IConfig,
    use_ema: bool = True,
    tokenizer_path: str | Path | None = None,
) -> tuple[ClassConditionalBitDance, BinaryAutoencoder]:
    """Build the model for `cfg`, load the official checkpoint strictly, and return (model, tokenizer)."""
    state, vae_state = split_tokenizer_weights(read_c2i_state_dict(path, use_ema))
    query = state.get("query_token")
    if cfg.parallel_num == 1 and query is not None and query.numel() == 0:
        state.pop("query_token")  # the patch-parallel code keeps an empty [1, 0, dim] tensor for P = 1
    model = ClassConditionalBitDance(cfg)
    load_state_dict_strict(model, state, what=f"class-conditional BitDance ({path})")
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
    elif vae_state:
        tokenizer = BinaryAutoencoder(get_tokenizer_config(cfg.tokenizer))
        load_state_dict_strict(tokenizer, vae_state, what=f"tokenizer under 'vae.' in {path}")
    else:
        raise ValueError(f"{path} carries no 'vae.' tokenizer weights; pass the tokenizer file (e.g. ae_d16c32.pt)")
    if tokenizer.config.z_channels != cfg.latent_dim:
        raise ValueError(
            f"tokenizer makes {tokenizer.config.z_channels}-bit tokens but the model expects {cfg.latent_dim}"
        )
    return model.eval(), tokenizer.eval()


def save_c2i_checkpoint(
    path: str | Path,
    model: ClassConditionalBitDance,
    tokenizer: BinaryAutoencoder | None = None,
    ema: ClassConditionalBitDance | None = None,
) -> None:
    """Write the official layout: {"model": ..., "ema": ...}, each with the tokenizer under `vae.`."""

    def one(m: ClassConditionalBitDance) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().cpu() for k, v in m.state_dict().items()}
        if tokenizer is not None:
            sd.update({f"vae.{k}": v.detach().cpu() for k, v in tokenizer.state_dict().items()})
        return sd

    out = {"model": one(model)}
    if ema is not None:
        out["ema"] = one(ema)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
