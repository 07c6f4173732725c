"""Weights between the reference `TextToImageBitDance` (official folder layout) and `MegatronT2IBitDance`.

Every conversion copies or re-views tensors, never computes: reference -> megatron -> reference is bit-exact.
Full megatron state dicts (TP=1, all layers) are the hub; `split_tp`/`merge_tp` and `split_pp`/`merge_pp` turn
them into the state of one (TP rank, PP stage) and back. Layer facts (reference name -> megatron name):

- `q_proj`/`k_proj`/`v_proj` -> `linear_qkv`, interleaved per query group: [q x heads_per_group, k, v] per group,
  so a TP shard (column-parallel, dim 0) is a whole number of groups;
- `gate_proj`/`up_proj` -> `linear_fc1` = [gate; up]; a TP shard is [gate_r; up_r] (each half split separately);
- `o_proj` -> `linear_proj`, `down_proj` -> `linear_fc2` (row-parallel: dim 1);
- `q_norm`/`k_norm` -> `q_layernorm`/`k_layernorm`; the input / post-attention norms are `input_layernorm` /
  `pre_mlp_layernorm` in the local spec and fused into `linear_qkv.layer_norm_weight` /
  `linear_fc1.layer_norm_weight` in the TE spec (`layout="te"`);
- `embed_tokens` -> `word_embeddings`, `lm_head` -> `output_layer` (vocab-parallel: dim 0), `norm` ->
  `decoder.final_layernorm`; `projector.*` and `vision_head.*` keep their names and are replicated.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.core.state_dict import StateDictMismatchError, load_state_dict_strict
from models.t2i.io import export_t2i_folder, load_t2i_folder
from models.t2i.model import T2IConfig, TextToImageBitDance
from models.t2i.qwen3 import Qwen3Config

State = dict[str, torch.Tensor]
LAYOUTS = ("local", "te")
_REF_LAYER = "llm.model.layers."
_MEG_LAYER = "decoder.layers."
_TOP = {
    "llm.model.embed_tokens.weight": "word_embeddings.weight",
    "llm.model.norm.weight": "decoder.final_layernorm.weight",
    "llm.lm_head.weight": "output_layer.weight",
}
_SAME_PREFIXES = ("projector.", "vision_head.")


def _layer_names(layout: str) -> dict[str, str]:
    """One-to-one reference -> megatron names inside a layer."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown megatron layout {layout!r}; choose one of {LAYOUTS}")
    te = layout == "te"
    return {
        "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight",
        "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight",
        "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
        "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
        "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
        "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    }


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    hidden = q.shape[-1]
    q = q.view(groups, -1, head_dim, hidden)
    k, v = (t.view(groups, 1, head_dim, hidden) for t in (k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def unfuse_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    hidden = qkv.shape[-1]
    per = heads // groups
    w = qkv.view(groups, per + 2, head_dim, hidden)
    return tuple(p.reshape(-1, hidden).contiguous() for p in (w[:, :per], w[:, per], w[:, per + 1]))


def layer_to_megatron(layer: State, cfg: Qwen3Config, layout: str = "local") -> State:
    """One decoder layer: reference names inside the layer (`self_attn.q_proj.weight`) -> megatron names
    (`self_attention.linear_qkv.weight`), q/k/v fused per query group and [gate; up] concatenated."""
    out = {b: layer[a] for a, b in _layer_names(layout).items()}
    q, k, v = (layer[f"self_attn.{n}_proj.weight"] for n in "qkv")
    out["self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, cfg.num_key_value_heads, cfg.head_dim)
    out["mlp.linear_fc1.weight"] = torch.cat([layer["mlp.gate_proj.weight"], layer["mlp.up_proj.weight"]])
    return out


def layer_to_reference(layer: State, cfg: Qwen3Config, layout: str = "local") -> State:
    """Inverse of `layer_to_megatron` (q/k/v and gate/up come out as contiguous copies)."""
    out = {a: layer[b] for a, b in _layer_names(layout).items()}
    qkv = layer["self_attention.linear_qkv.weight"]
    q, k, v = unfuse_qkv(qkv, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    out.update({"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v})
    gate, up = layer["mlp.linear_fc1.weight"].chunk(2)
    out["mlp.gate_proj.weight"], out["mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
    return out


def top_to_megatron(state: State) -> State:
    """The tensors outside the decoder layers (embeddings, final norm, LM head, projector, vision head): reference
    names -> megatron names (keys of `state` it does not know are ignored)."""
    out = {b: state[a] for a, b in _TOP.items() if a in state}
    out.update({k: v for k, v in state.items() if k.startswith(_SAME_PREFIXES)})
    return out


def top_to_reference(state: State) -> State:
    """Inverse of `top_to_megatron`."""
    out = {a: state[b] for a, b in _TOP.items() if b in state}
    out.update({k: v for k, v in state.items() if k.startswith(_SAME_PREFIXES)})
    return out


def _in_layer(state: State, prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _prefixed(state: State, prefix: str) -> State:
    return {prefix + k: v for k, v in state.items()}


def reference_to_megatron(state: State, cfg: Qwen3Config, layout: str = "local") -> State:
    """Full megatron state (TP=1, all layers) from a `TextToImageBitDance` state dict."""
    out = {}
    for i in range(cfg.num_hidden_layers):
        layer = _in_layer(state, f"{_REF_LAYER}{i}.")
        out.update(_prefixed(layer_to_megatron(layer, cfg, layout), f"{_MEG_LAYER}{i}."))
    out.update(top_to_megatron(state))
    _check_consumed(state, out, cfg, to_megatron=True)
    return out


def megatron_to_reference(state: State, cfg: Qwen3Config, layout: str = "local") -> State:
    """`TextToImageBitDance` state dict from a full megatron state (TP=1, all layers)."""
    out = {}
    for i in range(cfg.num_hidden_layers):
        layer = _in_layer(state, f"{_MEG_LAYER}{i}.")
        out.update(_prefixed(layer_to_reference(layer, cfg, layout), f"{_REF_LAYER}{i}."))
    out.update(top_to_reference(state))
    _check_consumed(state, out, cfg, to_megatron=False)
    return out


def _check_consumed(src: State, out: State, cfg: Qwen3Config, to_megatron: bool) -> None:
    """Every source tensor must have been used: a leftover means layer counts or layouts disagree."""
    per_layer = 11 if to_megatron else 8
    expected = per_layer * cfg.num_hidden_layers + len(_TOP) + sum(k.startswith(_SAME_PREFIXES) for k in src)
    if len(src) != expected:
        direction = "reference -> megatron" if to_megatron else "megatron -> reference"
        raise StateDictMismatchError(
            f"{direction}: state has {len(src)} tensors, a {cfg.num_hidden_layers}-layer "
            f"model has {expected}; check num_hidden_layers and the layout"
        )


# ---- tensor parallelism -------------------------------------------------------------------------------------------

_DIM0 = ("word_embeddings.weight", "output_layer.weight", "self_attention.linear_qkv.weight")
_DIM1 = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_GATED = "mlp.linear_fc1.weight"


def tp_split(key: str) -> tuple[int | None, int]:
    """How a megatron tensor splits over TP ranks: (axis, pieces per rank). fc1 is (0, 2): rank r holds pieces r and
    tp + r of 2 * tp ([gate_r; up_r]); column-parallel / vocab weights (0, 1), row-parallel (1, 1), replicated
    (None, 1)."""
    if key.endswith(_GATED):
        return 0, 2
    if key.endswith(_DIM0) or key.endswith(_DIM1):
        return (0 if key.endswith(_DIM0) else 1), 1
    return None, 1


def split_tp(state: State, tp: int) -> list[State]:
    """Per-rank states of a (TP=1) megatron state: column-parallel and vocab weights split on dim 0 (QKV whole
    query groups), row-parallel on dim 1, fc1 as [gate_r; up_r]; everything else replicated."""
    shards: list[State] = [{} for _ in range(tp)]
    for key, t in state.items():
        if key.endswith(_GATED):
            gate, up = t.chunk(2)
            parts = [torch.cat(p) for p in zip(gate.chunk(tp), up.chunk(tp), strict=True)]
        elif key.endswith(_DIM0) or key.endswith(_DIM1):
            dim = 0 if key.endswith(_DIM0) else 1
            if t.shape[dim] % tp:
                raise ValueError(f"{key} has {t.shape[dim]} rows/cols on dim {dim}, not divisible by tp={tp}")
            parts = [p.contiguous() for p in t.chunk(tp, dim=dim)]
        else:
            parts = [t] * tp
        for shard, p in zip(shards, parts, strict=True):
            shard[key] = p
    return shards


def merge_tp(shards: list[State]) -> State:
    """Inverse of `split_tp`; replicated tensors must agree on every rank (a divergence is an error)."""
    out: State = {}
    for key in shards[0]:
        parts = [s[key] for s in shards]
        if key.endswith(_GATED):
            halves = [p.chunk(2) for p in parts]
            out[key] = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
        elif key.endswith(_DIM0) or key.endswith(_DIM1):
            out[key] = torch.cat(parts, dim=0 if key.endswith(_DIM0) else 1)
        else:
            if not all(torch.equal(parts[0], p) for p in parts[1:]):
                raise ValueError(f"replicated tensor {key} differs between TP ranks")
            out[key] = parts[0]
    return out


# ---- pipeline parallelism -----------------------------------------------------------------------------------------

_FIRST_STAGE = ("word_embeddings.", "projector.")
_LAST_STAGE = ("decoder.final_layernorm.", "output_layer.", "vision_head.")


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Global layer indices held by pipeline stage `stage` (even split, as megatron does by default)."""
    if num_layers % pp:
        raise ValueError(f"pp={pp} does not divide the {num_layers} layers; choose pp dividing the number of layers")
    n = num_layers // pp
    return range(stage * n, (stage + 1) * n)


def _layer_index(key: str) -> int:
    return int(key[len(_MEG_LAYER) :].split(".", 1)[0])


def _relabel(key: str, index: int) -> str:
    return f"{_MEG_LAYER}{index}.{key[len(_MEG_LAYER) :].split('.', 1)[1]}"


def split_pp(state: State, num_layers: int, pp: int) -> list[State]:
    """Per-stage states of an even split: stage k holds its layers renumbered from 0, the first also the text/image
    embeddings, the last also the final norm and both heads."""
    return [
        chunk_state(state, stage_layers(num_layers, pp, k).start, num_layers // pp, k == 0, k == pp - 1)
        for k in range(pp)
    ]


def chunk_state(state: State, start: int, count: int, first: bool, last: bool) -> State:
    """The part of a full megatron state one model chunk holds: layers start..start+count-1 renumbered from 0, plus the
    embeddings on the first chunk and the final norm and both heads on the last (any split, even or not)."""
    part: State = {}
    for key, t in state.items():
        if key.startswith(_MEG_LAYER):
            if start <= _layer_index(key) < start + count:
                part[_relabel(key, _layer_index(key) - start)] = t
        elif (key.startswith(_FIRST_STAGE) and first) or (key.startswith(_LAST_STAGE) and last):
            part[key] = t
        elif not key.startswith(_FIRST_STAGE + _LAST_STAGE):
            raise ValueError(f"chunk_state does not know which stage holds {key}")
    return part


def merge_pp(stages: list[State], num_layers: int) -> State:
    """Inverse of `split_pp`."""
    out: State = {}
    for stage, part in enumerate(stages):
        start = stage_layers(num_layers, len(stages), stage).start
        for key, t in part.items():
            out[_relabel(key, _layer_index(key) + start) if key.startswith(_MEG_LAYER) else key] = t
    return out


# ---- live modules and the official folder -------------------------------------------------------------------------


def model_state(module: torch.nn.Module) -> State:
    """A megatron module's tensors (without the `_extra_state` entries megatron/TE layers add)."""
    return {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}


def load_model_state(module: torch.nn.Module, state: State) -> None:
    """Load tensors strictly (same keys and shapes as `model_state(module)`), keeping the module's extra states."""
    own = module.state_dict()
    tensors = {k: v for k, v in own.items() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(tensors.keys() - state.keys()), sorted(state.keys() - tensors.keys())
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(tensors[k].shape)}"
        for k in tensors.keys() & state.keys()
        if state[k].shape != tensors[k].shape
    )
    if missing or unexpected or shapes:
        raise StateDictMismatchError(
            f"state does not match {type(module).__name__}: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, shape mismatches {shapes[:8]}"
        )
    extra = {k: v for k, v in own.items() if k.endswith("_extra_state")}
    module.load_state_dict({**state, **extra}, strict=True)


def megatron_state_from_folder(folder: str | Path, layout: str = "local", **load_kw):
    """(full megatron state, T2IConfig, text tokenizer, image tokenizer) from an official T2I folder."""
    model, text_tok, image_tok = load_t2i_folder(folder, **load_kw)
    return reference_to_megatron(model.state_dict(), model.cfg.llm, layout), model.cfg, text_tok, image_tok


def reference_model_from_megatron(state: State, cfg: T2IConfig, layout: str = "local") -> TextToImageBitDance:
    """A `TextToImageBitDance` holding the tensors of a full megatron state (no copies)."""
    with torch.device("meta"):
        model = TextToImageBitDance(cfg)
    load_state_dict_strict(model, megatron_to_reference(state, cfg.llm, layout), "megatron T2I state", assign=True)
    return model


def export_megatron_to_folder(
    state: State, cfg: T2IConfig, text_tok, image_tok, out_dir: str | Path, layout: str = "local", **export_kw
) -> Path:
    """Write a full megatron state in the official T2I folder layout (loadable by `load_t2i_folder`)."""
    return export_t2i_folder(
        reference_model_from_megatron(state, cfg, layout), text_tok, image_tok, out_dir, **export_kw
    )
