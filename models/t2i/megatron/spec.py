"""The megatron layer spec of the backbone: megatron's GPT layer with our block-causal core attention swapped in.

`transformer_impl="te"` starts from `get_gpt_layer_with_transformer_engine_spec` (TE linears with the input norms
fused into `linear_qkv` / `linear_fc1`; needed for FP8); `"local"` from `get_gpt_layer_local_spec`, whose torch
norm wrapper refuses sequence parallelism, so its norms are replaced by `RMSNorm` below. Either way only the core
attention is ours (built with the attention backend of the model config).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from models.t2i.megatron.attention import BlockCausalCoreAttention
from models.t2i.megatron.config import MegatronParallelConfig


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron's norm-builder signature. Under sequence parallelism each TP rank normalises its
    own slice of the sequence, so the weight is tagged `sequence_parallel` for `finalize_model_grads` to all-reduce
    its gradient over the TP group (as megatron does for its own norms)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(par: MegatronParallelConfig, attention: str = "auto") -> ModuleSpec:
    """One backbone layer: megatron's GPT layer (RMSNorm, QK-norm, SwiGLU) with `BlockCausalCoreAttention` over the
    attention backend `attention` (`models.core.attention.ATTENTION_BACKENDS`)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if par.transformer_impl == "te":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
        layer = spec.submodules
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
        layer = replace(spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm)
        attn = layer.self_attention
        layer = replace(
            layer,
            self_attention=replace(attn, submodules=replace(attn.submodules, q_layernorm=RMSNorm, k_layernorm=RMSNorm)),
        )
    attn = layer.self_attention
    core = functools.partial(BlockCausalCoreAttention, backend=attention)  # megatron calls the builder directly
    attn = replace(attn, submodules=replace(attn.submodules, core_attention=core))
    return replace(spec, submodules=replace(layer, self_attention=attn))


def final_norm(par: MegatronParallelConfig) -> type:
    if par.transformer_impl == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


def block_spec(
    config, par: MegatronParallelConfig, vp_stage: int | None = None, attention: str = "auto"
) -> TransformerBlockSubmodules:
    """The layers of this pipeline stage (model chunk `vp_stage` of it when interleaved) plus the final norm (built
    only on the last stage by TransformerBlock)."""
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec(par, attention)] * n, layer_norm=final_norm(par))
