"""FP8 training without Transformer Engine: torchao's float8 linears on the backbone of the plain PyTorch models.

`convert_backbone` swaps the linear layers of the backbone's transformer blocks (under the module-name prefixes its
model family declares, `ModelFamily.fp8_prefixes`: T2I `llm.model.layers.`, C2I `layers.`) for torchao
`Float8Linear`s (`engine.precision=fp8` of the DeepSpeed engine). Kept in bf16: embeddings,
the bit projectors, the LM head and the whole diffusion head (its output layer `final_layer.linear` included), as the
megatron TE path does, and any backbone linear whose in/out features are not multiples of 16 (float8 matmuls need
16-aligned dims). On CPU the float8 matmul is emulated (torchao's `emulate`: operands quantized to e4m3/e5m2 as on
GPU, then an fp32 matmul): torch's CPU `_scaled_mm` is a reference kernel ~100x slower. Float8Linear keeps
`weight`/`bias` as ordinary parameters, so state dicts keep the plain names and dtypes and an fp8-trained checkpoint
loads into the plain model. torchao is imported only here, only when asked for.
"""

from __future__ import annotations

import dataclasses

from torch import nn

FP8_RECIPES = ("tensorwise", "rowwise")  # torchao float8 scalings, the values of engine.fp8_recipe
ALIGN = 16  # float8 matmuls need both dims of the weight to be multiples of 16


def _torchao_float8():
    try:
        import torchao.float8 as float8
    except ImportError:
        raise ImportError("engine.precision=fp8 needs torchao: pip install torchao==0.18.0") from None
    return float8


def is_backbone_linear(module: nn.Module, fqn: str, prefixes: tuple[str, ...]) -> bool:
    """A linear of a backbone transformer block (`fqn` under one of `prefixes`) with 16-aligned dims."""
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith(prefixes)
        and module.in_features % ALIGN == 0
        and module.out_features % ALIGN == 0
    )


def convert_backbone(model: nn.Module, prefixes: tuple[str, ...], recipe: str = "tensorwise") -> list[str]:
    """Convert `model`'s backbone linears in place to torchao Float8Linear (`recipe`: tensorwise | rowwise); returns
    the converted names (float8 matmuls emulated on CPU). Raises when nothing matched or torchao is missing."""
    if recipe not in FP8_RECIPES:
        raise ValueError(f"engine.fp8_recipe must be one of {FP8_RECIPES}, got {recipe!r}")
    float8 = _torchao_float8()
    names = [n for n, m in model.named_modules() if is_backbone_linear(m, n, prefixes)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no backbone linear with 16-aligned dims to convert to fp8")
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    if next(model.parameters()).device.type == "cpu":
        config = dataclasses.replace(config, emulate=True)
    float8.convert_to_float8_training(
        model, config=config, module_filter_fn=lambda m, fqn: is_backbone_linear(m, fqn, prefixes)
    )
    return names


def skipped_unaligned(model: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Backbone linears left in bf16 because a dim is not a multiple of 16."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith(prefixes) and not is_backbone_linear(m, n, prefixes)
    ]
