"""Device memory of sampling one text-to-image picture under each low-memory inference mode
(`models.core.low_memory`: fp32 / bf16 / int8 weights, with or without offloading the decoder layers), and the
table of the 14B models.

    python -m cluster.plan.inference [--height 1024 --width 1024 --prompt-tokens 256 --gpu-mem 24] [--markdown]

Per component, for batch 1 with classifier-free guidance (2 rows):
- weights: the parameters resident on the device, exact from the modules (`low_memory.weight_bytes` on a meta-device
  model): everything, or with offload all but the decoder layers plus one of them (two while prefetching on CUDA);
  the offloaded layers sit in host memory ("host").
- image tokenizer: its weights as loaded (fp32); it stays on the device to decode. Its decoding activations (after
  the KV cache is gone) are not counted.
- KV cache: keys and values of every layer for all positions (prompt + prefix + image tokens - P), preallocated.
- activations: the largest working set beyond those: one layer's prefill tensors (residual, norm, q/k/v, the fp32
  RoPE copies, attention output, the three MLP tensors, the attention mask and its float form) or, in int8 mode plus
  the largest linear's weight dequantized to bf16 (torchao's eager weight-only matmul).
Not counted: the CUDA context and allocator slack (about 0.5-1 GiB), so the "fits" column keeps `HEADROOM_GIB` free.
What offload costs in time: every forward (the prefill and each next-patch step) copies all decoder layers to the
device, `copied` bytes per image; the table turns that into seconds at `PCIE_BYTES_PER_S` (pinned PCIe 4.0 x16), a
lower bound on the time it adds when the copies are not hidden behind compute.
tests/models/test_low_memory.py checks the total against the measured peak of a small model on CPU.
"""

from __future__ import annotations

import argparse
import sys

import torch

from models.core.low_memory import WEIGHT_MODES, decoder_layers, layer_linears, weight_bytes, weight_mode
from models.t2i.model import T2IConfig, TextToImageBitDance, get_t2i_config
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config

GiB = 1024**3
PROMPT_TOKENS = 256  # a long prompt with the chat template (GenEval's rewritten prompts and DPG's stay below)
HEADROOM_GIB = 1.0  # CUDA context, cuBLAS workspace and allocator slack, for the "fits" column
PCIE_BYTES_PER_S = 25e9  # pinned host-to-device copies over PCIe 4.0 x16, for the offload time column
TABLE_MODELS = ("14B-16x", "14B-64x")

_META: dict[str, tuple[TextToImageBitDance, int]] = {}


def meta_model(cfg: T2IConfig) -> tuple[TextToImageBitDance, int]:
    """The model built on the meta device (shapes only) and its image tokenizer's parameter count."""
    key = repr((cfg.llm, cfg.head, cfg.tokenizer))
    if key not in _META:
        with torch.device("meta"):
            model = TextToImageBitDance(cfg)
            ae = BinaryAutoencoder(get_tokenizer_config(cfg.tokenizer))
        _META[key] = model, sum(p.numel() for p in ae.parameters())
    return _META[key]


def sampling_memory(
    cfg: T2IConfig,
    mode: str,
    offload: bool = False,
    height: int | None = None,
    width: int | None = None,
    prompt_tokens: int = PROMPT_TOKENS,
    prefetch: bool = True,
    images: int = 1,
    guided: bool = True,
) -> dict[str, int]:
    """Bytes on the device while sampling `images` pictures of height x width (default: the largest supported
    size), by component: weights, tokenizer, kv_cache, activations and their total; host: the offloaded layers;
    copied: what offload copies to the device per sampling call."""
    if height is None or width is None:
        height, width = max(cfg.image_sizes, key=lambda hw: hw[0] * hw[1])
    model, ae_params = meta_model(cfg)
    weights = weight_bytes(model, mode, offload, prefetch)
    b = torch.empty((), dtype=weight_mode(mode).dtype).element_size()
    m, P = cfg.llm, cfg.parallel_num
    gh, gw = cfg.grid(height, width)
    rows = images * (2 if guided else 1)
    L = prompt_tokens + 3 + P - 1  # prompt, <|vision_start|> <|res_h|> <|res_w|>, P - 1 queries
    positions = L + gh * gw - P
    kv = m.num_hidden_layers * 2 * rows * m.num_key_value_heads * m.head_dim * positions * b
    q, kv_width = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    per_position = (3 * m.hidden_size + 2 * q + 2 * kv_width + 3 * m.intermediate_size) * b + 2 * (q + kv_width) * 4
    activations = rows * L * per_position + rows * L * L * (1 + b)
    if weight_mode(mode).int8_layers:
        activations += max(lin.weight.numel() for lin in layer_linears(decoder_layers(model))) * b
    out = {
        "weights": weights["device"],
        "tokenizer": ae_params * 4,
        "kv_cache": kv,
        "activations": activations,
    }
    out["total"] = sum(out.values())
    out["host"] = weights["host"]
    out["copied"] = gh * gw // P * weights["layers"] if offload else 0  # all layers, once per forward
    return out


def table(
    models: tuple[str, ...] = TABLE_MODELS,
    height: int = 1024,
    width: int = 1024,
    prompt_tokens: int = PROMPT_TOKENS,
    gpu_mem_gib: float = 24.0,
    markdown: bool = False,
) -> str:
    """Device memory of every mode with and without offload (prefetching) for each model, in GiB."""
    head = ["model", "weights", "offload", "weights", "tokenizer", "KV cache", "activ.", "total", "host", "fits"]
    head.append("copy s/img")
    rows = []
    for name in models:
        cfg = get_t2i_config(name)
        for mode in WEIGHT_MODES:
            for offload in (False, True):
                r = sampling_memory(cfg, mode, offload, height, width, prompt_tokens)
                fits = r["total"] / GiB + HEADROOM_GIB <= gpu_mem_gib
                gib = [
                    f"{r[k] / GiB:.2f}" for k in ("weights", "tokenizer", "kv_cache", "activations", "total", "host")
                ]
                copy_s = f"{r['copied'] / PCIE_BYTES_PER_S:.0f}" if offload else "-"
                rows.append([name, mode, "yes" if offload else "no", *gib, "yes" if fits else "no", copy_s])
    title = (
        f"sampling 1 image {height}x{width} with CFG (2 rows), {prompt_tokens}-token prompt; GiB on the device; "
        f"fits: total + {HEADROOM_GIB:g} GiB <= {gpu_mem_gib:g} GiB; copy s/img: offload's layer copies per image "
        f"at {PCIE_BYTES_PER_S / 1e9:g} GB/s"
    )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join([title, "", *lines, *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([title, fmt.format(*head), *(fmt.format(*r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.plan.inference", description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="T2I config name (default: 14B-16x and 14B-64x)")
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    ap.add_argument("--gpu-mem", type=float, default=24.0, help="GiB of the card for the 'fits' column")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    try:
        models = tuple(args.model) if args.model else TABLE_MODELS
        print(table(models, args.height, args.width, args.prompt_tokens, args.gpu_mem, args.markdown))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
