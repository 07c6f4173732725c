"""Tiny stand-ins for the paths the README's commands name (/data/tars, /models/BitDance-14B-16x, ae_d16c32.pt, ...),
laid out in one workspace folder: an absolute README path /x/y is <workspace>/x/y, a relative one is relative to the
workspace, where the commands run (tests/test_readme_commands.py).

Sizes: 32x32 and 32x64 shapes images, the 2x "tiny" binary tokenizer (16-bit tokens), tiny Qwen3 backbones (128 wide)
whose head and layer counts admit the README's layouts: the Qwen3-14B stand-in has 10 layers (pp=2 x virtual_pp=5)
and 4 heads / 2 KV heads (tp=2); the BitDance-14B-16x stand-in has 4 layers (pp=4, pp=2) and 8 heads / 8 KV heads
(tp=8, tp=4). Vocabularies keep the released ones' proportions (see QWEN3_ROWS)."""

from __future__ import annotations

import io
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_pipeline.shapes import benchmark_prompts, write_shapes_dataset
from models.c2i.io import save_c2i_checkpoint
from models.c2i.model import ClassConditionalBitDance, get_c2i_config
from models.t2i.io import export_t2i_folder, write_llm_config
from models.t2i.model import TextToImageBitDance, get_t2i_config
from models.t2i.text_tokenizer import T2ITextTokenizer, build_chat_tokenizer
from models.tokenizer.io import save_tokenizer
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config

SIZES = ((32, 32), (32, 64))  # T2I buckets of the tiny models (the README's data would use 256..1024 px buckets)
CLASS_COLORS = [(220, 30, 30), (30, 200, 60), (40, 60, 230), (230, 210, 40)]
# The stand-in Qwen3 tokenizer's size (Qwen3's: 151,669) and its embedding rows, rounded up to a multiple of 128 as
# Qwen3-14B's 151,936 are: fewer spare rows than the 256 resolution + 15 query tokens the T2I tokenizer adds.
TEXT_TOKENS, QWEN3_ROWS = 300, 384
T2I_TOKENS = TEXT_TOKENS + 256 + 15  # the P=16 data's text vocabulary (the 16x folder's tokenizer)
OFFICIAL_ROWS = 640  # the 16x stand-in folder's rows: room for the 48 more query tokens of P=64 (the distillation)
DATA_VOCAB_ROWS = 576  # `--vocab-size` of an import for the P=16 data: T2I_TOKENS rounded up to a multiple of 64


def _t2i_model(name: str, vocab_size: int, seed: int, **llm) -> TextToImageBitDance:
    """A tiny T2I model whose head gets random weights (it is zero-initialised: sampling would give flat images)."""
    cfg = get_t2i_config(name)
    cfg = replace(cfg, llm=replace(cfg.llm, vocab_size=vocab_size, **llm))
    torch.manual_seed(seed)
    model = TextToImageBitDance(cfg)
    with torch.no_grad():
        for p in model.vision_head.parameters():
            p.normal_(0, 0.05)
    return model


def _image_bytes(color: tuple[int, int, int], size: int = 40) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def build_workspace(ws: Path) -> None:
    """Write every stand-in into `ws` (a few seconds)."""
    ws.mkdir(parents=True, exist_ok=True)
    prompts = [p["prompt"] for p in benchmark_prompts()]

    # /data/tars: webdataset shards of captioned shapes images; data/shapes_raw (tiny_tokenizer.yaml's data_dir): the
    # same shards (build/: intermediate files)
    write_shapes_dataset(ws / "data" / "tars", 32, sizes=SIZES, samples_per_shard=16)
    (ws / "data" / "shapes_raw").symlink_to("tars")

    # /data/imagenet/train: class folders <wnid>/<image>, and imagenet_classes.txt (one wnid per line)
    wnids = [f"n{label:08d}" for label in range(len(CLASS_COLORS))]
    for label, wnid in enumerate(wnids):
        folder = ws / "data" / "imagenet" / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(4):
            (folder / f"{wnid}_{i}.png").write_bytes(_image_bytes(CLASS_COLORS[label], 40 + 4 * i))
    (ws / "imagenet_classes.txt").write_text("".join(w + "\n" for w in wnids))

    # /data/hq: a parquet file of image bytes, captions and an `aesthetic` score column
    import pyarrow as pa
    import pyarrow.parquet as pq

    (ws / "data" / "hq").mkdir(parents=True)
    rows = [(CLASS_COLORS[i % 4], prompts[i % len(prompts)], 4.0 + i / 4) for i in range(8)]
    table = pa.table(
        {
            "image": [_image_bytes(c, 32) for c, _, _ in rows],
            "caption": [t for _, t, _ in rows],
            "aesthetic": [s for _, _, s in rows],
        }
    )
    pq.write_table(table, ws / "data" / "hq" / "hq-000000.parquet")

    # image tokenizers: the tiny one under every name the README uses
    ae_cfg = get_tokenizer_config("tiny")
    torch.manual_seed(0)
    ae = BinaryAutoencoder(ae_cfg)
    save_tokenizer(ae, ae_cfg, ws / "models" / "BitDance-Tokenizer", name="d16c32")  # ae_d16c32.safetensors + json
    for folder in (ws, ws / "weights"):  # ae_d16c32.pt (README) and weights/ae_d16c32.pt (imagenet_*.yaml)
        folder.mkdir(exist_ok=True)
        torch.save({"state_dict": ae.state_dict()}, folder / "ae_d16c32.pt")
        # the config json beside the .pt names the tiny architecture (the file name alone would mean d16c32)
        shutil.copy(ws / "models" / "BitDance-Tokenizer" / "ae_d16c32_config.json", folder / "ae_d16c32_config.json")

    # /models/BitDance-14B-16x: an official-layout T2I folder, P=16, whose text tokenizer is the data's
    qwen_tokenizer = build_chat_tokenizer(prompts, ws / "build" / "bpe", vocab_size=TEXT_TOKENS)
    text16 = T2ITextTokenizer.from_folder(qwen_tokenizer, 16)
    assert len(text16) == T2I_TOKENS, len(text16)
    heads = dict(num_attention_heads=8, num_key_value_heads=8, head_dim=16)
    official = _t2i_model("tiny-16x", OFFICIAL_ROWS, 1, num_hidden_layers=4, **heads)
    export_t2i_folder(official, text16, ae, ws / "models" / "BitDance-14B-16x")

    # /models/Qwen3-14B: a Hugging Face Qwen3 folder (config, weights and the plain tokenizer)
    hf = ws / "models" / "Qwen3-14B"
    hf.mkdir(parents=True)
    qwen = _t2i_model("tiny-16x", QWEN3_ROWS, 2, num_hidden_layers=10)
    write_llm_config(hf, qwen.cfg.llm, torch.float32)
    state = {k: v.detach().contiguous() for k, v in qwen.llm.state_dict().items()}
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(qwen_tokenizer, hf, dirs_exist_ok=True)

    # the released ImageNet checkpoints' names: {"model", "ema"} torch files with the tokenizer under vae., of the tiny
    # config with the same P
    for name, config in (("B_16X", "tiny-16x"), ("B_1X", "tiny-1x"), ("H_1X", "tiny-1x")):
        torch.manual_seed(3)
        model = ClassConditionalBitDance(get_c2i_config(config))
        save_c2i_checkpoint(ws / f"BitDance_{name}.pt", model, ae, ema=model)
