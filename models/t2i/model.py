"""Text-to-image BitDance (Qwen3 backbone, bit projector with 2D sin-cos embedding, T2I binary head) and the
image-token embedding and loss math that its megatron port (`models.t2i.megatron.model`) calls too.

Module names follow the official folder layout: `llm` (a Hugging Face Qwen3 model's keys), `projector` (`fc1`,
`fc2`), `vision_head` (`net.*`). Training: `forward(PackedT2IBatch)` returns the loss terms;
loss = 0.01 x text cross-entropy + 1.0 x vision diffusion loss, each a mean over its tokens. Sampling:
`models.t2i.sampler`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from models.core.attention import ATTENTION_BACKENDS, build_mask
from models.core.bits import flip_bits
from models.core.diffusion_head import BinaryDiffusionHead, HeadConfig
from models.core.names import split_parallel_suffix
from models.core.patch_order import patch_side
from models.t2i.packing import IGNORE_INDEX, PackedT2IBatch
from models.t2i.qwen3 import Qwen3Config, Qwen3ForCausalLM, get_qwen3_config

# (height, width) in pixels, as the official pipeline lists them.
OFFICIAL_IMAGE_SIZES: tuple[tuple[int, int], ...] = (
    (2048, 512),
    (1920, 512),
    (1536, 640),
    (1280, 768),
    (1152, 896),
    (1024, 1024),
    (896, 1152),
    (768, 1280),
    (640, 1536),
    (512, 1920),
    (512, 2048),
    (1024, 256),
    (896, 256),
    (640, 384),
    (512, 512),
    (384, 640),
    (256, 896),
    (256, 1024),
)


@dataclass
class T2IConfig:
    llm: Qwen3Config
    head: HeadConfig
    downsample: int = 16  # tokenizer down factor: <|res_k|> is k tokens per side
    image_sizes: tuple[tuple[int, int], ...] = OFFICIAL_IMAGE_SIZES
    flip_p_max: float = 0.1
    text_loss_weight: float = 0.01
    vision_loss_weight: float = 1.0
    attention: str = "auto"  # dense / segments (exact SDPA, whole row / per document), flex; auto: flex on GPU
    tokenizer: str = "d16c32"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention!r}; choose one of {ATTENTION_BACKENDS}")
        if self.head.ch_cond != self.llm.hidden_size:
            raise ValueError(f"head ch_cond {self.head.ch_cond} != backbone hidden size {self.llm.hidden_size}")
        if self.llm.hidden_size % 4:
            raise ValueError("the 2D sin-cos embedding needs a hidden size divisible by 4")
        for h, w in self.image_sizes:
            self.grid(h, w)

    @property
    def parallel_num(self) -> int:
        return self.head.parallel_num

    @property
    def latent_dim(self) -> int:
        return self.head.ch_target

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of a supported (height, width); a one-line error listing the supported sizes otherwise."""
        if (height, width) not in self.image_sizes:
            listed = ", ".join(f"{h}x{w}" for h, w in self.image_sizes)
            raise ValueError(f"image size {height}x{width} (HxW) is not supported; choose one of: {listed}")
        gh, gw = height // self.downsample, width // self.downsample
        patch_side(self.parallel_num, gh, gw)
        return gh, gw


def t2i_head_config(width: int, latent_dim: int, parallel_num: int, **kw) -> HeadConfig:
    base = dict(
        depth_latent=6,
        depth_adanln=2,
        head_dim=128,
        use_swiglu=True,
        sigmoid_output=True,
        P_mean=-0.8,
        P_std=0.8,
        diff_batch_mul=1,
    )
    base.update(kw)
    return HeadConfig(ch_target=latent_dim, ch_cond=width, ch_latent=width, parallel_num=parallel_num, **base)


T2I_CONFIG_NAMES = ("14B", "tiny", "demo")  # each takes a -<P>x suffix


def get_t2i_config(name: str, **overrides) -> T2IConfig:
    """ "14B-16x", "14B-64x" (official sizes), "tiny-<P>x" (CPU tests; 2x tokenizer, small sizes) or "demo-<P>x"
    (`make demo`: tiny with a head half as wide as its backbone)."""
    try:
        base_name, P = split_parallel_suffix(name)
    except ValueError:
        base_name, P = name, None
    if base_name not in T2I_CONFIG_NAMES or P is None:
        raise ValueError(f"unknown T2I config {name!r}; known: 14B-16x, 14B-64x, tiny-<P>x, demo-<P>x")
    if base_name == "14B":
        llm = get_qwen3_config("14B")
        base = T2IConfig(llm=llm, head=t2i_head_config(llm.hidden_size, 32, P))
    else:
        llm = get_qwen3_config("tiny")
        head = t2i_head_config(llm.hidden_size, 16, P, depth_latent=2, depth_adanln=1)
        if base_name == "demo":
            # The 14B head is as wide as its backbone, yet one image's AR step costs about the same for any P on a
            # GPU: it is bound by reading the weights. On a CPU a 128-wide head's per-token arithmetic makes the cost
            # grow with P and hides next-patch decoding's fewer steps; a 64-wide head brings back the 14B regime.
            head = replace(head, ch_latent=64, head_dim=64)
        base = T2IConfig(
            llm=llm,
            head=head,
            downsample=2,
            image_sizes=((32, 32), (16, 48), (48, 16), (32, 64)),
            tokenizer="tiny",
        )
    return replace(base, **overrides)


def resized_rows(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """An embedding / LM-head matrix with `vocab_size` rows: the first rows kept, new rows at the mean of the old."""
    if vocab_size == weight.shape[0]:
        return weight
    out = weight.new_empty((vocab_size, *weight.shape[1:]))
    keep = min(weight.shape[0], vocab_size)
    out[:keep] = weight[:keep]
    out[keep:] = weight.mean(dim=0, keepdim=True)
    return out


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin(n w_i), cos(n w_i)] with w_i = 1 / 10000^(i / (dim/2)), i < dim/2: [N] -> [N, dim]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32, device=positions.device) / (dim / 2))
    angles = positions.float()[:, None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """2D embedding of (row, col) coords [N, 2]: concat(pe(col), pe(row)), dim/2 each."""
    return torch.cat([sincos_1d(coords[:, 1], dim // 2), sincos_1d(coords[:, 0], dim // 2)], dim=1)


class VisionProjector(nn.Module):
    """Bits -> backbone width: fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, latent_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(latent_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(bits), approximate="tanh"))


@dataclass
class T2ILoss:
    loss: torch.Tensor
    text_ce_sum: torch.Tensor
    text_tokens: int
    vision_loss_sum: torch.Tensor
    vision_tokens: int

    @property
    def text_ce(self) -> torch.Tensor:
        return self.text_ce_sum / max(self.text_tokens, 1)

    @property
    def vision_loss(self) -> torch.Tensor:
        return self.vision_loss_sum / max(self.vision_tokens, 1)


# ---- the T2I math both implementations share (this reference model and models/t2i/megatron/model.py) -------------


def check_batch(batch: PackedT2IBatch, cfg: T2IConfig) -> None:
    """One-line error when a packed batch was made for another P or another token width than the model's."""
    P, C = cfg.parallel_num, cfg.latent_dim
    if batch.parallel_num != P:
        raise ValueError(f"batch was packed for P={batch.parallel_num} but the model predicts P={P} tokens")
    if batch.target_bits.shape[-1] != C:
        raise ValueError(f"batch holds {batch.target_bits.shape[-1]}-bit tokens; the model expects {C}")


def image_token_embeddings(projector: VisionProjector, bits: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Input embeddings of image tokens: projector(bits) + 2D sin-cos embedding of their grid cell."""
    return projector(bits) + sincos_2d(coords, projector.fc2.out_features).to(bits.dtype)


def scatter_image_embeddings(
    embeds: torch.Tensor, batch: PackedT2IBatch, projector: VisionProjector, flip_p: float = 0.0
) -> torch.Tensor:
    """Text embeddings [B, L, D] with the embeddings of the batch's input image tokens index-copied into their
    positions; `flip_p` > 0 flips the input bits first (`flip_bits`, the training perturbation)."""
    b, length, d = embeds.shape
    bits = batch.image_in_bits.to(embeds.dtype)
    if flip_p > 0:
        bits = flip_bits(bits, flip_p)
    image = image_token_embeddings(projector, bits, batch.image_in_coords).to(embeds.dtype)
    return embeds.reshape(b * length, d).index_copy(0, batch.image_in_index, image).view(b, length, d)


def head_conditions(flat_hidden: torch.Tensor, batch: PackedT2IBatch) -> torch.Tensor:
    """Diffusion-head conditions [N_t, D]: the final hidden state [B * L, D] at each target's input position plus the
    2D sin-cos embedding of the target's grid cell."""
    pos = sincos_2d(batch.target_coords, flat_hidden.shape[-1]).to(flat_hidden.dtype)
    return flat_hidden[batch.target_index] + pos


def vision_loss_sum(
    vision_head: BinaryDiffusionHead,
    cond: torch.Tensor,
    batch: PackedT2IBatch,
    cfg: T2IConfig,
    head_t: torch.Tensor | None = None,
    head_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over the target tokens of the diffusion loss (per token, over `diff_batch_mul` draws)."""
    P, C = cfg.parallel_num, cfg.latent_dim
    per_token = vision_head.loss(
        batch.target_bits.view(-1, P, C), cond.view(-1, P, cond.shape[-1]), head_t, head_noise, reduction="none"
    )
    return per_token.sum() / cfg.head.diff_batch_mul


def combine_losses(
    text_sum: torch.Tensor, n_text: int, vision_sum: torch.Tensor, n_vis: int, cfg: T2IConfig
) -> T2ILoss:
    """The training loss: text and vision terms, each a mean over its tokens, weighted as `cfg` says."""
    loss = cfg.text_loss_weight * text_sum / max(n_text, 1) + cfg.vision_loss_weight * vision_sum / n_vis
    return T2ILoss(loss, text_sum, n_text, vision_sum, n_vis)


class TextToImageBitDance(nn.Module):
    def __init__(self, cfg: T2IConfig):
        super().__init__()
        self.cfg = cfg
        self.llm = Qwen3ForCausalLM(cfg.llm)
        self.projector = VisionProjector(cfg.latent_dim, cfg.llm.hidden_size)
        self.vision_head = BinaryDiffusionHead(cfg.head)

    def pos_embed(self, coords: torch.Tensor) -> torch.Tensor:
        return sincos_2d(coords, self.cfg.llm.hidden_size)

    def embed_image_tokens(self, bits: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Input embeddings of image tokens: projector(bits) + 2D sin-cos embedding of their grid cell."""
        return image_token_embeddings(self.projector, bits, coords)

    def head_conditions(self, batch: PackedT2IBatch, perturb: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden states [B, L, D], head conditions [N_t, D]) for a packed batch (teacher forcing)."""
        flip_p = self.cfg.flip_p_max if perturb else 0.0
        embeds = scatter_image_embeddings(self.llm.model.embed_tokens(batch.input_ids), batch, self.projector, flip_p)
        mask = build_mask(batch.doc_ids, batch.block_ids, self.cfg.attention)
        hidden = self.llm.model(embeds, batch.position_ids, mask)
        return hidden, head_conditions(hidden.reshape(-1, hidden.shape[-1]), batch)

    def forward(
        self, batch: PackedT2IBatch, head_t: torch.Tensor | None = None, head_noise: torch.Tensor | None = None
    ) -> T2ILoss:
        """Loss terms; `head_t` [N_t / P] and `head_noise` [N_t / P, P, C] fix the diffusion draws (tests)."""
        check_batch(batch, self.cfg)
        hidden, cond = self.head_conditions(batch, perturb=self.training)
        labels = batch.text_labels.reshape(-1)
        labelled = labels != IGNORE_INDEX
        n_text = int(labelled.sum())
        if n_text:
            logits = self.llm.lm_head(hidden.reshape(-1, hidden.shape[-1])[labelled])
            text_sum = F.cross_entropy(logits.float(), labels[labelled], reduction="sum")
        else:
            text_sum = hidden.new_zeros(()).float()
        vision_sum = vision_loss_sum(self.vision_head, cond, batch, self.cfg, head_t, head_noise)
        return combine_losses(text_sum, n_text, vision_sum, batch.target_bits.shape[0], self.cfg)

    def resize_vocab(self, vocab_size: int) -> None:
        """Grow or shrink the text vocabulary; new embedding/LM-head rows start at the mean of the old ones."""
        old = self.cfg.llm.vocab_size
        if vocab_size == old:
            return
        emb, head = self.llm.model.embed_tokens, self.llm.lm_head
        new_emb = nn.Embedding(vocab_size, emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
        new_head = nn.Linear(
            head.in_features, vocab_size, bias=False, device=head.weight.device, dtype=head.weight.dtype
        )
        with torch.no_grad():
            for new, cur in ((new_emb.weight, emb.weight), (new_head.weight, head.weight)):
                new.copy_(resized_rows(cur, vocab_size))
        self.llm.model.embed_tokens, self.llm.lm_head = new_emb, new_head
        self.cfg.llm = replace(self.cfg.llm, vocab_size=vocab_size)
        self.llm.cfg = self.llm.model.cfg = self.cfg.llm
