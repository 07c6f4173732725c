"""Parallel-layout validation for the megatron T2I model: one-line errors naming the fix; Qwen3 -> TransformerConfig."""

from dataclasses import replace

import pytest
import torch

from models.t2i.megatron import config as mcfg
from models.t2i.megatron.config import MegatronParallelConfig, validate_parallel
from models.t2i.model import get_t2i_config


def tiny(**llm):
    cfg = get_t2i_config("tiny-4x")  # 4 heads, 2 KV heads, 2 layers, vocab 512, MLP 256, hidden 128
    return replace(cfg, llm=replace(cfg.llm, **llm)) if llm else cfg


def error_of(cfg, **par) -> str:
    with pytest.raises(ValueError) as info:
        validate_parallel(cfg, MegatronParallelConfig(**par))
    msg = str(info.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    return msg


@pytest.fixture
def no_te(monkeypatch):
    monkeypatch.setattr(mcfg, "transformer_engine_available", lambda: False)


@pytest.fixture
def fake_te(monkeypatch):  # lets the checks behind "is TE importable" run on a machine without it
    monkeypatch.setattr(mcfg, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(
    "par, problem, fix",
    [
        (dict(tp=3), "does not divide the 4 attention heads", "choose tp"),
        (dict(tp=4), "does not divide the 2 query groups", "choose tp dividing the number of KV heads"),
        (dict(pp=3), "does not divide the 2 layers", "choose pp"),
        (dict(tp=1, sequence_parallel=True), "sequence_parallel needs tensor parallelism", "set tp > 1"),
        (dict(transformer_impl="tee"), "unknown transformer_impl", "choose one of"),
    ],
)
def test_layout_errors_name_problem_and_fix(par, problem, fix):
    msg = error_of(tiny(), **par)
    assert problem in msg and fix in msg, msg


def test_vocab_must_split_evenly_over_tp():
    msg = error_of(tiny(vocab_size=513), tp=2)
    assert "513 vocabulary entries" in msg and "resize_vocab" in msg


def test_fp8_without_transformer_engine(no_te):
    msg = error_of(tiny(), fp8="hybrid", transformer_impl="te")
    assert "fp8 needs Transformer Engine" in msg and "set fp8=None" in msg
    msg = error_of(tiny(), fp8="e4m3")  # local impl: the missing TE is still the first thing to fix
    assert "Transformer Engine" in msg


def test_te_impl_without_transformer_engine(no_te):
    msg = error_of(tiny(), transformer_impl="te")
    assert "not importable" in msg and "transformer_impl='local'" in msg


def test_fp8_size_and_recipe_checks(fake_te, monkeypatch):
    assert "set transformer_impl='te'" in error_of(tiny(), fp8="hybrid")
    msg = error_of(tiny(intermediate_size=264), fp8="hybrid", transformer_impl="te")
    assert "divisible by 16" in msg and "intermediate_size / tp is 264" in msg
    assert "divisible by 32" in error_of(
        tiny(intermediate_size=272), fp8="e4m3", transformer_impl="te", fp8_recipe="mxfp8"
    )
    assert "fp8_recipe='tensorwise'" in error_of(tiny(), fp8="hybrid", transformer_impl="te", fp8_recipe="delayed")
    validate_parallel(tiny(), MegatronParallelConfig(fp8="hybrid", transformer_impl="te", tp=2))  # fine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    msg = error_of(tiny(), fp8="hybrid", transformer_impl="te")
    assert "compute capability >= 8.9" in msg and "8.0" in msg


def test_transformer_config_is_qwen3():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    tc = mcfg.transformer_config(get_t2i_config("14B-16x"), MegatronParallelConfig(tp=8, pp=4, sequence_parallel=True))
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size) == (40, 5120, 17408)
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (40, 8, 128)
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-6
    assert tc.gated_linear_unit and tc.activation_func is torch.nn.functional.silu
    assert tc.qk_layernorm and not tc.add_bias_linear and not tc.add_qkv_bias and not tc.rotary_interleaved
    assert (tc.tensor_model_parallel_size, tc.pipeline_model_parallel_size, tc.sequence_parallel) == (8, 4, True)
    assert tc.params_dtype == torch.bfloat16 and tc.bf16 and tc.hidden_dropout == 0 and tc.attention_dropout == 0
