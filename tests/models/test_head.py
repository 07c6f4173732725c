"""Binary diffusion head: loss against hand computations, init, time features, the Euler-Maruyama sampler, and
the shared next-patch loop around it."""

import math

import pytest
import torch

from models.core.diffusion_head import BinaryDiffusionHead, HeadConfig, shift_time, timestep_features
from models.core.head_sampler import euler_maruyama
from models.core.next_patch import RowSetDecoder, cfg_row_sets, sample_next_patch
from models.core.sampling import SamplingConfig


def _cfg(**kw):
    base = dict(ch_target=8, ch_cond=16, ch_latent=64, depth_latent=2, depth_adanln=1, head_dim=64)
    base.update(kw)
    return HeadConfig(**base)


def _randomize(head):
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)


@pytest.mark.parametrize("variant", [dict(), dict(sigmoid_output=True, use_swiglu=False, head_dim=32)])
def test_zero_initialised_head_outputs_zeros(variant):
    head = BinaryDiffusionHead(_cfg(**variant))
    z, t, c = torch.randn(3, 4, 8), torch.rand(3), torch.randn(3, 4, 16)
    assert torch.equal(head.net(z, t, c), torch.zeros(3, 4, 8))


def test_loss_matches_hand_computation_for_zero_head():
    # x_hat = 0  =>  v - v_hat = x / max(1 - t, 0.05); with x = ±1 the squared error is 1 / max(1 - t, .05)^2.
    head = BinaryDiffusionHead(_cfg())
    x = torch.randn(2, 4, 8).sign()
    t = torch.tensor([0.5, 0.99])
    noise = torch.randn(2, 4, 8)
    loss = head.loss(x, torch.randn(2, 4, 16), t=t, noise=noise)
    assert loss.item() == pytest.approx((4.0 + 400.0) / 2, rel=1e-5)


def test_loss_matches_formula_with_diff_batch_mul():
    head = BinaryDiffusionHead(_cfg(diff_batch_mul=2))
    _randomize(head)
    x, c = torch.randn(3, 4, 8).sign(), torch.randn(3, 4, 16)
    t, noise = torch.rand(6), torch.randn(6, 4, 8)
    xs, cs = torch.cat([x, x]), torch.cat([c, c])  # tiled k times
    ti = t.view(-1, 1, 1)
    z = (1 - ti) * noise + ti * xs
    denom = (1 - ti).clamp_min(0.05)
    expected = (((xs - z) / denom - (head.net(z, t, cs) - z) / denom) ** 2).mean()
    got = head.loss(x, c, t=t, noise=noise)
    assert torch.allclose(got, expected, rtol=1e-6)
    per_token = head.loss(x, c, t=t, noise=noise, reduction="none")
    assert per_token.shape == (6, 4) and torch.allclose(per_token.mean(), got, rtol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        head.loss(x, c, t=t[:3], noise=noise[:3])


def test_loss_backward_reaches_every_parameter():
    head = BinaryDiffusionHead(_cfg())
    _randomize(head)
    head.loss(torch.randn(4, 4, 8).sign(), torch.randn(4, 4, 16)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_time_features_and_shift():
    f = timestep_features(torch.tensor([0.0, 0.25]))
    assert torch.equal(f[0, :128], torch.ones(128)) and torch.equal(f[0, 128:], torch.zeros(128))
    i = 5
    freq = math.exp(-math.log(10000) * i / 128)
    assert f[1, i].item() == pytest.approx(math.cos(250.0 * freq), abs=1e-5)
    assert f[1, 128 + i].item() == pytest.approx(math.sin(250.0 * freq), abs=1e-5)
    assert shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.25)
    assert torch.equal(shift_time(torch.tensor([0.3]), 1.0), torch.tensor([0.3]))
    t = torch.sigmoid(torch.tensor(0.7))
    assert shift_time(t, 2.0).item() == pytest.approx(0.5 / (0.5 + (1 / t.item() - 1)))


def test_logit_normal_time_distribution():
    head = BinaryDiffusionHead(_cfg())
    t = head.sample_time(200_000, torch.device("cpu"))
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(-0.8, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)


def test_sampler_is_reproducible_with_a_generator():
    head = BinaryDiffusionHead(_cfg())
    _randomize(head)
    c = torch.randn(2, 4, 16)
    a = euler_maruyama(head.net, c, 8, 5, generator=torch.Generator().manual_seed(7))
    b = euler_maruyama(head.net, c, 8, 5, generator=torch.Generator().manual_seed(7))
    d = euler_maruyama(head.net, c, 8, 5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, d)


def test_sampler_steps_match_a_hand_written_reference():
    # x_hat = 0.5 z (a net we can follow by hand), two steps, time shift 3, constant CFG with two rows.
    def net(z, t, c):
        return 0.5 * z + c[..., :1]

    cond, uncond = torch.full((1, 2, 4), 0.3), torch.full((1, 2, 4), -0.2)
    w, shift, steps = 2.5, 3.0, 2
    g = torch.Generator().manual_seed(3)
    got = euler_maruyama(net, cond, 3, steps, w, uncond, shift, generator=g)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 3, generator=g)
    grid = [0.0] + [(1 / shift) / ((1 / shift) + (1 / s - 1)) for s in (0.475, 0.95)]

    def v_of(x, t):
        vc = (0.5 * x + 0.3 - x) / max(1 - t, 0.05)
        vu = (0.5 * x - 0.2 - x) / max(1 - t, 0.05)
        return vu + w * (vc - vu)

    for i in range(steps):
        t, dt = grid[i], grid[i + 1] - grid[i]
        v = v_of(x, t)
        drift = v + (1 - t) * (t * v - x) / (1 - t)
        x = x + drift * dt + math.sqrt(2 * (1 - t) * dt) * torch.randn(1, 2, 3, generator=g)
    x = x + v_of(x, 0.95) * 0.05
    assert torch.allclose(got, x, atol=1e-5)


def test_batched_and_separate_cfg_agree():
    head = BinaryDiffusionHead(_cfg(sigmoid_output=True, use_swiglu=False, head_dim=32))
    _randomize(head)
    c, u = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    a = euler_maruyama(head.net, c, 8, 4, 4.0, u, generator=torch.Generator().manual_seed(1))
    b = euler_maruyama(head.net, c, 8, 4, 4.0, u, generator=torch.Generator().manual_seed(1), batched_cfg=False)
    assert torch.allclose(a, b, atol=1e-5)


def test_bad_head_configs_are_rejected():
    with pytest.raises(ValueError, match="head_dim"):
        _cfg(ch_latent=96, head_dim=64)
    with pytest.raises(ValueError, match="depth_adanln"):
        _cfg(depth_latent=3, depth_adanln=2)
    with pytest.raises(ValueError, match="time_schedule"):
        _cfg(time_schedule="cosine")
    head = BinaryDiffusionHead(_cfg())
    with pytest.raises(ValueError, match=r"\[N, P, 8\]"):
        head.loss(torch.ones(2, 4, 7), torch.zeros(2, 4, 16))


class StubRows:
    """Rows whose conditions follow their row id and the bits fed so far; records what step() received."""

    def __init__(self, ids: list[int]):
        self.ids, self.fed, self.received = torch.tensor(ids, dtype=torch.float32), [], []

    def conditions(self, total: torch.Tensor) -> torch.Tensor:
        return (self.ids[:, None, None] * 0.1 + total).expand(-1, 2, 16).contiguous()

    def prefill(self) -> torch.Tensor:
        return self.conditions(torch.zeros(len(self.ids), 1, 1))

    def step(self, bits: torch.Tensor) -> torch.Tensor:
        self.received.append(tuple(bits.shape))
        self.fed.append(bits.repeat(len(self.ids) // bits.shape[0], 1, 1))  # one patch per row
        total = sum(b.mean(dim=(1, 2)) for b in self.fed)[:, None, None]
        return self.conditions(total)


def test_next_patch_loop_feeds_back_its_bits_and_stacks_row_sets():
    head = BinaryDiffusionHead(_cfg())
    _randomize(head)
    assert cfg_row_sets([1, 2], 9, SamplingConfig(cfg_scale=1.0)) == [[1, 2]]
    assert cfg_row_sets([1, 2], 9, SamplingConfig(cfg_scale=3.0)) == [[1, 2, 9, 9]]
    assert cfg_row_sets([1, 2], 9, SamplingConfig(cfg_scale=3.0, batched_cfg=False)) == [[1, 2], [9, 9]]

    def run(sampling, seed=0):
        sets = [StubRows(s) for s in cfg_row_sets([1, 2], 9, sampling)]
        out = sample_next_patch(
            RowSetDecoder(sets, head.net, 8, 1.0, 3), 2, sampling, torch.Generator().manual_seed(seed)
        )
        return out, sets

    out, sets = run(SamplingConfig(steps=2, cfg_scale=3.0, cfg_schedule="linear"))
    assert out.shape == (2, 3 * 2, 8) and set(out.unique().tolist()) == {-1.0, 1.0}
    # step 0 of the linear schedule is unguided: every one of the 2n rows gets its own patch; later steps feed the
    # n guided patches to both rows of each image
    assert sets[0].received == [(4, 2, 8), (2, 2, 8)]
    assert torch.equal(torch.cat(sets[0].fed, dim=1)[:2], out[:, :4])  # patches 0 and 1 fed back, in order
    assert not torch.equal(sets[0].fed[0][2:], sets[0].fed[0][:2])  # the null rows keep their own first patch
    assert torch.equal(sets[0].fed[1][2:], sets[0].fed[1][:2])
    constant, csets = run(SamplingConfig(steps=2, cfg_scale=3.0))
    assert csets[0].received == [(2, 2, 8)] * 2  # constant guidance: n guided patches at every step
    separate, _ = run(SamplingConfig(steps=2, cfg_scale=3.0, cfg_schedule="linear", batched_cfg=False))
    assert torch.equal(out, separate) and not torch.equal(out, run(SamplingConfig(steps=2, cfg_scale=3.0), 1)[0])
    with pytest.raises(ValueError, match="decoder gave 2 condition rows for 2 images; expected 4"):
        sample_next_patch(RowSetDecoder([StubRows([1, 2])], head.net, 8, 1.0, 3), 2, SamplingConfig(steps=1))
