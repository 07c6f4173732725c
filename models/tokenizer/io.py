"""Loading and saving binary tokenizers in the official file layouts (safetensors + config json, or .pt).

Layouts: ``ae[_<name>].safetensors`` beside ``ae[_<name>]_config.json`` ({"ddconfig": {...}, "gan_decoder":
bool}), or the ImageNet torch file ``ae_d16c32.pt`` holding {"state_dict": ...}. A config json beside
the weights always wins; without one the named config (from the file name, else d16c32) is used, with
``gan_decoder`` inferred from the width of ``decoder.conv_in``. Key prefixes "module.", "_orig_mod." and
"vae." are stripped.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.core.safetensors_file import load_file
from models.core.state_dict import load_state_dict_strict, strip_prefixes
from models.tokenizer.model import TOKENIZER_CONFIGS, BinaryAutoencoder, TokenizerConfig

_PREFIXES = ("module.", "_orig_mod.", "vae.")
_SUFFIXES = (".safetensors", ".pt")


def _find_weights(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer weights at {path}")
    for suffix in _SUFFIXES:
        found = sorted(path.glob(f"ae*{suffix}"))
        if len(found) > 1:
            raise ValueError(f"several tokenizer weight files in {path}: {[p.name for p in found]}; pass one")
        if found:
            return found[0]
    raise FileNotFoundError(f"no ae*.safetensors or ae*.pt tokenizer weights in {path}")


def _name_of(weights: Path) -> str:
    stem = weights.stem
    return stem[3:] if stem.startswith("ae_") else stem


def _read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    if weights.suffix == ".safetensors":
        state = load_file(weights)  # the checked reader: a malformed header is one line
    else:
        obj = torch.load(weights, map_location="cpu", weights_only=True)
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{weights} holds no tensor state dict (expected a 'state_dict' entry)")
    return strip_prefixes(state, _PREFIXES)


def _config_for(weights: Path, state: dict[str, torch.Tensor]) -> TokenizerConfig:
    name = _name_of(weights)
    config_json = weights.with_name(f"{weights.stem}_config.json")
    if config_json.is_file():
        meta = json.loads(config_json.read_text())
        gan = bool(meta.get("gan_decoder", False))
        return TokenizerConfig.from_ddconfig(meta["ddconfig"], gan, name=name)
    if name not in TOKENIZER_CONFIGS and weights.suffix != ".pt":
        raise FileNotFoundError(f"no {config_json.name} beside {weights} and {name!r} is not a known config")
    base = TOKENIZER_CONFIGS.get(name, TOKENIZER_CONFIGS["d16c32"])
    conv_in = state.get("decoder.conv_in.weight")
    gan = conv_in is not None and conv_in.shape[1] == 2 * base.z_channels
    return TokenizerConfig.from_ddconfig(base.to_ddconfig(), gan, name=base.name)


def load_tokenizer(path_or_dir: str | Path, device: str | torch.device = "cpu") -> BinaryAutoencoder:
    """Load a tokenizer (weights file or folder holding one) strictly; eval mode, checkpoint dtype."""
    weights = _find_weights(Path(path_or_dir))
    state = _read_state_dict(weights)
    cfg = _config_for(weights, state)
    with torch.device("meta"):
        model = BinaryAutoencoder(cfg)
    load_state_dict_strict(model, state, what=f"tokenizer {cfg.name} ({weights})", assign=True)
    return model.to(device).eval()


def save_tokenizer(
    model: BinaryAutoencoder, cfg: TokenizerConfig, out_dir: str | Path, name: str | None = None
) -> Path:
    """Write ``ae[_<name>].safetensors`` + ``ae[_<name>]_config.json`` into out_dir; returns the weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ae_{name}" if name else "ae"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = out / f"{stem}.safetensors"
    save_file(state, str(weights))
    meta = {"ddconfig": cfg.to_ddconfig(), "gan_decoder": cfg.gan_decoder}
    (out / f"{stem}_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return weights
