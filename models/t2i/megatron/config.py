"""Parallel settings of a megatron run, their validation, and the megatron `TransformerConfig` of the T2I backbone.

`validate_parallel` raises a one-line `ValueError` naming the problem and the fix before megatron builds anything
(megatron's own checks are asserts deep inside layer constructors). `transformer_config` maps our `T2IConfig`
(Qwen3: RMSNorm 1e-6, SwiGLU, GQA, per-head QK-norm, no bias, RoPE base 1e6, untied LM head) onto megatron's fields.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.t2i.model import T2IConfig

TRANSFORMER_IMPLS = ("local", "te")
FP8_FORMATS = (None, "hybrid", "e4m3")
FP8_RECIPES = ("tensorwise", "delayed", "mxfp8", "blockwise")
RECOMPUTE = (None, "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass
class ParallelSettings:
    """The model-parallel layout a user chooses (the `parallel` section of a training config); data-parallel size =
    world size / (tp * pp)."""

    tp: int = 1  # tensor-parallel ranks (divides heads, KV heads, MLP width, vocabulary)
    pp: int = 1  # pipeline stages (divides the layers, unless pp_layers says how many each stage takes)
    # Layers per pipeline stage, e.g. [12, 10, 10, 8] for pp=4: the last stage, which also holds the LM head and
    # the diffusion head, can take fewer; the stages in between take equal shares. None: an even split.
    pp_layers: list[int] | None = None
    virtual_pp: int | None = None  # model chunks per pipeline stage (interleaved 1F1B); None: one chunk
    sequence_parallel: bool = False  # split norm/dropout activations along the sequence over TP (needs tp > 1)
    transformer_impl: str = "local"  # "local": megatron's own layers; "te": Transformer Engine layers (FP8)
    fp8: str | None = None  # None, "hybrid" (e4m3 forward, e5m2 backward) or "e4m3"
    fp8_recipe: str = "tensorwise"  # tensorwise | delayed | mxfp8 | blockwise
    bf16_layers_at_start: int = 1  # with FP8: backbone layers kept in BF16 at each end of the stack
    bf16_layers_at_end: int = 1
    # Activation recompute (memory for compute): None (model.activation_checkpointing=true then means "full"),
    # "full": layer inputs are kept and whole layers rerun in the backward pass (the diffusion head's blocks too),
    # "selective": only the core attention (scores, softmax) reruns, megatron's recompute_modules=["core_attn"].
    recompute: str | None = None
    recompute_method: str | None = None  # full only: "uniform" (default) or "block"
    # full only: uniform reruns groups of this many layers (default 1: every layer on its own); block reruns only the
    # first this-many layers of each model chunk and keeps the activations of the rest
    recompute_num_layers: int | None = None
    # Data-parallel communication (megatron's DDP and distributed optimizer): overlap the gradient reduce-scatter
    # with the backward pass, the parameter all-gather with the next forward pass; reduce gradients in fp32 or in
    # the parameter dtype (bf16: half the traffic).
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    grad_reduce_in_fp32: bool = True


@dataclass
class MegatronParallelConfig(ParallelSettings):
    """The settings above plus how this process builds the layers (set by the engine, not by users)."""

    params_dtype: torch.dtype = torch.bfloat16
    use_cpu_initialization: bool = False
    perform_initialization: bool = True


@functools.cache
def transformer_engine_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or OSError from a wheel built against another CUDA
        return False
    return True


def _divides(what: str, n: int, size: int, name: str, fix: str) -> None:
    if n % size:
        raise ValueError(f"{name}={size} does not divide the {n} {what}; {fix}")


def _check_fp8(cfg: T2IConfig, par: MegatronParallelConfig) -> None:
    if par.fp8 not in FP8_FORMATS:
        raise ValueError(f"unknown fp8 format {par.fp8!r}; choose one of {FP8_FORMATS}")
    if par.fp8 is None:
        return
    if not transformer_engine_available():
        raise ValueError(
            "fp8 needs Transformer Engine, which is not importable here; install transformer-engine "
            "(the 'gpu' extra) or set fp8=None"
        )
    if par.transformer_impl != "te":
        raise ValueError("fp8 runs only on Transformer Engine layers; set transformer_impl='te'")
    if par.fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"unknown fp8_recipe {par.fp8_recipe!r}; choose one of {FP8_RECIPES}")
    m = cfg.llm
    align = 32 if par.fp8_recipe == "mxfp8" else 16
    dims = {
        "hidden_size": m.hidden_size,
        "intermediate_size / tp": m.intermediate_size // par.tp,
        "attention width / tp": m.num_attention_heads * m.head_dim // par.tp,
    }
    for name, d in dims.items():
        if d % align:
            raise ValueError(
                f"fp8 ({par.fp8_recipe}) needs sizes divisible by {align} but {name} is {d}; "
                "change the model size or tp, or set fp8=None"
            )
    if par.fp8_recipe == "delayed" and (par.bf16_layers_at_start or par.bf16_layers_at_end):
        raise ValueError(
            "delayed-scaling fp8 cannot keep the first/last layers in BF16; use fp8_recipe='tensorwise' "
            "or set bf16_layers_at_start=bf16_layers_at_end=0"
        )
    per_stage = m.num_hidden_layers // par.pp
    for name in ("bf16_layers_at_start", "bf16_layers_at_end"):
        if not 0 <= getattr(par, name) <= per_stage:
            raise ValueError(f"{name}={getattr(par, name)} must be in [0, {per_stage}] (layers per pipeline stage)")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            raise ValueError(
                f"fp8 needs a GPU of compute capability >= 8.9 (Ada/Hopper) but this one is "
                f"{major}.{minor}; set fp8=None"
            )


def _check_pp_layers(num_layers: int, par: MegatronParallelConfig) -> None:
    layers = list(par.pp_layers)
    if len(layers) != par.pp or sum(layers) != num_layers or min(layers) < 1:
        raise ValueError(
            f"pp_layers={layers} must list pp={par.pp} positive layer counts adding up to the {num_layers} layers"
        )
    if len(set(layers[1:-1])) > 1:
        raise ValueError(
            f"pp_layers={layers}: only the first and last stages may differ, the stages in between take equal "
            "shares; e.g. " + str([layers[0], *[sum(layers[1:-1]) // (par.pp - 2)] * (par.pp - 2), layers[-1]])
        )
    if par.virtual_pp is not None:
        raise ValueError(f"pp_layers={layers} with virtual_pp is not supported; set virtual_pp=None or pp_layers=None")


def stage_layer_counts(num_layers: int, par: ParallelSettings) -> list[int]:
    """Layers held by each pipeline stage."""
    return list(par.pp_layers) if par.pp_layers is not None else [num_layers // par.pp] * par.pp


def recompute_plan(cfg: T2IConfig, par: MegatronParallelConfig) -> tuple[str, int] | None:
    """(method, layers) of full recompute, None without it; raises a one-line ValueError for a setting megatron
    cannot run (its own checks are asserts or IndexErrors mid-forward)."""
    if par.recompute not in RECOMPUTE:
        raise ValueError(f"unknown recompute {par.recompute!r}; choose null, 'full' or 'selective'")
    if par.recompute != "full":
        if par.recompute_method is not None or par.recompute_num_layers is not None:
            raise ValueError(
                "recompute_method / recompute_num_layers apply to recompute='full' only; set recompute='full' or "
                "leave them unset"
            )
        return None
    method = par.recompute_method or "uniform"
    if method not in RECOMPUTE_METHODS:
        raise ValueError(f"unknown recompute_method {method!r}; choose one of {RECOMPUTE_METHODS}")
    chunks = [c // (par.virtual_pp or 1) for c in stage_layer_counts(cfg.llm.num_hidden_layers, par)]
    per_chunk = min(chunks)
    n = par.recompute_num_layers
    if n is None and method == "block":
        raise ValueError("recompute_method='block' needs recompute_num_layers (layers recomputed per model chunk)")
    n = 1 if n is None else n
    if not 1 <= n <= per_chunk:
        raise ValueError(f"recompute_num_layers={n} must be in [1, {per_chunk}] (the layers of one model chunk)")
    if method == "uniform" and any(c % n for c in chunks):
        raise ValueError(
            f"recompute_method='uniform' reruns groups of recompute_num_layers={n} layers, which must divide the "
            f"{per_chunk} layers of a model chunk; choose a divisor of {per_chunk} or recompute_method='block'"
        )
    return method, n


def validate_parallel(cfg: T2IConfig, par: MegatronParallelConfig) -> None:
    """Raise a one-line ValueError (problem; fix) for a parallel layout the model cannot run with."""
    m = cfg.llm
    if par.transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"unknown transformer_impl {par.transformer_impl!r}; choose one of {TRANSFORMER_IMPLS}")
    if m.attention_bias:
        raise ValueError("the megatron backbone maps Qwen3 without attention biases; set attention_bias=False")
    if par.tp < 1 or par.pp < 1:
        raise ValueError(f"tp and pp must be >= 1, got tp={par.tp} pp={par.pp}")
    _divides("attention heads", m.num_attention_heads, par.tp, "tp", "choose tp dividing the number of heads")
    _divides(
        "query groups (KV heads)", m.num_key_value_heads, par.tp, "tp", "choose tp dividing the number of KV heads"
    )
    _divides(
        "vocabulary entries",
        m.vocab_size,
        par.tp,
        "tp",
        "pad the vocabulary to a multiple of tp (TextToImageBitDance.resize_vocab)",
    )
    _divides("MLP channels", m.intermediate_size, par.tp, "tp", "choose tp dividing intermediate_size")
    if par.pp_layers is None:
        _divides("layers", m.num_hidden_layers, par.pp, "pp", "choose pp dividing the number of layers")
    else:
        _check_pp_layers(m.num_hidden_layers, par)
    if par.virtual_pp is not None:
        if par.pp < 2:
            raise ValueError(f"virtual_pp={par.virtual_pp} interleaves pipeline stages; set pp >= 2 or virtual_pp=None")
        if par.virtual_pp < 2:
            raise ValueError(
                f"virtual_pp={par.virtual_pp} is not interleaving (one model chunk per stage); set virtual_pp >= 2 "
                "or virtual_pp=None (plain 1F1B)"
            )
        _divides(
            "layers",
            m.num_hidden_layers,
            par.pp * par.virtual_pp,
            "pp * virtual_pp",
            "choose pp * virtual_pp dividing the number of layers",
        )
    if par.sequence_parallel and par.tp == 1:
        raise ValueError("sequence_parallel needs tensor parallelism; set tp > 1 or sequence_parallel=False")
    recompute_plan(cfg, par)
    _check_fp8(cfg, par)
    if par.transformer_impl == "te" and not transformer_engine_available():
        raise ValueError(
            "transformer_impl='te' needs Transformer Engine, which is not importable here; "
            "install transformer-engine (the 'gpu' extra) or set transformer_impl='local'"
        )


def transformer_config(cfg: T2IConfig, par: MegatronParallelConfig):
    """The megatron `TransformerConfig` of the Qwen3 backbone under `par` (validated first)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    validate_parallel(cfg, par)
    m = cfg.llm
    uneven = {}
    if par.pp_layers is not None and len(set(par.pp_layers)) > 1:
        uneven = dict(
            num_layers_in_first_pipeline_stage=par.pp_layers[0], num_layers_in_last_pipeline_stage=par.pp_layers[-1]
        )
    fp8 = {}
    if par.fp8 is not None:
        keep = par.bf16_layers_at_start + par.bf16_layers_at_end > 0
        fp8 = dict(
            fp8=par.fp8,
            fp8_recipe=par.fp8_recipe,
            first_last_layers_bf16=keep,
            num_layers_at_start_in_bf16=par.bf16_layers_at_start,
            num_layers_at_end_in_bf16=par.bf16_layers_at_end,
        )
    # Interleaved with pp=2: a rank's previous and next stage are the same rank, and batched p2p (one
    # batch_isend_irecv, matched in posting order per peer) would hand the activation to the gradient's buffer and
    # back; megatron's unbatched p2p sends the two directions over two process groups instead.
    two_way_single_peer = par.pp == 2 and par.virtual_pp is not None
    recompute = {}
    plan = recompute_plan(cfg, par)
    if plan is not None:
        recompute = dict(recompute_granularity="full", recompute_method=plan[0], recompute_num_layers=plan[1])
    elif par.recompute == "selective":  # our core attention is plain torch, so rerunning it saves its activations
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return TransformerConfig(
        num_layers=m.num_hidden_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.intermediate_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_key_value_heads,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        qk_layernorm=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        rotary_interleaved=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        sequence_parallel=par.sequence_parallel,
        params_dtype=par.params_dtype,
        pipeline_dtype=par.params_dtype,
        bf16=par.params_dtype == torch.bfloat16,
        fp16=par.params_dtype == torch.float16,
        use_cpu_initialization=par.use_cpu_initialization,
        perform_initialization=par.perform_initialization,
        virtual_pipeline_model_parallel_size=par.virtual_pp,
        **uneven,
        variable_seq_lengths=False,  # every micro-batch is padded to one fixed length (models.t2i.megatron.batch)
        batch_p2p_comm=not two_way_single_peer,
        **recompute,
        **fp8,
    )
