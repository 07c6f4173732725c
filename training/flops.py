"""Model FLOPs utilisation and what it is measured against: `mfu` (the training loop's metric, `cluster.gpu_check`),
the per-GPU peak table, and 6 x dense parameters per token for families without a formula of their own. A family's
own formula lives in its folder (`models/t2i/flops.py`)."""

from __future__ import annotations

from torch import nn


def dense_params(model: nn.Module) -> int:
    """Parameters that cost FLOPs per token (embedding tables excluded)."""
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return sum(p.numel() for p in model.parameters()) - emb


BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense BF16 tensor-core peak per GPU (SXM, no sparsity)


def mfu(flops: float, seconds: float, peak_tflops: float, devices: int) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over `devices` x the per-device peak."""
    return flops / seconds / (peak_tflops * 1e12 * devices)
