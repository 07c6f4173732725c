"""Sign quantization of latents into ±1 bits and lossless packing of bit tokens into bytes.

Packing layout: a token of C bits (the last dim, C a multiple of 8) becomes C // 8 uint8 bytes. Bit i of
the token goes to byte i // 8 at bit position 7 - (i % 8), i.e. MSB-first within each byte, exactly like
``numpy.packbits(..., bitorder="big")``. A bit is 1 when the value is > 0 (so +1 -> 1, -1 -> 0, and a
0/1 or bool input keeps its value); unpacking maps 1 -> +1.0 and 0 -> -1.0.
"""

import torch

_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.int64)  # position of bit j (of 8) inside its byte


def sign_quantize(h: torch.Tensor) -> torch.Tensor:
    """+1 where h > 0, else -1 (zero maps to -1), in h's dtype."""
    one = torch.ones((), dtype=h.dtype, device=h.device)
    return torch.where(h > 0, one, -one)


def sign_quantize_ste(h: torch.Tensor) -> torch.Tensor:
    """Sign quantization whose gradient is the identity (straight-through estimator)."""
    return h + (sign_quantize(h) - h).detach()


def _check_width(num_bits: int) -> None:
    if num_bits % 8 != 0:
        raise ValueError(f"latent width C must be a multiple of 8 to pack bits into bytes, got C={num_bits}")


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack [..., C] bits (±1 or 0/1 or bool) into [..., C // 8] uint8, MSB-first within each byte."""
    num_bits = bits.shape[-1]
    _check_width(num_bits)
    ones = (bits > 0).to(torch.int64).reshape(*bits.shape[:-1], num_bits // 8, 8)
    weights = torch.bitwise_left_shift(torch.ones(8, dtype=torch.int64), _BIT_SHIFTS).to(bits.device)
    return (ones * weights).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, num_bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of pack_bits: [..., num_bits // 8] uint8 -> [..., num_bits] tensor of ±1 in ``dtype``."""
    _check_width(num_bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed bits must be uint8, got {packed.dtype}")
    if packed.shape[-1] * 8 != num_bits:
        raise ValueError(f"packed width {packed.shape[-1]} bytes does not match num_bits={num_bits}")
    shifts = _BIT_SHIFTS.to(packed.device)
    ones = torch.bitwise_right_shift(packed.to(torch.int64).unsqueeze(-1), shifts) & 1
    ones = ones.reshape(*packed.shape[:-1], num_bits)
    return ones.to(dtype) * 2 - 1


def flip_bits(bits: torch.Tensor, p_max: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each ±1 element with probability p_max * u, u ~ U(0, 1) drawn per element."""
    r1 = torch.rand(bits.shape, device=bits.device, generator=generator)
    r2 = torch.rand(bits.shape, device=bits.device, generator=generator)
    return torch.where(r1 < p_max * r2, -bits, bits)
