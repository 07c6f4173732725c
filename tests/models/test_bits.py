"""Tests for sign quantization and bit packing (checked against numpy.packbits)."""

import numpy as np
import pytest
import torch

from models.core.bits import pack_bits, sign_quantize, sign_quantize_ste, unpack_bits


@pytest.mark.parametrize("num_bits", [8, 16, 32, 256])
def test_pack_matches_numpy_and_round_trips(num_bits: int) -> None:
    g = torch.Generator().manual_seed(num_bits)
    bits = torch.randint(0, 2, (3, 5, num_bits), generator=g).float() * 2 - 1
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, num_bits // 8)
    expected = np.packbits(bits.numpy() > 0, axis=-1, bitorder="big")
    np.testing.assert_array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_bits(packed, num_bits), bits)
    assert torch.equal(pack_bits(bits > 0), packed)  # bool input
    assert torch.equal(pack_bits((bits > 0).long()), packed)  # 0/1 input


def test_bit_order_is_msb_first() -> None:
    bits = -torch.ones(16)
    bits[0] = 1  # first bit -> top bit of byte 0
    bits[15] = 1  # last bit -> lowest bit of byte 1
    assert pack_bits(bits).tolist() == [128, 1]


def test_bad_widths_raise() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(torch.ones(2, 12))
    with pytest.raises(ValueError, match="does not match"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.uint8), 32)


def test_sign_quantize_and_ste() -> None:
    h = torch.tensor([-1.5, 0.0, 0.2, 3.0], requires_grad=True)
    assert sign_quantize(h).tolist() == [-1.0, -1.0, 1.0, 1.0]
    q = sign_quantize_ste(h)
    assert q.tolist() == [-1.0, -1.0, 1.0, 1.0]
    (q * torch.arange(4.0)).sum().backward()
    assert h.grad.tolist() == [0.0, 1.0, 2.0, 3.0]
