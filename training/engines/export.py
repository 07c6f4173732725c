"""A training checkpoint's EMA weights out to an official-layout T2I folder, per engine (`EngineBase.export_checkpoint`,
used by `eval.watch`): `export_checkpoint` picks the engine that wrote the checkpoint (its config's `engine.kind`).

- megatron: the streaming tool (`checkpoint_tools.export_folder`, one decoder layer at a time) in fp32.
- DeepSpeed: the task's model built on the meta device from the checkpoint's config (nothing allocated), then
  `model.safetensors` (every tensor) with the EMA over it: `ema.safetensors` under ZeRO 0-2; under ZeRO-3 each rank's
  `rank_*.pt` "ema" holds its flat partition of every parameter (training.ema: the EMA of `ds_tensor`, partition r =
  elements [r*n, (r+1)*n) of the flattened parameter, padding at the end), concatenated in rank order, cut to the
  parameter's size and shaped like it. Written in fp32 with `models.t2i.io.export_t2i_folder`; weights holding NaN/Inf
  are refused.

Each runs on CPU in one process without a process group; the checkpoint's files are verified against its manifest
first. `read_weights` reads a DeepSpeed checkpoint's weight files through the checked safetensors reader for the
export and for the engine's resume, a malformed file being a one-line CheckpointError.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.core.safetensors_file import SafetensorsError, check_finite, load_file
from training.checkpoint_integrity import CheckpointError, verify_checkpoint

WRAPPER = "_checkpoint_wrapped_module."  # in parameter (EMA) names under activation checkpointing, not in state dicts


def export_checkpoint(checkpoint: Path, dst: Path, text_tokenizer: Path, image_tokenizer: Path) -> Path:
    """The EMA weights of `checkpoint` as an official T2I folder `dst`, by the engine that wrote it."""
    from training.engines import ENGINES

    trainer = read_trainer_json(checkpoint)
    kind = trainer["config"]["engine"]["kind"]
    return ENGINES.get(kind).export_checkpoint(checkpoint, dst, text_tokenizer, image_tokenizer)


def read_trainer_json(checkpoint: Path) -> dict:
    path = Path(checkpoint) / "trainer.json"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} is not a checkpoint (no trainer.json); pass a step_* folder")
    trainer = json.loads(path.read_text())
    if "config" not in trainer:
        raise CheckpointError(f"{path} holds no run config; export it with `python -m training.checkpoint export`")
    return trainer


def export_megatron(checkpoint: Path, dst: Path, text_tokenizer: Path, image_tokenizer: Path) -> Path:
    from training.engines.checkpoint_tools import export_folder

    return export_folder(Path(checkpoint), Path(dst), Path(text_tokenizer), Path(image_tokenizer), "ema", "fp32")


def export_deepspeed(checkpoint: Path, dst: Path, text_tokenizer: Path, image_tokenizer: Path) -> Path:
    from models.core.state_dict import load_state_dict_strict
    from models.t2i.io import export_t2i_folder
    from models.t2i.model import TextToImageBitDance
    from models.t2i.text_tokenizer import T2ITextTokenizer
    from models.tokenizer.io import load_tokenizer

    checkpoint = Path(checkpoint)
    trainer = read_trainer_json(checkpoint)
    verify_checkpoint(checkpoint)
    model = meta_model(trainer["config"])
    if not isinstance(model, TextToImageBitDance):
        raise CheckpointError(f"{checkpoint} holds a {type(model).__name__}; only text-to-image runs export here")
    state = read_weights(checkpoint, "model.safetensors")
    state.update(ema_weights(checkpoint, trainer, {k: v.shape for k, v in state.items()}))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        check_finite(state, f"the exported weights of {checkpoint}")
    except SafetensorsError as err:
        raise CheckpointError(str(err)) from None
    load_state_dict_strict(model, state, f"the model of {checkpoint}", assign=True)
    text = T2ITextTokenizer.from_folder(text_tokenizer, model.cfg.parallel_num)
    return export_t2i_folder(model, text, load_tokenizer(image_tokenizer), dst)


def read_weights(checkpoint: Path, name: str) -> dict[str, torch.Tensor]:
    """A DeepSpeed checkpoint's weight file (`model.safetensors`, `ema.safetensors`) through the checked reader, for
    the export here and the engine's resume; a malformed one is a one-line CheckpointError."""
    try:
        return load_file(checkpoint / name)
    except SafetensorsError as err:
        raise CheckpointError(f"{err}; checkpoint {checkpoint.name} cannot be loaded: use an earlier one") from None


def meta_model(config: dict) -> torch.nn.Module:
    """The model the run's task builds from its config (`trainer.json` "config"), on the meta device."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from training.config import TrainConfig
    from training.tasks import build_task

    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), config))
    except OmegaConfBaseException as e:
        raise CheckpointError(f"the checkpoint's config does not load here: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        return build_task(cfg, torch.device("meta")).model


def ema_weights(checkpoint: Path, trainer: dict, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """{state-dict name: EMA tensor} of a DeepSpeed checkpoint: `ema.safetensors` (ZeRO 0-2), else the ZeRO-3
    partitions in every rank's file, each parameter whole again."""

    if (checkpoint / "ema.safetensors").is_file():
        return {k.replace(WRAPPER, ""): v for k, v in read_weights(checkpoint, "ema.safetensors").items()}
    files = [checkpoint / f"rank_{r:05d}.pt" for r in range(int(trainer["world_size"]))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{checkpoint} has no ema.safetensors and lacks {missing[0]} (its ZeRO-3 EMA partition)")
    parts = [torch.load(f, map_location="cpu", weights_only=True, mmap=True)["ema"] for f in files]
    out = {}
    for key in parts[0]:
        name = key.replace(WRAPPER, "")
        flat = torch.cat([p[key].reshape(-1) for p in parts])
        out[name] = flat[: shapes[name].numel()].view(shapes[name]).clone()
    return out
