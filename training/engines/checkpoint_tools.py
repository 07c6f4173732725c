"""The offline tools on megatron checkpoints (`python -m training.checkpoint reshard|import|export`): an official or
Hugging Face Qwen3 folder into a checkpoint, a checkpoint into another TP/PP layout, a checkpoint's weights out to
the official folder layout. Each runs in one process and moves one decoder layer at a time
(`training.engines.checkpoint_stream`); the format itself is `training.engines.megatron_checkpoint`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from training.checkpoint_integrity import CheckpointError, check_dcp_metadata, verify_checkpoint, write_manifest
from training.engines.megatron_checkpoint import (
    DIST,
    TRAINER,
    check_layout,
    fresh_dir,
    read_trainer,
    single_process,
    t2i_config_from_dict,
)


def import_folder(
    src: Path,
    dst: Path,
    tp: int,
    pp: int,
    model_name: str | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    check_finite: bool = True,
) -> Path:
    """Official T2I folder (`vision_head_config.json` present) or Hugging Face Qwen3 folder -> megatron checkpoint,
    streamed one layer at a time (`checkpoint_stream.import_streaming`). A Qwen3 folder's projector and head start
    fresh (seeded) in the backbone's dtype; `vocab_size` resizes the vocabulary (new rows: the mean); with
    `check_finite` a weight holding NaN/Inf is refused."""
    from training.engines.checkpoint_stream import folder_model_config, import_streaming

    check_layout(folder_model_config(src, model_name, vocab_size), tp, pp)  # before any process group
    single_process(import_streaming, src, dst, tp, pp, model_name, vocab_size, seed, check_finite)
    write_manifest(dst)
    return dst


def export_folder(
    src: Path,
    dst: Path,
    text_tokenizer: Path,
    image_tokenizer: Path,
    weights: str = "auto",
    dtype: str = "bf16",
    checksums: bool = True,
    overwrite: bool = False,
    check_finite: bool = True,
) -> Path:
    """A megatron checkpoint's model (or EMA) weights -> official T2I folder with the given tokenizers, in `dtype`
    (bf16 as the official folders, or fp32), streamed one layer at a time (`checkpoint_stream.export_streaming`).
    The checkpoint's files are verified against its manifest first (sizes only without `checksums`). `dst` must be
    new or empty unless `overwrite` (its files of the same names are then replaced). With `check_finite` a weight
    holding NaN/Inf is refused before its file is written."""
    from models.t2i.text_tokenizer import T2ITextTokenizer
    from models.tokenizer.io import load_tokenizer
    from training.engines.checkpoint_stream import DTYPES, export_streaming

    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"--dst {dst} is a file; give a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(f"--dst {dst} is not empty; give a new or empty folder, or pass --overwrite")
    trainer = read_trainer(src)
    verify_checkpoint(src, checksums)
    check_dcp_metadata(src / DIST)  # before anything unpickles it
    cfg = t2i_config_from_dict(trainer["megatron"]["model"])
    contents = trainer["megatron"]["contents"]
    if weights == "auto":
        weights = "ema" if "ema" in contents else "model"
    if weights not in contents:
        raise CheckpointError(f"{src} holds no {weights} weights (it holds {contents})")
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown export dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    for path in (text_tokenizer, image_tokenizer):
        if not path.exists():
            raise CheckpointError(f"tokenizer {path} does not exist")
    text_tok = T2ITextTokenizer.from_folder(text_tokenizer, cfg.parallel_num)
    image_tok = load_tokenizer(image_tokenizer)
    if len(text_tok) > cfg.llm.vocab_size:
        raise CheckpointError(f"text tokenizer has {len(text_tok)} tokens but the model embeds {cfg.llm.vocab_size}")
    if image_tok.config.z_channels != cfg.latent_dim:
        raise CheckpointError(
            f"image tokenizer makes {image_tok.config.z_channels}-bit tokens; the model predicts {cfg.latent_dim}"
        )
    return single_process(export_streaming, src, dst, cfg, weights, text_tok, image_tok, DTYPES[dtype], check_finite)


def reshard(src: Path, dst: Path, tp: int, pp: int, virtual_pp: int | None = None, checksums: bool = True) -> Path:
    """Rewrite a megatron checkpoint (model, EMA, optimizer state) chunked for a new (tp, pp) layout, in one process
    that holds one source layer of every key at a time (`checkpoint_stream.reshard_streaming`). The source is
    verified against its manifest first (sizes only without `checksums`); the result gets its own."""
    from training.engines.checkpoint_stream import reshard_streaming

    trainer = read_trainer(src)
    verify_checkpoint(src, checksums)
    check_dcp_metadata(src / DIST)  # before anything unpickles it
    cfg = t2i_config_from_dict(trainer["megatron"]["model"])
    check_layout(cfg, tp, pp, virtual_pp)
    fresh_dir(dst)
    single_process(reshard_streaming, src, dst, tp, pp, virtual_pp)
    section = trainer["megatron"]
    section["layout"] = {"tp": tp, "pp": pp, "virtual_pp": virtual_pp, "dp": section["layout"].get("dp")}
    (dst / TRAINER).write_text(json.dumps(trainer, indent=2) + "\n")
    for rank_file in sorted(src.glob("rank_*.pt")):  # RNG and loader states: used when the world layout matches
        shutil.copy2(rank_file, dst / rank_file.name)
    write_manifest(dst)
    return dst
