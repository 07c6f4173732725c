"""LPIPS perceptual distance (VGG16 features, learned 1x1 heads) from a local weights file; no downloads.

The file is a safetensors/torch state dict with the VGG16 conv weights under `net.features.<i>.*` (torchvision
numbering) and the heads under `lin<k>.model.1.weight`, as the LPIPS project's v0.1 files are laid out once
merged with torchvision's VGG16.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAPS = (3, 8, 15, 22, 29)  # torchvision feature indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)


class _Head(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class _VGG(nn.Module):
    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _VGG()
        for k, c in enumerate(CHANNELS):
            setattr(self, f"lin{k}", _Head(c))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> LPIPS:
        from models.core.state_dict import load_state_dict_strict

        path = Path(path)
        if path.suffix == ".safetensors":
            from models.core.safetensors_file import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model = cls()
        load_state_dict_strict(model, state, f"LPIPS weights {path}")
        return model

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.net.features):
            h = layer(h)
            if i in TAPS:
                feats.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
            if i == TAPS[-1]:
                break
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance between images in [-1, 1]."""
        total = x.new_zeros(())
        for k, (a, b) in enumerate(zip(self._features(x), self._features(y), strict=True)):
            total = total + getattr(self, f"lin{k}").model((a - b) ** 2).mean()
        return total


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
