"""Reconstruction metrics on uint8-quantized images: PSNR and SSIM (Gaussian window 11, sigma 1.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> [0, 1], quantized to 8 bits as saved images are (clamp(127.5 y + 128))."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).floor() / 255.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) over the batch of [-1, 1] images [B, 3, H, W]."""
    mse = ((to_unit(a) - to_unit(b)) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM over batch and channels of [-1, 1] images [B, 3, H, W] (Wang et al. 2004 constants)."""
    x, y = to_unit(a), to_unit(b)
    c = x.shape[1]
    g = torch.exp(-((torch.arange(window, dtype=torch.float32) - window // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())
