"""Class-conditional (ImageNet) BitDance: class prefix, query tokens, block-causal backbone and binary head.

Parameter names follow the official ImageNet checkpoints. As in the released models, the token-by-token model
(P = 1, the "1x" checkpoints) has the token-wise MLP diffusion head and no query tokens; the patch-parallel
models (P = 4, 16) have the attention head over the P tokens of a patch. The frozen tokenizer is not
a submodule here: official checkpoints carry it under `vae.`, which `models.c2i.io` splits off.
Training: `forward(bits, labels)` returns the diffusion loss. Sampling: `models.c2i.sampler`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from models.c2i.transformer import TransformerBlock
from models.core.bits import flip_bits
from models.core.diffusion_head import BinaryDiffusionHead, HeadConfig
from models.core.kv_cache import KVCache
from models.core.names import split_parallel_suffix
from models.core.patch_order import block_causal_mask, patch_raster_index, patch_side, to_patch_raster
from models.core.rope import rope_2d_angles


@dataclass
class C2IConfig:
    """Sizes and training settings of a class-conditional BitDance model."""

    dim: int
    n_layer: int
    n_head: int
    head_depth: int
    head_adaln: int
    latent_dim: int = 32  # bits per token (tokenizer z_channels)
    image_size: int = 256
    downsample: int = 16
    parallel_num: int = 1  # P tokens predicted per AR step
    num_classes: int = 1000
    cls_token_num: int = 64
    class_dropout: float = 0.1
    flip_p_max: float = 0.1  # input bit-flip perturbation: p = flip_p_max * U(0, 1)
    diff_batch_mul: int = 4
    time_schedule: str = "logit_normal"
    time_shift: float = 1.0
    P_mean: float = -0.8
    P_std: float = 0.8
    tokenizer: str = "d16c32"

    def __post_init__(self) -> None:
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by downsample {self.downsample}")
        patch_side(self.parallel_num, self.grid, self.grid)
        if self.cls_token_num < 1:
            raise ValueError("cls_token_num must be >= 1")
        if not 0.0 <= self.flip_p_max <= 1.0:
            raise ValueError(f"flip_p_max must be in [0, 1], got {self.flip_p_max}")

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def seq_len(self) -> int:
        """Backbone input length: prefix + (P - 1) queries + all patches but the last."""
        return self.cls_token_num + self.grid * self.grid - 1

    def head_config(self) -> HeadConfig:
        return HeadConfig(
            ch_target=self.latent_dim,
            ch_cond=self.dim,
            ch_latent=self.dim,
            depth_latent=self.head_depth,
            depth_adanln=self.head_adaln,
            block="mlp" if self.parallel_num == 1 else "attention",
            head_dim=64,
            use_swiglu=True,
            sigmoid_output=False,
            time_schedule=self.time_schedule,
            time_shift=self.time_shift,
            P_mean=self.P_mean,
            P_std=self.P_std,
            parallel_num=self.parallel_num,
            diff_batch_mul=self.diff_batch_mul,
        )


C2I_CONFIGS: dict[str, C2IConfig] = {
    "B": C2IConfig(dim=768, n_layer=24, n_head=12, head_depth=6, head_adaln=2, flip_p_max=0.1),
    "L": C2IConfig(dim=1024, n_layer=32, n_head=16, head_depth=8, head_adaln=2, flip_p_max=0.05),
    "H": C2IConfig(dim=1280, n_layer=40, n_head=20, head_depth=12, head_adaln=3, flip_p_max=0.05),
    # CPU-sized: 32x32 images through the 2x "tiny" tokenizer give a 16x16 grid of 16-bit tokens.
    "tiny": C2IConfig(
        dim=64,
        n_layer=2,
        n_head=4,
        head_depth=2,
        head_adaln=1,
        latent_dim=16,
        image_size=32,
        downsample=2,
        num_classes=10,
        cls_token_num=4,
        diff_batch_mul=2,
        tokenizer="tiny",
    ),
}


def get_c2i_config(name: str, **overrides) -> C2IConfig:
    """Named config, e.g. "B", "L-4x", "H-16x", "tiny-16x" (the suffix sets parallel_num)."""
    try:
        base, P = split_parallel_suffix(name)
    except ValueError:
        base, P = name, None
    if base not in C2I_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(C2I_CONFIGS)} with optional -1x/-4x/-16x")
    if P is not None:
        overrides.setdefault("parallel_num", P)
    return replace(C2I_CONFIGS[base], **overrides)


class SwiGLUConnector(nn.Module):
    """`proj_in`: bits -> model width through a SwiGLU with hidden 1.5 * dim (biases on)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        hidden = int(dim * 1.5)
        self.w1 = nn.Linear(in_dim, 2 * hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class ClassConditionalBitDance(nn.Module):
    def __init__(self, cfg: C2IConfig):
        super().__init__()
        self.cfg = cfg
        P, n_img = cfg.parallel_num, cfg.grid * cfg.grid
        self.cls_embedding = nn.Embedding(cfg.num_classes + 1, cfg.dim * cfg.cls_token_num)
        if P > 1:
            self.query_token = nn.Parameter(torch.zeros(1, P - 1, cfg.dim))
        self.proj_in = SwiGLUConnector(cfg.latent_dim, cfg.dim)
        self.emb_norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.layers = nn.ModuleList(TransformerBlock(cfg.dim, cfg.n_head) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.pos_for_diff = nn.Embedding(n_img, cfg.dim)
        self.head = BinaryDiffusionHead(cfg.head_config())

        prefix = cfg.cls_token_num + P - 1
        angles = rope_2d_angles(cfg.grid, cfg.grid, cfg.dim // cfg.n_head, prefix)
        perm = patch_raster_index(cfg.grid, cfg.grid, P)
        angles = torch.cat([angles[:prefix], angles[prefix:][perm]])[: cfg.seq_len]
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        mask = block_causal_mask(cfg.seq_len, cfg.cls_token_num - 1, P)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """N(0, 0.02) for the backbone's linears and embeddings (zero biases); the head keeps its own init."""
        for name, m in self.named_modules():
            if name.startswith("head"):
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        if self.cfg.parallel_num > 1:
            nn.init.normal_(self.query_token, std=0.02)

    def no_weight_decay_names(self) -> tuple[str, ...]:
        """Parameter-name prefixes the official recipe trains without weight decay (plus norms and biases)."""
        return ("proj_in", "cls_embedding", "query_token")

    # ---- pieces shared by training and incremental decoding ----
    def prefix_embeddings(self, labels: torch.Tensor) -> torch.Tensor:
        """[B, cls_token_num + P - 1, dim]: class tokens then the learned query tokens."""
        b = labels.shape[0]
        cls = self.cls_embedding(labels).view(b, self.cfg.cls_token_num, self.cfg.dim)
        if self.cfg.parallel_num == 1:
            return cls
        return torch.cat([cls, self.query_token.expand(b, -1, -1)], dim=1)

    def run_backbone(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """emb_norm -> blocks -> norm over input positions [start, start + len); `cache` holds earlier ones."""
        end = start + x.shape[1]
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        mask = self.attn_mask[start:end, :end]
        x = self.emb_norm(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, start)
        return self.norm(x)

    def new_cache(self, batch: int) -> KVCache:
        p = next(self.parameters())
        c = self.cfg
        return KVCache(c.n_layer, batch, c.n_head, c.dim // c.n_head, c.seq_len, p.device, p.dtype)

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cfg.class_dropout <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.cfg.class_dropout
        return torch.where(drop, torch.full_like(labels, self.cfg.num_classes), labels)

    def head_conditions(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced condition vectors [B, h*w, dim] for all targets, given patch-raster input tokens."""
        n_img = self.cfg.grid * self.cfg.grid
        tokens = tokens[:, : n_img - self.cfg.parallel_num].to(self.pos_for_diff.weight.dtype)  # bf16 weights: bf16 in
        x = torch.cat([self.prefix_embeddings(labels), self.proj_in(tokens)], 1)
        hidden = self.run_backbone(x)[:, self.cfg.cls_token_num - 1 :]
        return hidden + self.pos_for_diff.weight

    def forward(
        self,
        bits: torch.Tensor,
        labels: torch.Tensor,
        head_t: torch.Tensor | None = None,
        head_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Diffusion loss for a batch of ±1 latent grids [B, C, h, w] and class ids [B]; `head_t` / `head_noise` fix
        the head's draws (`models.core.diffusion_head.fixed_draws`)."""
        c = self.cfg
        if bits.dim() != 4 or bits.shape[1] != c.latent_dim or bits.shape[2:] != (c.grid, c.grid):
            raise ValueError(
                f"expected bits [B, {c.latent_dim}, {c.grid}, {c.grid}] from tokenizer {c.tokenizer}, "
                f"got {tuple(bits.shape)}"
            )
        target = to_patch_raster(bits, c.parallel_num)
        inputs = flip_bits(target, c.flip_p_max) if self.training and c.flip_p_max > 0 else target
        cond = self.head_conditions(inputs, self.drop_labels(labels))
        P = c.parallel_num
        return self.head.loss(target.reshape(-1, P, c.latent_dim), cond.reshape(-1, P, c.dim), head_t, head_noise)
