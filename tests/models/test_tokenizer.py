"""Tests for the binary tokenizer: shapes, parameter names and counts, losses and file loading."""

import itertools
import math

import pytest
import torch

from models.core.state_dict import StateDictMismatchError
from models.tokenizer.io import load_tokenizer, save_tokenizer
from models.tokenizer.losses import commitment_loss, group_entropy_loss
from models.tokenizer.model import (
    TOKENIZER_CONFIGS,
    AdaptiveGroupNorm,
    BinaryAutoencoder,
    TokenizerConfig,
    depth_to_space,
    get_tokenizer_config,
    images_to_tensor,
    tensor_to_images,
)


def _tiny(name: str = "tiny", **overrides) -> BinaryAutoencoder:
    torch.manual_seed(0)
    return BinaryAutoencoder(get_tokenizer_config(name, **overrides))


@pytest.mark.parametrize("name", ["tiny", "tiny16"])
def test_small_configs_encode_decode(name: str) -> None:
    model = _tiny(name).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    down = model.config.downsample
    assert down == {"tiny": 2, "tiny16": 16}[name]
    enc = model.encode(x)
    assert enc.latent.shape == enc.bits.shape == (2, model.config.z_channels, 32 // down, 32 // down)
    assert set(enc.bits.unique().tolist()) <= {-1.0, 1.0}
    recon, enc2 = model(x)
    assert recon.shape == x.shape and torch.equal(enc2.bits, enc.bits)


@pytest.mark.parametrize("name", ["d16c32", "d32c128", "d32c256"])
def test_large_configs_on_meta(name: str) -> None:
    cfg = TOKENIZER_CONFIGS[name]
    with torch.device("meta"):
        model = BinaryAutoencoder(cfg).eval()
        enc = model.encode(torch.empty(1, 3, 256, 256))
        out = model.decode(enc.bits)
    grid = 256 // cfg.downsample
    assert model.latent_grid(256, 512) == (grid, 2 * grid)
    assert enc.bits.shape == (1, cfg.z_channels, grid, grid) and out.shape == (1, 3, 256, 256)
    n = sum(p.numel() for p in model.parameters())
    if name == "d16c32":
        assert abs(n - 460e6) < 0.1 * 460e6, n


def test_official_key_names_and_no_buffers() -> None:
    keys = set(_tiny("tiny16").state_dict())
    for k in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.3.downsample.bias",
        "encoder.down.4.block.0.nin_shortcut.weight",
        "encoder.mid_block.0.conv2.weight",
        "encoder.norm_out.bias",
        "encoder.conv_out.bias",
        "decoder.conv_in.bias",
        "decoder.adaptive.4.gamma.weight",
        "decoder.adaptive.0.beta.bias",
        "decoder.up.3.block.0.nin_shortcut.weight",
        "decoder.up.1.upsample.conv1.weight",
        "decoder.conv_out.weight",
    ]:
        assert k in keys, k
    assert not any(k.startswith("decoder.up.0.upsample") or "encoder.down.4.downsample" in k for k in keys)
    assert "decoder.up.4.block.0.nin_shortcut.weight" not in keys  # top level keeps its width
    assert not any("conv1.bias" in k and "upsample" not in k for k in keys)  # ResBlock convs have no bias
    assert not any(".gn." in k for k in keys)  # adaptive GroupNorm has no affine


def test_latent_grid_and_decode_errors() -> None:
    model = _tiny("tiny16")
    with pytest.raises(ValueError, match="down factor 16"):
        model.latent_grid(256, 250)
    with pytest.raises(ValueError, match="latent has 16 channels but tokenizer tiny16 expects z_channels=32"):
        model.decode(torch.zeros(1, 16, 2, 2))
    with pytest.raises(ValueError, match="known: d16c32"):
        get_tokenizer_config("d99")


def test_image_conversions() -> None:
    imgs = torch.tensor([0, 127, 128, 255], dtype=torch.uint8).view(1, 1, 4, 1).expand(1, 2, 4, 3)
    x = images_to_tensor(imgs)
    assert x.shape == (1, 3, 2, 4) and x.min() == -1 and x.max() == 1
    assert torch.equal(images_to_tensor(imgs.permute(0, 3, 1, 2)), x)
    assert torch.equal(tensor_to_images(x), imgs)


def test_depth_to_space_dcr() -> None:
    x = torch.arange(4.0).view(1, 4, 1, 1)
    assert depth_to_space(x).view(2, 2).tolist() == [[0.0, 1.0], [2.0, 3.0]]
    x = torch.randn(2, 12, 3, 5)  # 3 output channels
    y = depth_to_space(x)
    for c, r, col in itertools.product(range(3), range(6), range(10)):
        src = (r % 2) * 6 + (col % 2) * 3 + c  # channel index = (row offset, col offset, channel)
        assert y[1, c, r, col] == x[1, src, r // 2, col // 2]


def test_adaptive_group_norm_uses_unbiased_latent_variance() -> None:
    agn = AdaptiveGroupNorm(2, 32)
    with torch.no_grad():
        agn.gamma.weight.copy_(torch.eye(32, 2))  # channel 0 <- std of latent channel 0, channel 1 <- ch 1
        agn.gamma.bias.zero_()
        agn.beta.weight.copy_(torch.eye(32, 2))
        agn.beta.bias.fill_(0.5)
    style = torch.tensor([[1.0, -1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]]).view(1, 2, 2, 2)
    x = torch.randn(1, 32, 3, 3)
    out = agn(x, style)
    normed = torch.nn.functional.group_norm(x, 32, eps=1e-6)
    std0 = math.sqrt(sum((v - 0.5) ** 2 for v in [1, -1, 1, 1]) / 3 + 1e-6)  # official: Tensor.var, unbiased
    torch.testing.assert_close(out[0, 0], std0 * normed[0, 0] + 0.5 + 0.5)
    torch.testing.assert_close(out[0, 1], math.sqrt(1e-6) * normed[0, 1] + 0.5 - 1.0)
    torch.testing.assert_close(out[0, 2], torch.full((3, 3), 0.5))


def test_ste_gradients_reach_encoder() -> None:
    model = _tiny().train()
    recon, enc = model(torch.rand(2, 3, 8, 8))
    assert enc.bits.requires_grad
    (recon.square().mean() + commitment_loss(enc.latent, enc.bits)).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.encoder.conv_out.weight.grad.abs().sum() > 0


def test_commitment_loss_value() -> None:
    h = torch.tensor([0.5, -2.0, 1.0, 0.0], requires_grad=True)
    q = torch.tensor([1.0, -1.0, 1.0, -1.0], requires_grad=True)
    loss = commitment_loss(h, q)
    assert loss.item() == pytest.approx((0.25 + 1.0 + 0.0 + 1.0) / 4)
    loss.backward()
    assert q.grad is None


def _brute_entropy(h: torch.Tensor, groups: int, temp: float, eps: float = 1e-5) -> tuple[float, float]:
    b, z, hh, ww = h.shape
    d = z // groups
    codes = list(itertools.product([-1.0, 1.0], repeat=d))
    dists = []
    for bi, y, x, g in itertools.product(range(b), range(hh), range(ww), range(groups)):
        vec = [h[bi, g * d + i, y, x].item() for i in range(d)]
        scores = [2 * sum(v * c for v, c in zip(vec, code, strict=True)) / temp for code in codes]
        top = max(scores)
        log_z = top + math.log(sum(math.exp(s - top) for s in scores))
        dists.append([(math.exp(s - log_z), s - log_z) for s in scores])
    per_sample = sum(-sum(p * lp for p, lp in dist) for dist in dists) / len(dists)
    avg = [sum(dist[k][0] for dist in dists) / len(dists) for k in range(len(codes))]
    return per_sample, -sum(a * math.log(a + eps) for a in avg)


@pytest.mark.parametrize("temp,scale", [(0.01, 0.01), (1.0, 1.0)])
def test_group_entropy_matches_brute_force(temp: float, scale: float) -> None:
    h = torch.randn(2, 6, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * scale
    loss, per_sample, codebook = group_entropy_loss(h, num_groups=2, temperature=temp)
    ref_sample, ref_codebook = _brute_entropy(h, 2, temp)
    assert per_sample.item() == pytest.approx(ref_sample, rel=1e-5, abs=1e-6)
    assert codebook.item() == pytest.approx(ref_codebook, rel=1e-5, abs=1e-6)
    assert loss.item() == pytest.approx(ref_sample - ref_codebook, rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        group_entropy_loss(h, num_groups=4)
    with pytest.raises(ValueError, match="too many"):
        group_entropy_loss(torch.zeros(1, 34, 1, 1), num_groups=2)


def test_save_load_round_trip(tmp_path) -> None:
    model = _tiny()
    cfg = model.config
    path = save_tokenizer(model, cfg, tmp_path, name="mine")
    assert path.name == "ae_mine.safetensors" and (tmp_path / "ae_mine_config.json").is_file()
    loaded = load_tokenizer(tmp_path)
    assert loaded.config.to_ddconfig() == cfg.to_ddconfig() and not loaded.training
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())  # the weights round trip exactly
    # the two instances compute alike; float results are compared with a tolerance (kernels may differ in the last
    # bits), the bits only where the latent is clearly away from 0, and both decode the same bits
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        want, got = model.eval().encode(x), loaded.encode(x)
        torch.testing.assert_close(got.latent, want.latent, rtol=1e-5, atol=1e-6)
        clear = want.latent.abs() > 1e-4
        assert torch.equal(got.bits[clear], want.bits[clear])
        torch.testing.assert_close(loaded.decode(want.bits), model.decode(want.bits), rtol=1e-5, atol=1e-6)


def test_renamed_key_fails_with_its_name(tmp_path) -> None:
    state = _tiny().state_dict()
    state["decoder.conv_out.weight_renamed"] = state.pop("decoder.conv_out.weight")
    torch.save({"state_dict": state}, tmp_path / "ae_tiny.pt")
    with pytest.raises(StateDictMismatchError, match="decoder.conv_out.weight") as err:
        load_tokenizer(tmp_path / "ae_tiny.pt")
    assert "weight_renamed" in str(err.value) and "tokenizer tiny" in str(err.value)


def test_pt_with_prefixes_loads(tmp_path) -> None:
    model = _tiny()
    state = {f"module.vae.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "ae_tiny.pt")
    loaded = load_tokenizer(tmp_path)
    assert loaded.config.name == "tiny" and not loaded.config.gan_decoder
    assert torch.equal(loaded.decoder.conv_out.weight, model.decoder.conv_out.weight)


def test_gan_decoder_noise(tmp_path) -> None:
    model = _tiny(gan_decoder=True).eval()
    assert model.decoder.conv_in.weight.shape[1] == 2 * model.config.z_channels
    q = model.encode(torch.rand(1, 3, 8, 8)).bits
    noise = torch.randn_like(q)
    assert torch.equal(model.decode(q, noise=noise), model.decode(q, noise=noise))
    a = model.decode(q, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, model.decode(q, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(a, model.decode(q, generator=torch.Generator().manual_seed(4)))
    save_tokenizer(model, model.config, tmp_path)  # ae.safetensors + ae_config.json
    assert load_tokenizer(tmp_path / "ae.safetensors").config.gan_decoder


def test_config_from_ddconfig() -> None:
    dd = {
        "double_z": False,
        "z_channels": 32,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 256,
        "ch_mult": [1, 1, 2, 2, 4],
        "num_res_blocks": 4,
        "dropout": 0.0,
    }
    cfg = TokenizerConfig.from_ddconfig(dd, gan_decoder=False)
    ref = TOKENIZER_CONFIGS["d16c32"]
    assert cfg.to_ddconfig() == ref.to_ddconfig() and cfg.entropy_groups == 4 and cfg.downsample == 16
