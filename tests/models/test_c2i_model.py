"""Class-conditional BitDance: 2D RoPE, KV-cache decoding vs teacher forcing, training pieces, sampler, errors."""

import math

import pytest
import torch

from models.c2i.model import ClassConditionalBitDance, get_c2i_config
from models.c2i.sampler import sample_class_conditional
from models.core.bits import flip_bits
from models.core.patch_order import to_patch_raster
from models.core.rope import apply_rope, rope_2d_angles
from models.core.sampling import SamplingConfig, cfg_at_step


def tiny(P=1, **kw):
    return ClassConditionalBitDance(get_c2i_config("tiny", parallel_num=P, **kw))


def test_rope_2d_angles_follow_the_spec():
    d, h, w, prefix = 16, 3, 5, 2
    ang = rope_2d_angles(h, w, d, prefix)
    assert ang.shape == (prefix + h * w, d // 2) and torch.equal(ang[:prefix], torch.zeros(prefix, d // 2))
    r, c = 2, 4
    for j in range(d // 4):
        f = 1 / 10000 ** (2 * j / (d / 2))
        assert ang[prefix + r * w + c, j].item() == pytest.approx((c + 1.5) * f, rel=1e-6)
        assert ang[prefix + r * w + c, d // 4 + j].item() == pytest.approx((r + 1.5) * f, rel=1e-6)


def test_apply_rope_rotates_adjacent_pairs():
    x = torch.randn(1, 1, 1, 4)
    ang = torch.tensor([[0.3, 1.1]])
    out = apply_rope(x, ang.cos(), ang.sin())[0, 0, 0]
    a = x[0, 0, 0]
    for i, th in enumerate([0.3, 1.1]):
        assert out[2 * i].item() == pytest.approx(a[2 * i].item() * math.cos(th) - a[2 * i + 1].item() * math.sin(th))
        assert out[2 * i + 1].item() == pytest.approx(
            a[2 * i + 1].item() * math.cos(th) + a[2 * i].item() * math.sin(th)
        )


@pytest.mark.parametrize("P", [1, 4, 16])
def test_kv_cache_decoding_matches_teacher_forcing(P):
    model = tiny(P).eval()
    assert model.head.cfg.block == ("mlp" if P == 1 else "attention")  # 1x: the token-wise head of the releases
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.1)
    c = model.cfg
    labels = torch.tensor([3, c.num_classes])
    tokens = to_patch_raster(torch.randn(2, c.latent_dim, c.grid, c.grid).sign(), P)
    with torch.no_grad():
        full = model.head_conditions(tokens, labels)
        cache = model.new_cache(2)
        x, start, steps = model.prefix_embeddings(labels), 0, []
        for i in range(c.grid * c.grid // P):
            hidden = model.run_backbone(x, start, cache)
            start += x.shape[1]
            steps.append(hidden[:, -P:] + model.pos_for_diff.weight[i * P : (i + 1) * P])
            x = model.proj_in(tokens[:, i * P : (i + 1) * P])
    incremental = torch.cat(steps, dim=1)
    assert incremental.shape == full.shape == (2, c.grid * c.grid, c.dim)
    assert (incremental - full).abs().max().item() <= 1e-4


def test_block_structure_lets_patch_tokens_see_each_other_only_inside_the_block():
    model = tiny(4).eval()
    c = model.cfg
    labels = torch.tensor([1])
    tokens = to_patch_raster(torch.randn(1, c.latent_dim, c.grid, c.grid).sign(), 4)
    with torch.no_grad():
        base = model.head_conditions(tokens, labels)
        changed = tokens.clone()
        changed[:, 5] = -changed[:, 5]  # a token of patch 1: affects predictions of patch 2 on, not 0 or 1
        after = model.head_conditions(changed, labels)
    diff = (after - base).abs().amax(dim=-1)[0]
    assert diff[:8].max() == 0 and diff[8:12].min() > 0


def test_training_loss_reaches_all_parameters_and_falls():
    model = tiny(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    bits = torch.randn(4, 16, 16, 16).sign()
    labels = torch.tensor([0, 1, 2, 3])
    model(bits, labels).backward()
    assert all(p.grad is not None for p in model.parameters())
    torch.manual_seed(1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model(bits, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_bit_flip_perturbation_rate():
    bits = torch.ones(400_000)
    flipped = (flip_bits(bits, 0.1) < 0).float().mean().item()
    assert flipped == pytest.approx(0.05, abs=0.003)  # E[p_max * u] = p_max / 2
    assert torch.equal(flip_bits(bits, 0.0), bits)


def test_label_dropout_only_in_training():
    model = tiny(1, class_dropout=0.5)
    labels = torch.zeros(10_000, dtype=torch.long)
    assert (model.drop_labels(labels) == model.cfg.num_classes).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert torch.equal(model.eval().drop_labels(labels), labels)


def test_sampler_reproducible_and_batched_cfg_equals_separate():
    model = tiny(16)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.1)
    labels = torch.tensor([1, 7])

    def run(seed, batched):
        g = torch.Generator().manual_seed(seed)
        return sample_class_conditional(model, labels, SamplingConfig(3, 4.0, "constant", batched), g)

    a, b, sep = run(0, True), run(0, True), run(0, False)
    assert a.shape == (2, 16, 16, 16) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a, b) and torch.equal(a, sep)
    assert not torch.equal(a, run(1, True))


def test_cfg_schedules():
    assert cfg_at_step(4.0, "linear", 0, 16) == 1.0
    assert cfg_at_step(4.0, "linear", 8, 16) == pytest.approx(2.5)
    assert cfg_at_step(4.0, "constant", 0, 16) == 4.0
    assert cfg_at_step(1.0, "constant", 3, 16) == 1.0
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_at_step(4.0, "cosine", 0, 16)


def test_named_configs_and_bad_input():
    b16 = get_c2i_config("B-16x")
    assert (b16.dim, b16.n_layer, b16.n_head, b16.parallel_num, b16.grid) == (768, 24, 12, 16, 16)
    assert get_c2i_config("H").head_adaln == 3 and get_c2i_config("L").flip_p_max == 0.05
    with pytest.raises(ValueError, match="unknown model config 'XL'"):
        get_c2i_config("XL")
    with pytest.raises(ValueError, match="must be a square"):
        get_c2i_config("tiny", parallel_num=8)
    with pytest.raises(ValueError, match="not divisible by the patch side"):
        get_c2i_config("tiny", parallel_num=16, image_size=20)
    model = tiny(1)
    with pytest.raises(ValueError, match=r"expected bits \[B, 16, 16, 16\]"):
        model(torch.ones(1, 32, 16, 16), torch.tensor([0]))
    with pytest.raises(ValueError, match="class ids"):
        sample_class_conditional(model, torch.tensor([10]), SamplingConfig(steps=2))
