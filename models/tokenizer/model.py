"""The BitDance binary tokenizer: a convolutional autoencoder whose latent is sign-quantized to ±1 bits.

Parameter names match the official checkpoints (``encoder.*``, ``decoder.*``) so they load strictly.
Training losses live in ``models/tokenizer/losses.py``; file loading and saving in ``models/tokenizer/io.py``.
"""

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.core.bits import sign_quantize, sign_quantize_ste

_GN_GROUPS = 32
_GN_EPS = 1e-6


@dataclass(frozen=True)
class TokenizerConfig:
    """Architecture of a binary autoencoder; the first six fields are the official ``ddconfig``."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    in_channels: int = 3
    out_ch: int = 3
    gan_decoder: bool = False
    entropy_groups: int = 4  # G bit groups for the entropy loss; each holds d = z_channels / G bits
    name: str = "custom"
    # GroupNorm groups: 32 in every released tokenizer. Narrow CPU configs use fewer, since 32 groups over 32
    # channels is a per-channel instance norm that erases the relative strength of colour channels.
    norm_groups: int = _GN_GROUPS

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
        if bad:
            raise ValueError(
                f"tokenizer {self.name}: widths {bad} are not multiples of norm_groups={self.norm_groups} (GroupNorm)"
            )
        if self.z_channels % self.entropy_groups:
            raise ValueError(
                f"tokenizer {self.name}: z_channels={self.z_channels} not divisible by "
                f"entropy_groups={self.entropy_groups}"
            )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_ddconfig(
        cls,
        ddconfig: dict[str, Any],
        gan_decoder: bool,
        name: str = "custom",
        entropy_groups: int | None = None,
    ) -> "TokenizerConfig":
        """Build from the official ``ddconfig`` dict (extra keys such as double_z or resolution are ignored).

        Without ``entropy_groups`` each group gets 8 bits (z // 8 groups), matching the named configs.
        """
        z = int(ddconfig["z_channels"])
        return cls(
            ch=int(ddconfig["ch"]),
            ch_mult=tuple(ddconfig["ch_mult"]),
            num_res_blocks=int(ddconfig["num_res_blocks"]),
            z_channels=z,
            in_channels=int(ddconfig.get("in_channels", 3)),
            out_ch=int(ddconfig.get("out_ch", 3)),
            gan_decoder=bool(gan_decoder),
            entropy_groups=entropy_groups if entropy_groups is not None else max(1, z // 8),
            name=name,
            norm_groups=int(ddconfig.get("norm_groups", _GN_GROUPS)),
        )

    def to_ddconfig(self) -> dict[str, Any]:
        """The official ``ddconfig`` dict for this architecture."""
        return {
            "double_z": False,
            "z_channels": self.z_channels,
            "in_channels": self.in_channels,
            "out_ch": self.out_ch,
            "ch": self.ch,
            "ch_mult": list(self.ch_mult),
            "num_res_blocks": self.num_res_blocks,
        } | ({"norm_groups": self.norm_groups} if self.norm_groups != _GN_GROUPS else {})


# d32c128 / d32c256: the official config json is not public to us; these are our best assumption (d16c32
# with one more 4x level). When loading, the official ``*_config.json`` beside the weights always wins.
TOKENIZER_CONFIGS: dict[str, TokenizerConfig] = {
    "d16c32": TokenizerConfig(256, (1, 1, 2, 2, 4), 4, 32, entropy_groups=4, name="d16c32"),
    "d32c128": TokenizerConfig(256, (1, 1, 2, 2, 4, 4), 4, 128, entropy_groups=16, name="d32c128"),
    "d32c256": TokenizerConfig(256, (1, 1, 2, 2, 4, 4), 4, 256, entropy_groups=32, name="d32c256"),
    "tiny": TokenizerConfig(32, (1, 2), 1, 16, entropy_groups=2, name="tiny", norm_groups=8),  # 2x, CPU tests/demo
    "tiny16": TokenizerConfig(32, (1, 1, 1, 1, 2), 1, 32, entropy_groups=4, name="tiny16"),  # 16x down
}


def get_tokenizer_config(name: str, **overrides: Any) -> TokenizerConfig:
    """A named config (optionally with fields replaced), or ValueError listing the known names."""
    if name not in TOKENIZER_CONFIGS:
        raise ValueError(f"unknown tokenizer config {name!r}; known: {', '.join(sorted(TOKENIZER_CONFIGS))}")
    return replace(TOKENIZER_CONFIGS[name], **overrides)


def images_to_tensor(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, H, W, 3] or [B, 3, H, W] -> float32 [B, 3, H, W] in [-1, 1] (x / 127.5 - 1)."""
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"expected images [B, H, W, 3] or [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    elif images.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels first or last, got shape {tuple(images.shape)}")
    return images.float() / 127.5 - 1.0


def tensor_to_images(y: torch.Tensor) -> torch.Tensor:
    """Decoded [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] via clamp(127.5 * y + 128, 0, 255)."""
    return torch.clamp(127.5 * y.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def depth_to_space(x: torch.Tensor, block: int = 2) -> torch.Tensor:
    """DCR depth-to-space: [B, b*b*C, H, W] viewed as [B, b, b, C, H, W] -> [B, C, H*b, W*b]."""
    b, c, h, w = x.shape
    c_out = c // (block * block)
    x = x.view(b, block, block, c_out, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, c_out, h * block, w * block)


def _group_norm(channels: int, groups: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=_GN_EPS, affine=affine)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int = _GN_GROUPS) -> None:
        super().__init__()
        self.norm1 = _group_norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm2 = _group_norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, then scale/shift predicted from the latent's per-channel std and mean."""

    def __init__(self, z_channels: int, channels: int, groups: int = _GN_GROUPS, eps: float = 1e-6) -> None:
        super().__init__()
        self.gn = _group_norm(channels, groups, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)
        self.eps = eps

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        flat = style.flatten(2)  # [B, z, h*w]
        # The official code calls ``Tensor.var(dim=-1)`` (commented "not unbias"), which is the UNBIASED
        # variance (divides by h*w - 1); we match its numerics, so a 1x1 latent gives NaN there as here.
        scale = self.gamma(torch.sqrt(flat.var(dim=-1, correction=1) + self.eps))
        bias = self.beta(flat.mean(dim=-1))
        return scale[..., None, None] * self.gn(x) + bias[..., None, None]


class Upsampler(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(self.conv1(x), 2)


class _Level(nn.Module):
    """One resolution level: ``block.{j}`` ResBlocks plus an optional ``downsample`` or ``upsample``."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int, groups: int) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        in_widths = [cfg.ch] + widths[:-1]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(in_widths, widths, strict=True)):
            level = _Level(c_in, c_out, cfg.num_res_blocks, cfg.norm_groups)
            if i < len(widths) - 1:
                level.downsample = nn.Conv2d(c_out, c_out, 3, stride=2, padding=1)
            self.down.append(level)
        top = widths[-1]
        self.mid_block = nn.ModuleList(ResBlock(top, top, cfg.norm_groups) for _ in range(cfg.num_res_blocks))
        self.norm_out = _group_norm(top, cfg.norm_groups)
        self.conv_out = nn.Conv2d(top, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        for blk in self.mid_block:
            x = blk(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Mirror of the encoder; ``adaptive.{i}`` and ``up.{i}`` are indexed by level (0 = full resolution)."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.gan = cfg.gan_decoder
        widths = [cfg.ch * m for m in cfg.ch_mult]
        in_widths = widths[1:] + [widths[-1]]  # width entering level i (coming from level i + 1)
        top = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels * (2 if self.gan else 1), top, 3, padding=1)
        self.mid_block = nn.ModuleList(ResBlock(top, top, cfg.norm_groups) for _ in range(cfg.num_res_blocks))
        self.adaptive = nn.ModuleList(AdaptiveGroupNorm(cfg.z_channels, c, cfg.norm_groups) for c in in_widths)
        self.up = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(in_widths, widths, strict=True)):
            level = _Level(c_in, c_out, cfg.num_res_blocks, cfg.norm_groups)
            if i > 0:
                level.upsample = Upsampler(c_out)
            self.up.append(level)
        self.norm_out = _group_norm(widths[0], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        style = z
        if self.gan:
            z = torch.cat([z, torch.randn_like(z) if noise is None else noise], dim=1)
        x = self.conv_in(z)
        for blk in self.mid_block:
            x = blk(x)
        for i in reversed(range(len(self.up))):
            x = self.up[i](self.adaptive[i](x, style))
            if i > 0:
                x = self.up[i].upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class TokenizerEncoding(NamedTuple):
    latent: torch.Tensor  # h: pre-quantization encoder output [B, z, h, w]
    bits: torch.Tensor  # q: ±1 (straight-through to h in training mode) [B, z, h, w]


class BinaryAutoencoder(nn.Module):
    """Encoder -> sign quantization -> decoder; holds only ``encoder`` and ``decoder`` parameters."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) for an image of (height, width); both must be divisible by the down factor."""
        down = self.config.downsample
        if height % down or width % down:
            raise ValueError(
                f"image size {height}x{width} is not divisible by tokenizer {self.config.name}'s down factor {down}"
            )
        return height // down, width // down

    def encode(self, x: torch.Tensor) -> TokenizerEncoding:
        self.latent_grid(x.shape[-2], x.shape[-1])
        h = self.encoder(x)
        q = sign_quantize_ste(h) if self.training else sign_quantize(h)
        return TokenizerEncoding(latent=h, bits=q)

    def decode(
        self, q: torch.Tensor, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Bits [B, z, h, w] -> image [B, out_ch, H, W] in about [-1, 1].

        ``noise`` (shaped like q) or ``generator`` fixes the GAN decoder's noise; plain decoders ignore both.
        """
        z = self.config.z_channels
        if q.ndim != 4 or q.shape[1] != z:
            raise ValueError(
                f"latent has {q.shape[1] if q.ndim > 1 else '?'} channels but tokenizer {self.config.name} "
                f"expects z_channels={z} (latent shape {tuple(q.shape)}, want [B, z, h, w])"
            )
        if self.config.gan_decoder and noise is None and generator is not None:
            noise = torch.randn(q.shape, generator=generator, device=q.device, dtype=q.dtype)
        return self.decoder(q, noise if self.config.gan_decoder else None)

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, TokenizerEncoding]:
        enc = self.encode(x)
        return self.decode(enc.bits, noise=noise, generator=generator), enc
