"""Binary diffusion head: the small network that denoises P tokens of bits, and its flow-matching loss.

Parameter names follow the official checkpoints (`net.*`). Two block kinds share one network:
- "attention" (the patch-parallel heads): adaLN blocks of self-attention over the P tokens then an MLP, six
  modulation chunks per adaLN module; the ImageNet variant (head_dim 64, SwiGLU, linear output) and the
  text-to-image variant (head_dim 128, SwiGLU or plain MLP, output mapped by 2*sigmoid(o) - 1).
- "mlp" (the token-by-token ImageNet 1x head): residual blocks of one LayerNorm (`norm`) and a SwiGLU with
  hidden 1.5 W, modulated by (scale, shift, gate) - three chunks per adaLN module; tokens never mix.
Sampling lives in `models/core/head_sampler.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TIME_SCHEDULES = ("logit_normal", "uniform")
HEAD_BLOCKS = ("attention", "mlp")


@dataclass
class HeadConfig:
    """Shape and training-time settings of one diffusion head (names follow `vision_head_config.json`)."""

    ch_target: int  # bits per token (C)
    ch_cond: int  # width of the condition vectors from the backbone
    ch_latent: int  # head width W
    depth_latent: int = 6
    depth_adanln: int = 2
    block: str = "attention"  # "attention" (patch-parallel heads) or "mlp" (the token-by-token 1x head)
    head_dim: int = 64  # 64 for the ImageNet head, 128 for the text-to-image head
    use_swiglu: bool = True
    sigmoid_output: bool = False  # True for the text-to-image head: output = 2*sigmoid(o) - 1
    time_schedule: str = "logit_normal"
    time_shift: float = 1.0
    P_mean: float = -0.8
    P_std: float = 0.8
    parallel_num: int = 1
    diff_batch_mul: int = 1

    def __post_init__(self) -> None:
        if self.time_schedule not in TIME_SCHEDULES:
            raise ValueError(f"unknown time_schedule {self.time_schedule!r}; choose one of {TIME_SCHEDULES}")
        if self.block not in HEAD_BLOCKS:
            raise ValueError(f"unknown head block {self.block!r}; choose one of {HEAD_BLOCKS}")
        if self.block == "mlp" and not self.use_swiglu:
            raise ValueError("the mlp head block is SwiGLU only (use_swiglu=true)")
        if self.block == "attention" and self.ch_latent % self.head_dim:
            raise ValueError(f"head width {self.ch_latent} is not a multiple of head_dim {self.head_dim}")
        if self.depth_adanln < 1 or self.depth_latent % self.depth_adanln:
            raise ValueError(f"depth_latent {self.depth_latent} must be a multiple of depth_adanln {self.depth_adanln}")
        if self.time_shift <= 0:
            raise ValueError(f"time_shift must be > 0, got {self.time_shift}")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SANA-style time shift t' = (1/s) / ((1/s) + (1/t - 1)); identity for s == 1."""
    if shift == 1.0:
        return t
    return (1.0 / shift) / ((1.0 / shift) + (1.0 / t - 1.0))


def sample_time(cfg: HeadConfig, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """n training times: logit-normal (P_mean, P_std) or uniform, then shifted (`shift_time`)."""
    if cfg.time_schedule == "logit_normal":
        t = (torch.randn(n, device=device, generator=generator) * cfg.P_std + cfg.P_mean).sigmoid()
    else:
        t = torch.rand(n, device=device, generator=generator)
    return shift_time(t, cfg.time_shift)


def fixed_draws(cfg: HeadConfig, patches: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The times [k * patches] and noises [k * patches, P, C] `BinaryDiffusionHead.loss` draws for `patches` patches
    (k = diff_batch_mul), taken from `generator` instead: passed explicitly, they make a loss reproducible on any
    device and layout (held-out validation)."""
    rows = cfg.diff_batch_mul * patches
    t = sample_time(cfg, rows, "cpu", generator)
    return t, torch.randn(rows, cfg.parallel_num, cfg.ch_target, generator=generator)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of 1000*t: [cos(1000 t f_i), sin(1000 t f_i)], f_i = exp(-ln(max_period) i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class HeadAttention(nn.Module):
    """Unmasked self-attention over the P tokens of one patch."""

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.n_head = width // head_dim
        self.wqkv = nn.Linear(width, 3 * width)
        self.wo = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, w = x.shape
        q, k, v = self.wqkv(x).view(b, p, 3, self.n_head, w // self.n_head).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, p, w))


class HeadBlock(nn.Module):
    """adaLN-modulated pre-norm block: attention then MLP, each gated."""

    def __init__(self, width: int, head_dim: int, use_swiglu: bool):
        super().__init__()
        hidden = int(width * 1.5)
        self.use_swiglu = use_swiglu
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = HeadAttention(width, head_dim)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        if use_swiglu:
            self.w1 = nn.Linear(width, 2 * hidden)
            self.w2 = nn.Linear(hidden, width)
        else:
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, width))

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        if not self.use_swiglu:
            return self.mlp(h)
        a, b = self.w1(h).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        scale1, shift1, gate1, scale2, shift2, gate2 = mod
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self._mlp(self.norm2(x) * (1 + scale2) + shift2)


class MlpHeadBlock(nn.Module):
    """Token-wise residual block of the 1x head: x + gate * SwiGLU(norm(x) * (1 + scale) + shift)."""

    def __init__(self, width: int):
        super().__init__()
        hidden = int(width * 1.5)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.w1 = nn.Linear(width, 2 * hidden)
        self.w2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        scale, shift, gate = mod
        a, b = self.w1(self.norm(x) * (1 + scale) + shift).chunk(2, dim=-1)
        return x + gate * self.w2(F.silu(a) * b)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.ada_ln_modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_ln_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class HeadNet(nn.Module):
    """x_hat = net(z, t, c): predicts clean bits from noisy bits z [N, P, C], time t [N], condition c [N, P, D]."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        w = cfg.ch_latent
        self.sigmoid_output = cfg.sigmoid_output
        self.input_proj = nn.Linear(cfg.ch_target, w)
        self.cond_embed = nn.Linear(cfg.ch_cond, w)
        self.time_embed = TimestepEmbedder(w)
        if cfg.block == "mlp":
            blocks: list[nn.Module] = [MlpHeadBlock(w) for _ in range(cfg.depth_latent)]
        else:
            blocks = [HeadBlock(w, cfg.head_dim, cfg.use_swiglu) for _ in range(cfg.depth_latent)]
        self.res_blocks = nn.ModuleList(blocks)
        self.n_mod = 3 if cfg.block == "mlp" else 6  # modulation chunks per adaLN module
        self.ada_ln_blocks = nn.ModuleList(nn.Linear(w, self.n_mod * w) for _ in range(cfg.depth_adanln))
        self.blocks_per_adaln = cfg.depth_latent // cfg.depth_adanln
        self.final_layer = FinalLayer(w, cfg.ch_target)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for lin in [*self.ada_ln_blocks, self.final_layer.ada_ln_modulation, self.final_layer.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(z)
        y = F.silu(self.time_embed(t)[:, None, :] + self.cond_embed(c))
        mod: tuple[torch.Tensor, ...] = ()
        for i, block in enumerate(self.res_blocks):
            if i % self.blocks_per_adaln == 0:
                mod = self.ada_ln_blocks[i // self.blocks_per_adaln](y).chunk(self.n_mod, dim=-1)
            x = block(x, mod)
        out = self.final_layer(x, y)
        return 2 * torch.sigmoid(out) - 1 if self.sigmoid_output else out


def velocity(x_hat: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = (x_hat - z) / max(1 - t, 0.05), t broadcast over [N, P, C]."""
    return (x_hat - z) / (1 - t.view(-1, 1, 1)).clamp_min(0.05)


class BinaryDiffusionHead(nn.Module):
    """The head: `net` plus the flow-matching (x-prediction) training loss. Sampling: `models.core.head_sampler`."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.net = HeadNet(cfg)

    def sample_time(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_time(self.cfg, n, device, generator)

    def loss(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Flow-matching loss for target bits x [N, P, C] given conditions cond [N, P, D].

        Every (x, cond) pair is repeated `diff_batch_mul` (k) times (tiled: rows k*N) to draw k noises per
        token. Explicit `t` [k*N] and `noise` [k*N, P, C] make the loss deterministic. reduction "mean" gives a
        scalar; "none" gives the per-token loss [k*N, P] (mean over the C bits), for masked averaging.
        """
        if x.dim() != 3 or x.shape[-1] != self.cfg.ch_target:
            raise ValueError(f"head target must be [N, P, {self.cfg.ch_target}] bits, got {tuple(x.shape)}")
        k = self.cfg.diff_batch_mul
        x = x.float().repeat(k, 1, 1)
        cond = cond.repeat(k, 1, 1)
        with torch.no_grad():
            t = self.sample_time(x.shape[0], x.device) if t is None else t.float()
            noise = torch.randn_like(x) if noise is None else noise.float()
            if t.shape != (x.shape[0],) or noise.shape != x.shape:
                raise ValueError(f"explicit t/noise must have {x.shape[0]} rows (diff_batch_mul={k} x N)")
            z = (1 - t.view(-1, 1, 1)) * noise + t.view(-1, 1, 1) * x
            v = velocity(x, z, t)
        x_hat = self.net(z.to(cond.dtype), t, cond)
        with torch.autocast(device_type=x.device.type, enabled=False):
            err = (v - velocity(x_hat.float(), z, t)) ** 2
        if reduction == "none":
            return err.mean(dim=-1)
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        return err.mean()
