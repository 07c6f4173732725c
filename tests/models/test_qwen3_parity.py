"""Our plain-PyTorch Qwen3 against Hugging Face transformers' Qwen3ForCausalLM (independent implementation)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models.core.attention import dense_block_causal_mask  # noqa: E402
from models.t2i.qwen3 import Qwen3Config, Qwen3ForCausalLM  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ours_cfg = Qwen3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
    )
    hf_cfg = transformers.Qwen3Config(
        **{k: v for k, v in ours_cfg.to_hf_dict("float32").items() if k != "architectures"}
    )
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF zero-inits nothing interesting; make every norm weight non-trivial too
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = Qwen3ForCausalLM(ours_cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def causal(length):
    doc = torch.zeros(1, length, dtype=torch.long)
    return dense_block_causal_mask(doc, torch.arange(length)[None])


def test_logits_match_transformers_on_a_causal_sequence(pair):
    hf, ours = pair
    ids = torch.randint(0, 300, (2, 37))
    pos = torch.arange(37).expand(2, -1)
    with torch.no_grad():
        want = hf(input_ids=ids, position_ids=pos).logits
        got = ours(ids, pos, causal(37))
    assert (got - want).abs().max().item() <= 1e-5


def test_logits_match_transformers_with_restarting_position_ids(pair):
    hf, ours = pair
    ids = torch.randint(0, 300, (1, 40))
    pos = torch.cat([torch.arange(15), torch.arange(25)])[None]
    with torch.no_grad():
        want = hf(input_ids=ids, position_ids=pos).logits
        got = ours(ids, pos, causal(40))
    assert (got - want).abs().max().item() <= 1e-5


def test_config_round_trips_through_transformers():
    cfg = Qwen3Config(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        intermediate_size=256,
    )
    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    assert Qwen3Config.from_hf_dict(hf_cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="model_type 'llama'"):
        Qwen3Config.from_hf_dict({"model_type": "llama"})
