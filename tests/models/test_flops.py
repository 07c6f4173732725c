"""`models.t2i.flops`: the matmul weights per component against the reference modules, the block-causal pairs against a
brute-force count of the dense mask (padding excluded), and one batch's FLOPs by hand."""

import torch

from cluster.gpu_check.common import synthetic_batch
from models.core.attention import dense_block_causal_mask
from models.t2i.flops import mask_pairs, t2i_batch_flops, t2i_linear_params
from models.t2i.model import TextToImageBitDance, get_t2i_config
from models.t2i.packing import SyntheticPrefixIds, T2ISample, pack_rows
from training.flops import mfu


def linear_weights(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def test_linear_params_match_the_reference_modules():
    cfg = get_t2i_config("tiny-16x")
    ref = TextToImageBitDance(cfg)
    net = ref.vision_head.net
    lp = t2i_linear_params(cfg)
    assert lp["backbone"] == linear_weights(ref.llm.model.layers)
    assert lp["lm_head"] == ref.llm.lm_head.weight.numel()
    assert lp["projector"] == linear_weights(ref.projector)
    assert lp["head_patch"] == linear_weights(net.time_embed)
    assert lp["head_token"] == linear_weights(net) - linear_weights(net.time_embed)


def one_sample_batch():
    """tiny-16x: 10 text ids and an 8x24 grid (12 blocks of P=16), no padding: 204 positions."""
    cfg = get_t2i_config("tiny-16x")
    sample = T2ISample(list(range(100, 110)), torch.ones(cfg.latent_dim, 8, 24))
    return cfg, pack_rows([[sample]], SyntheticPrefixIds(cfg.parallel_num), cfg.parallel_num)


def test_mask_pairs_by_hand_and_against_the_dense_mask_without_padding():
    _, batch = one_sample_batch()
    # 12 causal positions (text, vision_start, res_h): 12 * 13 / 2 pairs; block k (of 12) has 16 queries that see
    # the 12 causal positions and k + 1 blocks of 16
    assert mask_pairs(batch.doc_ids, batch.block_ids) == 78 + sum(16 * (12 + 16 * (k + 1)) for k in range(12))
    rows = synthetic_batch(get_t2i_config("tiny-16x"), 700, rows=3, seed=1)
    real = rows.doc_ids >= 0
    assert (~real).sum() > 0  # the rows end in padding (doc id -1)
    dense = dense_block_causal_mask(rows.doc_ids, rows.block_ids)[:, 0]
    brute = sum(int(dense[b, q].sum()) for b in range(3) for q in range(700) if real[b, q])
    assert mask_pairs(rows.doc_ids, rows.block_ids) == brute < int(dense.sum())


def test_batch_flops_by_hand():
    cfg, batch = one_sample_batch()
    f = t2i_batch_flops(cfg, batch)
    assert (f["positions"], f["text"], f["image_in"], f["targets"], f["pairs"]) == (204, 9, 176, 192, 22350)
    backbone = 2 * (128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 256)  # q, k, v, o, SwiGLU; 2 layers
    lm_head, projector = 128 * 512, 16 * 128 + 128 * 128
    w, hidden = 128, 192  # head width, its SwiGLU width (1.5 w)
    head_token = 16 * w + 128 * w + 6 * w * w + 2 * (4 * w * w + 3 * w * hidden) + 2 * w * w + w * 16
    head_patch = 256 * w + w * w  # timestep MLP, once per patch of 16
    dense = 6 * (backbone * 204 + lm_head * 9 + projector * 176 + head_token * 192 + head_patch * 12)
    attention = 12 * 2 * 4 * 32 * 22350 + 12 * 2 * w * 192 * 16  # backbone pairs; head: 16 keys per target
    assert (f["dense"], f["attention"], f["total"]) == (dense, attention, dense + attention)
    padded = synthetic_batch(cfg, 700, rows=1, seed=1)
    assert t2i_batch_flops(cfg, padded)["positions"] == int((padded.doc_ids >= 0).sum()) < 700


def test_mfu():
    assert mfu(4e15, 2.0, 1000.0, devices=2) == 1.0
