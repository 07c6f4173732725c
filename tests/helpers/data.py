"""Small tokenized datasets and run configs shared by the training tests (built once per session)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import torch

from data_pipeline.shapes import benchmark_prompts, write_shapes_dataset
from data_pipeline.tokenize import TokenizeConfig, run_tokenize
from models.t2i.text_tokenizer import build_chat_tokenizer
from models.tokenizer.io import save_tokenizer
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config


def make_t2i_data(root: Path, samples: int = 96, parallel_num: int = 4) -> dict[str, Path]:
    write_shapes_dataset(root / "raw", samples, sizes=((32, 32), (32, 64)), samples_per_shard=24)
    cfg = get_tokenizer_config("tiny")
    torch.manual_seed(0)
    save_tokenizer(BinaryAutoencoder(cfg), cfg, root / "ae", name="tiny")
    text = build_chat_tokenizer([p["prompt"] for p in benchmark_prompts()], root / "text", vocab_size=400)
    tok = TokenizeConfig(
        source="wds",
        input=str(root / "raw"),
        output=str(root / "tokens"),
        tokenizer=str(root / "ae"),
        text_tokenizer=str(text),
        parallel_num=parallel_num,
        sizes=[(32, 32), (32, 64)],
    )
    run_tokenize(tok, local=True)
    return {"tokens": root / "tokens", "ae": root / "ae", "text": text}


def tiny_t2i_folder(root: Path, head_std: float | None = 0.05) -> Path:
    """A tiny exported text-to-image folder under `root` (tiny-4x, a 300-piece text vocabulary, the tiny image
    tokenizer; seed 0). `head_std`: the diffusion head's weights redrawn at that scale, so its samples vary."""
    from dataclasses import replace

    from models.t2i.io import export_t2i_folder
    from models.t2i.model import TextToImageBitDance, get_t2i_config
    from models.t2i.text_tokenizer import T2ITextTokenizer

    text = T2ITextTokenizer.from_folder(build_chat_tokenizer(["a photo of a cat"], root / "tok", 300), 4)
    cfg = get_t2i_config("tiny-4x")
    torch.manual_seed(0)
    model = TextToImageBitDance(replace(cfg, llm=replace(cfg.llm, vocab_size=len(text))))
    if head_std is not None:
        with torch.no_grad():
            for p in model.vision_head.parameters():
                p.normal_(0, head_std)
    return export_t2i_folder(model, text, BinaryAutoencoder(get_tokenizer_config("tiny")), root / "model")


def make_c2i_data(root: Path, ae: Path, samples: int = 64) -> Path:
    from PIL import Image

    for label in range(4):
        (root / "in" / f"n{label:04d}").mkdir(parents=True, exist_ok=True)
    for i in range(samples):
        color = [(220, 30, 30), (30, 200, 60), (40, 60, 230), (230, 210, 40)][i % 4]
        Image.new("RGB", (40, 40), color).save(root / "in" / f"n{i % 4:04d}" / f"{i}.png")
    cfg = TokenizeConfig(
        source="imagenet",
        input=str(root / "in"),
        output=str(root / "tokens"),
        mode="imagenet",
        tokenizer=str(ae),
        image_size=32,
        samples_per_shard=16,
    )
    run_tokenize(cfg, local=True)
    return root / "tokens"


def make_tokenizers(root: Path) -> tuple[Path, Path]:
    """(text tokenizer folder, image tokenizer folder): a small chat BPE and a seeded tiny binary tokenizer."""
    text = build_chat_tokenizer(["a red circle", "two blue squares"], root / "text")
    cfg = get_tokenizer_config("tiny")
    torch.manual_seed(0)
    save_tokenizer(BinaryAutoencoder(cfg), cfg, root / "ae", name="tiny")
    return text, root / "ae"


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A webdataset tar of (member name, payload) pairs, in order; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path
