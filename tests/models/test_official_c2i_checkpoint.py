"""Official ImageNet checkpoints: a state dict built here from the official names and shapes loads strictly."""

import math

import pytest
import torch

from models.c2i.io import load_c2i_checkpoint, save_c2i_checkpoint
from models.c2i.model import ClassConditionalBitDance, get_c2i_config
from models.core.state_dict import StateDictMismatchError
from models.tokenizer.io import save_tokenizer
from models.tokenizer.model import get_tokenizer_config


def _resblock(prefix, cin, cout):
    keys = {
        f"{prefix}.norm1.weight": (cin,),
        f"{prefix}.norm1.bias": (cin,),
        f"{prefix}.conv1.weight": (cout, cin, 3, 3),
        f"{prefix}.norm2.weight": (cout,),
        f"{prefix}.norm2.bias": (cout,),
        f"{prefix}.conv2.weight": (cout, cout, 3, 3),
    }
    if cin != cout:
        keys[f"{prefix}.nin_shortcut.weight"] = (cout, cin, 1, 1)
    return keys


def official_tokenizer_shapes(ch, ch_mult, nrb, z):
    """The official tokenizer's keys and shapes, written out independently of models/tokenizer/model.py."""
    s = {"encoder.conv_in.weight": (ch, 3, 3, 3)}
    in_mult = (1, *ch_mult)
    for i, m in enumerate(ch_mult):
        cin, cout = ch * in_mult[i], ch * m
        for j in range(nrb):
            s.update(_resblock(f"encoder.down.{i}.block.{j}", cin if j == 0 else cout, cout))
        if i < len(ch_mult) - 1:
            s[f"encoder.down.{i}.downsample.weight"] = (cout, cout, 3, 3)
            s[f"encoder.down.{i}.downsample.bias"] = (cout,)
    top = ch * ch_mult[-1]
    for j in range(nrb):
        s.update(_resblock(f"encoder.mid_block.{j}", top, top))
        s.update(_resblock(f"decoder.mid_block.{j}", top, top))
    s.update(
        {
            "encoder.norm_out.weight": (top,),
            "encoder.norm_out.bias": (top,),
            "encoder.conv_out.weight": (z, top, 1, 1),
            "encoder.conv_out.bias": (z,),
            "decoder.conv_in.weight": (top, z, 3, 3),
            "decoder.conv_in.bias": (top,),
        }
    )
    cin = top
    for i in reversed(range(len(ch_mult))):
        for name in ("gamma", "beta"):
            s[f"decoder.adaptive.{i}.{name}.weight"] = (cin, z)
            s[f"decoder.adaptive.{i}.{name}.bias"] = (cin,)
        cout = ch * ch_mult[i]
        for j in range(nrb):
            s.update(_resblock(f"decoder.up.{i}.block.{j}", cin if j == 0 else cout, cout))
        cin = cout
        if i > 0:
            s[f"decoder.up.{i}.upsample.conv1.weight"] = (4 * cout, cout, 3, 3)
            s[f"decoder.up.{i}.upsample.conv1.bias"] = (4 * cout,)
    s.update(
        {
            "decoder.norm_out.weight": (cin,),
            "decoder.norm_out.bias": (cin,),
            "decoder.conv_out.weight": (3, cin, 3, 3),
            "decoder.conv_out.bias": (3,),
        }
    )
    return s


def official_c2i_shapes(dim, n_layer, n_classes, cls_tokens, P, C, hw, head_depth, head_adaln):
    """The official ImageNet model's keys and shapes (backbone, `head.net.*`), written out independently of
    models/c2i/model.py."""
    ffn = -(-int(2 * 4 * dim / 3) // 256) * 256
    h15 = int(1.5 * dim)
    s = {
        "cls_embedding.weight": (n_classes + 1, dim * cls_tokens),
        "proj_in.w1.weight": (2 * h15, C),
        "proj_in.w1.bias": (2 * h15,),
        "proj_in.w2.weight": (dim, h15),
        "proj_in.w2.bias": (dim,),
        "emb_norm.weight": (dim,),
        "norm.weight": (dim,),
        "pos_for_diff.weight": (hw, dim),
    }
    if P > 1:  # the token-by-token (1x) model has no query tokens
        s["query_token"] = (1, P - 1, dim)
    for i in range(n_layer):
        p = f"layers.{i}"
        s.update(
            {
                f"{p}.attention.wqkv.weight": (3 * dim, dim),
                f"{p}.attention.wo.weight": (dim, dim),
                f"{p}.feed_forward.w1.weight": (2 * ffn, dim),
                f"{p}.feed_forward.w2.weight": (dim, ffn),
                f"{p}.attention_norm.weight": (dim,),
                f"{p}.ffn_norm.weight": (dim,),
            }
        )
    W, n = dim, "head.net"
    s.update(
        {
            f"{n}.input_proj.weight": (W, C),
            f"{n}.input_proj.bias": (W,),
            f"{n}.cond_embed.weight": (W, dim),
            f"{n}.cond_embed.bias": (W,),
            f"{n}.time_embed.mlp.0.weight": (W, 256),
            f"{n}.time_embed.mlp.0.bias": (W,),
            f"{n}.time_embed.mlp.2.weight": (W, W),
            f"{n}.time_embed.mlp.2.bias": (W,),
            f"{n}.final_layer.ada_ln_modulation.weight": (2 * W, W),
            f"{n}.final_layer.ada_ln_modulation.bias": (2 * W,),
            f"{n}.final_layer.linear.weight": (C, W),
            f"{n}.final_layer.linear.bias": (C,),
        }
    )
    chunks = 6 if P > 1 else 3  # adaLN chunks: attention head (P > 1) or the token-wise MLP head of 1x
    for k in range(head_depth):
        b = f"{n}.res_blocks.{k}"
        norms = ("norm1", "norm2") if P > 1 else ("norm",)
        for norm in norms:
            s[f"{b}.{norm}.weight"] = (W,)
            s[f"{b}.{norm}.bias"] = (W,)
        if P > 1:
            s.update(
                {
                    f"{b}.attn.wqkv.weight": (3 * W, W),
                    f"{b}.attn.wqkv.bias": (3 * W,),
                    f"{b}.attn.wo.weight": (W, W),
                    f"{b}.attn.wo.bias": (W,),
                }
            )
        s.update(
            {
                f"{b}.w1.weight": (3 * W, W),
                f"{b}.w1.bias": (3 * W,),
                f"{b}.w2.weight": (W, int(1.5 * W)),
                f"{b}.w2.bias": (W,),
            }
        )
    for m in range(head_adaln):
        s[f"{n}.ada_ln_blocks.{m}.weight"] = (chunks * W, W)
        s[f"{n}.ada_ln_blocks.{m}.bias"] = (chunks * W,)
    return s


@pytest.fixture(params=[4, 1], ids=["4x", "1x"])
def official_checkpoint(tmp_path, request):
    P = request.param
    cfg = get_c2i_config("tiny", parallel_num=P)
    tok = get_tokenizer_config(cfg.tokenizer)
    shapes = official_c2i_shapes(
        cfg.dim,
        cfg.n_layer,
        cfg.num_classes,
        cfg.cls_token_num,
        P,
        cfg.latent_dim,
        cfg.grid**2,
        cfg.head_depth,
        cfg.head_adaln,
    )
    shapes.update(
        {
            f"vae.{k}": v
            for k, v in official_tokenizer_shapes(tok.ch, tok.ch_mult, tok.num_res_blocks, tok.z_channels).items()
        }
    )
    ema = {k: torch.randn(v) for k, v in shapes.items()}
    model = {k: torch.randn(v) for k, v in shapes.items()}
    path = tmp_path / "bitdance_tiny.pt"
    torch.save({"model": model, "ema": ema, "steps": 7}, path)
    return cfg, path, ema, model


def test_official_state_dict_loads_strictly(official_checkpoint):
    cfg, path, ema, raw = official_checkpoint
    model, tokenizer = load_c2i_checkpoint(path, cfg)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k]), k
    for k, v in tokenizer.state_dict().items():
        assert torch.equal(v, ema[f"vae.{k}"]), k
    model, _ = load_c2i_checkpoint(path, cfg, use_ema=False)
    assert torch.equal(model.cls_embedding.weight, raw["cls_embedding.weight"])


def test_renamed_key_fails_naming_it(official_checkpoint, tmp_path):
    cfg, path, ema, _ = official_checkpoint
    ema["layers.1.attention.w_qkv.weight"] = ema.pop("layers.1.attention.wqkv.weight")
    bad = tmp_path / "bad.pt"
    torch.save({"ema": ema}, bad)
    with pytest.raises(StateDictMismatchError) as err:
        load_c2i_checkpoint(bad, cfg)
    assert "layers.1.attention.wqkv.weight" in str(err.value)
    assert "layers.1.attention.w_qkv.weight" in str(err.value)


def test_checkpoint_without_vae_takes_tokenizer_from_its_file(official_checkpoint, tmp_path):
    cfg, path, ema, _ = official_checkpoint
    no_vae = {k: v for k, v in ema.items() if not k.startswith("vae.")}
    torch.save({"model": no_vae}, tmp_path / "no_vae.pt")
    with pytest.raises(ValueError, match="no 'vae.' tokenizer weights"):
        load_c2i_checkpoint(tmp_path / "no_vae.pt", cfg)
    tok_sd = {k[4:]: v for k, v in ema.items() if k.startswith("vae.")}
    torch.save({"state_dict": tok_sd}, tmp_path / "ae_tiny.pt")
    _, tokenizer = load_c2i_checkpoint(tmp_path / "no_vae.pt", cfg, tokenizer_path=tmp_path / "ae_tiny.pt")
    assert torch.equal(tokenizer.decoder.conv_out.weight, ema["vae.decoder.conv_out.weight"])


def test_wrong_latent_width_tokenizer_is_rejected(official_checkpoint, tmp_path):
    cfg, path, _, _ = official_checkpoint
    from models.tokenizer.model import BinaryAutoencoder

    other = get_tokenizer_config("tiny16")
    save_tokenizer(BinaryAutoencoder(other), other, tmp_path / "tok", name="tiny16")
    with pytest.raises(ValueError, match="expects 16"):
        load_c2i_checkpoint(path, cfg, tokenizer_path=tmp_path / "tok")


def test_save_then_load_round_trip(official_checkpoint, tmp_path):
    cfg, path, _, _ = official_checkpoint
    model, tokenizer = load_c2i_checkpoint(path, cfg)
    save_c2i_checkpoint(tmp_path / "again.pt", model, tokenizer, ema=model)
    again, tok2 = load_c2i_checkpoint(tmp_path / "again.pt", cfg)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def official_c2i_parameter_count(name: str) -> int:
    """Parameters of a released ImageNet model from the official layout written out above (tokenizer excluded)."""
    sizes = {"B": (768, 24, 6, 2), "L": (1024, 32, 8, 2), "H": (1280, 40, 12, 3)}
    size, P = name.split("-")
    dim, n_layer, depth, adaln = sizes[size]
    shapes = official_c2i_shapes(dim, n_layer, 1000, 64, int(P[:-1]), 32, 256, depth, adaln)
    return sum(math.prod(s) for s in shapes.values())


@pytest.mark.parametrize(
    "name,published",
    [("B-1x", 242e6), ("B-4x", 260e6), ("B-16x", 260e6), ("L-1x", 527e6), ("H-1x", 1.0e9)],
)
def test_parameter_counts_equal_the_official_layout_and_the_published_figures(name, published):
    """Our model's count equals the official layout's exactly; the published figure is that count rounded as the
    official README prints it (to the MB for B/L: within 0.5%; "1.0B" for H, whose count is 1,007,960,352)."""
    with torch.device("meta"):
        model = ClassConditionalBitDance(get_c2i_config(name))
    ours = sum(p.numel() for p in model.parameters())
    assert ours == official_c2i_parameter_count(name)
    if published < 1e9:
        assert abs(ours - published) / published < 0.005, (name, ours)
    else:
        assert round(ours / 1e9, 1) == 1.0, (name, ours)
