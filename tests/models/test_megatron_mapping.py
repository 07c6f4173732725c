"""Reference/official <-> megatron weights: bit-exact round trips (full, TP shards, PP stages, official folder) and
the megatron layout facts (QKV interleaved per query group, fc1 = [gate; up], TE-fused norms)."""

from dataclasses import replace

import pytest
import torch

from models.core.state_dict import StateDictMismatchError
from models.t2i.io import export_t2i_folder, load_t2i_folder
from models.t2i.megatron.mapping import (
    export_megatron_to_folder,
    fuse_qkv,
    megatron_state_from_folder,
    megatron_to_reference,
    merge_pp,
    merge_tp,
    reference_to_megatron,
    split_pp,
    split_tp,
    stage_layers,
)
from models.t2i.model import TextToImageBitDance, get_t2i_config
from models.t2i.text_tokenizer import T2ITextTokenizer, build_chat_tokenizer
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config

LAYER = "decoder.layers.0."


@pytest.fixture(scope="module")
def reference():
    cfg = get_t2i_config("tiny-4x")
    torch.manual_seed(0)
    model = TextToImageBitDance(cfg).to(torch.bfloat16)
    return cfg, {k: v.detach() for k, v in model.state_dict().items()}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("layout", ["local", "te"])
def test_reference_megatron_reference_is_bit_exact(reference, layout):
    cfg, state = reference
    meg = reference_to_megatron(state, cfg.llm, layout)
    assert_identical(megatron_to_reference(meg, cfg.llm, layout), state)
    norm = "self_attention.linear_qkv.layer_norm_weight" if layout == "te" else "input_layernorm.weight"
    assert torch.equal(meg[LAYER + norm], state["llm.model.layers.0.input_layernorm.weight"])
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if layout == "te" else "pre_mlp_layernorm.weight"
    assert torch.equal(meg[LAYER + mlp_norm], state["llm.model.layers.0.post_attention_layernorm.weight"])
    assert torch.equal(meg["output_layer.weight"], state["llm.lm_head.weight"])
    assert torch.equal(meg["decoder.final_layernorm.weight"], state["llm.model.norm.weight"])


def test_qkv_is_interleaved_per_query_group():
    d, hidden = 2, 3  # 4 query heads, 2 groups: [q0 q1 k0 v0 | q2 q3 k1 v1]
    q = torch.arange(4).repeat_interleave(d)[:, None].expand(-1, hidden).float()
    k, v = 10 + q[: 2 * d], 20 + q[: 2 * d]
    rows = fuse_qkv(q, k, v, groups=2, head_dim=d)[::d, 0].tolist()
    assert rows == [0, 1, 10, 20, 2, 3, 11, 21]


def test_fc1_is_gate_then_up_and_a_tp_shard_keeps_both_halves(reference):
    cfg, state = reference
    meg = reference_to_megatron(state, cfg.llm)
    gate, up = state["llm.model.layers.0.mlp.gate_proj.weight"], state["llm.model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(meg[LAYER + "mlp.linear_fc1.weight"], torch.cat([gate, up]))
    shard = split_tp(meg, 2)[1][LAYER + "mlp.linear_fc1.weight"]
    assert torch.equal(shard, torch.cat([gate[128:], up[128:]]))


@pytest.mark.parametrize("layout", ["local", "te"])
def test_tp_split_merge_round_trip(reference, layout):
    cfg, state = reference
    meg = reference_to_megatron(state, cfg.llm, layout)
    shards = split_tp(meg, 2)
    s0 = shards[0]
    assert s0["word_embeddings.weight"].shape == (256, 128) and s0["output_layer.weight"].shape == (256, 128)
    assert s0[LAYER + "self_attention.linear_qkv.weight"].shape == (1 * (2 + 2) * 32, 128)  # one whole group
    assert torch.equal(
        s0[LAYER + "self_attention.linear_qkv.weight"], meg[LAYER + "self_attention.linear_qkv.weight"][:128]
    )
    assert s0[LAYER + "self_attention.linear_proj.weight"].shape == (128, 64)
    assert s0[LAYER + "mlp.linear_fc2.weight"].shape == (128, 128)
    assert s0["vision_head.net.input_proj.weight"] is meg["vision_head.net.input_proj.weight"]
    merged = merge_tp(shards)
    assert_identical(merged, meg)
    assert_identical(megatron_to_reference(merged, cfg.llm, layout), state)


def test_merge_tp_rejects_a_diverged_replicated_tensor(reference):
    cfg, state = reference
    shards = split_tp(reference_to_megatron(state, cfg.llm), 2)
    shards[1] = dict(shards[1], **{"projector.fc1.bias": shards[1]["projector.fc1.bias"] + 1})
    with pytest.raises(ValueError, match="projector.fc1.bias differs between TP ranks"):
        merge_tp(shards)


def test_pp_split_merge_round_trip_with_layer_offsets(reference):
    cfg, state = reference
    meg = reference_to_megatron(state, cfg.llm)
    first, last = split_pp(meg, cfg.llm.num_hidden_layers, 2)
    assert stage_layers(2, 2, 1) == range(1, 2)
    assert torch.equal(
        last[LAYER + "self_attention.linear_qkv.weight"], meg["decoder.layers.1.self_attention.linear_qkv.weight"]
    )
    assert not any(k.startswith("decoder.layers.1.") for k in first | last)
    assert {"word_embeddings.weight", "projector.fc1.weight"} <= first.keys()
    assert {"output_layer.weight", "decoder.final_layernorm.weight", "vision_head.net.input_proj.weight"} <= last.keys()
    assert not (first.keys() & {"output_layer.weight", "decoder.final_layernorm.weight"})
    assert "word_embeddings.weight" not in last
    assert_identical(merge_pp([first, last], cfg.llm.num_hidden_layers), meg)
    # TP inside PP: every (stage, rank) shard back to the reference
    stages = [merge_tp(split_tp(s, 2)) for s in (first, last)]
    assert_identical(megatron_to_reference(merge_pp(stages, 2), cfg.llm), state)


def test_layer_count_mismatch_is_reported(reference):
    cfg, state = reference
    one_layer = replace(cfg.llm, num_hidden_layers=1)
    with pytest.raises(StateDictMismatchError, match="1-layer model"):
        reference_to_megatron(state, one_layer)
    with pytest.raises(StateDictMismatchError, match="1-layer model"):
        megatron_to_reference(reference_to_megatron(state, cfg.llm), one_layer)


def test_official_folder_to_megatron_and_back(tmp_path):
    tok = T2ITextTokenizer.from_folder(build_chat_tokenizer(["a red circle", "two blue squares"], tmp_path / "t"), 4)
    cfg = get_t2i_config("tiny-4x")
    cfg = replace(cfg, llm=replace(cfg.llm, vocab_size=len(tok) + (-len(tok)) % 4))  # TP-divisible vocabulary
    torch.manual_seed(0)
    model = TextToImageBitDance(cfg).to(torch.bfloat16)
    official = export_t2i_folder(model, tok, BinaryAutoencoder(get_tokenizer_config("tiny")), tmp_path / "official")
    meg, cfg_loaded, text_tok, image_tok = megatron_state_from_folder(official, layout="te")
    assert cfg_loaded.llm == cfg.llm and cfg_loaded.head == cfg.head
    meg = merge_tp(split_tp(meg, 2))  # as a TP=2 run would save it
    out = export_megatron_to_folder(meg, cfg_loaded, text_tok, image_tok, tmp_path / "exported", layout="te")
    again, _, _ = load_t2i_folder(out)
    assert_identical(again.state_dict(), model.state_dict())
