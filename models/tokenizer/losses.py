"""Training losses of the binary tokenizer's quantizer: commitment and group-factorized entropy (GFQ)."""

import torch
import torch.nn.functional as F

_MAX_GROUP_BITS = 16


def commitment_loss(h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the latent and its (detached) quantization."""
    return F.mse_loss(h, q.detach())


def group_codebook(bits: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All 2^bits codes in {-1, +1}^bits as [2^bits, bits]; code k has bit i = (k >> i) & 1 (bit 0 = LSB)."""
    k = torch.arange(2**bits, device=device).unsqueeze(1)
    i = torch.arange(bits, device=device)
    return (((k >> i) & 1) * 2 - 1).to(dtype)


def group_entropy_loss(
    h: torch.Tensor, num_groups: int, temperature: float = 0.01, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy loss over bit groups of the latent h [B, z, H, W], computed in float32.

    Returns (per_sample_entropy - codebook_entropy, per_sample_entropy, codebook_entropy). The batch-average
    distribution is taken over all tokens AND groups together (one 2^d distribution), as in the official GFQ.
    """
    z = h.shape[1]
    if z % num_groups:
        raise ValueError(f"latent width z={z} is not divisible by num_groups={num_groups}")
    d = z // num_groups
    if d > _MAX_GROUP_BITS:
        raise ValueError(f"{d} bits per group (z={z} / {num_groups}) is too many to enumerate (max {_MAX_GROUP_BITS})")
    tokens = h.float().movedim(1, -1).reshape(-1, num_groups, d)  # [N, G, d]
    logits = 2 * tokens @ group_codebook(d, h.device).T / temperature  # [N, G, 2^d]
    probs = logits.softmax(dim=-1)
    per_sample = -(probs * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
    avg_probs = probs.reshape(-1, 2**d).mean(dim=0)
    codebook = -(avg_probs * torch.log(avg_probs + eps)).sum()
    return per_sample - codebook, per_sample, codebook
