"""What both GPU checks share: the ~1B check model, synthetic packed rows, device sync and cleanup, and the peak
FLOP/s their MFU is measured against (`training.flops.BF16_PEAK_TFLOPS`)."""

from __future__ import annotations

import argparse
import gc
from dataclasses import replace

import torch

from models.t2i.megatron.batch import pad_packed_batch
from models.t2i.model import T2IConfig, t2i_head_config
from models.t2i.packing import PackedT2IBatch, SyntheticPrefixIds, T2ISample, pack_rows, sample_length
from models.t2i.qwen3 import get_qwen3_config
from training.flops import BF16_PEAK_TFLOPS

FIRST_TEXT_ID = 100  # synthetic text ids are drawn from [FIRST_TEXT_ID, vocab); special ids sit below
PEAK_GPU = "H200"  # the GPU whose dense BF16 peak MFU is reported against unless --peak-tflops says otherwise


def check_config(layers: int = 16) -> T2IConfig:
    """~1.0B T2I model (at 16 layers): Qwen3-style backbone (2048 wide, 16 heads / 8 KV groups of 128, SwiGLU 6144,
    vocab 32768), a 1024-wide 6-block diffusion head, P=16, 32-bit tokens, official image sizes at 16x down."""
    llm = get_qwen3_config(
        "14B",
        vocab_size=32768,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
    )
    head = replace(t2i_head_config(llm.hidden_size, 32, 16), ch_latent=1024)
    return T2IConfig(llm=llm, head=head)


def synthetic_batch(cfg: T2IConfig, seq_len: int, rows: int = 1, seed: int = 0) -> PackedT2IBatch:
    """`rows` rows of exactly `seq_len` positions, each packed with random captions (16-128 ids, 10% without text
    loss) and random ±1 images of the config's sizes up to seq_len / 3 tokens, built by `pack_rows`."""
    g = torch.Generator().manual_seed(seed)
    grids = sorted({cfg.grid(h, w) for h, w in cfg.image_sizes}, key=lambda s: s[0] * s[1])
    grids = [s for s in grids if s[0] * s[1] <= seq_len // 3] or grids[:1]

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (), generator=g))

    packed = []
    for _ in range(rows):
        row, used = [], 0
        while True:
            n_text = randint(16, 129)
            fits = [s for s in grids if used + sample_length(n_text, *s) <= seq_len]
            if not fits:  # shorten the caption to fit the smallest image into what is left, if that can be done
                n_text = min(n_text, seq_len - used - sample_length(0, *grids[0]))
                fits = grids[:1] if n_text >= 16 else []
            if not fits:
                break
            h, w = fits[randint(0, len(fits))]
            ids = torch.randint(FIRST_TEXT_ID, cfg.llm.vocab_size, (n_text,), generator=g).tolist()
            bits = torch.randint(0, 2, (cfg.latent_dim, h, w), generator=g).float() * 2 - 1
            row.append(T2ISample(ids, bits, text_loss=randint(0, 10) > 0))
            used += sample_length(n_text, h, w)
        if not row:
            raise ValueError(f"seq_len {seq_len} holds no sample of the smallest image size {grids[0]}")
        packed.append(row)
    tokens = SyntheticPrefixIds(cfg.parallel_num)
    return pad_packed_batch(pack_rows(packed, tokens, cfg.parallel_num), seq_len, tokens.pad_id)


def add_peak_argument(parser: argparse.ArgumentParser) -> None:
    """`--peak-tflops`, the per-GPU peak MFU is measured against (default: the dense BF16 peak of `PEAK_GPU`)."""
    peak = BF16_PEAK_TFLOPS[PEAK_GPU]
    parser.add_argument(
        "--peak-tflops", type=float, default=peak, help=f"dense BF16 peak for MFU (default {peak:g}, {PEAK_GPU} SXM)"
    )


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gib(nbytes: int) -> float:
    return round(nbytes / 2**30, 2)


def release() -> None:
    """Free what the last measurement left: collect garbage, empty the CUDA cache, reset the peak-memory counter."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
