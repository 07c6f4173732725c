"""Patch-raster token order and the block-causal mask, each against a brute-force reference."""

import pytest
import torch

from models.core.patch_order import block_causal_mask, from_patch_raster, patch_raster_index, to_patch_raster


def brute_force_mask(prefix_len: int, parallel_num: int, grid_tokens: int) -> torch.Tensor:
    """The mask position by position: causal over the prefix; from the last prefix token on, blocks of P."""
    seq = prefix_len + parallel_num - 1 + grid_tokens - parallel_num
    first = prefix_len - 1
    mask = torch.zeros(seq, seq, dtype=torch.bool)
    for q in range(seq):
        for k in range(seq):
            if q < first:
                mask[q, k] = k <= q
            else:
                block_start = first + ((q - first) // parallel_num) * parallel_num
                mask[q, k] = k < block_start + parallel_num
    return mask


@pytest.mark.parametrize("parallel_num", [1, 4, 16])
def test_block_causal_mask_matches_brute_force(parallel_num):
    prefix, grid_tokens = 5, 64
    seq = prefix + grid_tokens - 1
    got = block_causal_mask(seq, prefix - 1, parallel_num)
    assert torch.equal(got, brute_force_mask(prefix, parallel_num, grid_tokens))


def test_p1_mask_is_plain_causal():
    assert torch.equal(block_causal_mask(10, 3, 1), torch.ones(10, 10, dtype=torch.bool).tril())


def test_patch_raster_order_by_hand():
    assert patch_raster_index(4, 4, 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert patch_raster_index(2, 4, 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert patch_raster_index(3, 3, 1).tolist() == list(range(9))


@pytest.mark.parametrize("parallel_num,h,w", [(1, 5, 3), (4, 4, 6), (16, 16, 16), (16, 8, 12), (64, 16, 8)])
def test_patch_raster_round_trip(parallel_num, h, w):
    grid = torch.randn(2, 3, h, w)
    tokens = to_patch_raster(grid, parallel_num)
    assert tokens.shape == (2, h * w, 3)
    p = int(parallel_num**0.5)
    # first patch = the top-left p x p tokens in raster order
    assert torch.equal(tokens[0, :parallel_num], grid[0, :, :p, :p].reshape(3, -1).T)
    assert torch.equal(from_patch_raster(tokens, parallel_num, h, w), grid)


def test_bad_patch_sizes_are_rejected():
    with pytest.raises(ValueError, match="square"):
        patch_raster_index(16, 16, 8)
    with pytest.raises(ValueError, match="not divisible by the patch side"):
        patch_raster_index(6, 6, 16)
    with pytest.raises(ValueError, match="square"):
        patch_raster_index(4, 4, 0)
