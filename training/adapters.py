"""`python -m training.checkpoint merge`: an official T2I folder with a LoRA adapter (PEFT's format, see
models/t2i/lora.py) merged into its weights, written as an official folder again.

The base is loaded whole (`load_t2i_folder`: its size in memory, plus the adapter), the adapter is checked and
applied with PEFT (`models.t2i.lora.apply_adapter`, which also checks a fingerprint the adapter folder records) and
merged (`merge_and_unload`) in the wider of each weight's stored dtype and `dtype`: a bf16 base merged for fp32 output
is widened first, an fp32 base merged for bf16 output is rounded once, after the merge. The folder is written with the
save functions of `models.t2i.io`: the backbone in the base's sharding (the same shard files holding the same
tensors, a new index; or one `model.safetensors`), `config.json` naming the new dtype, the image tokenizer, vision
head, projector and text tokenizer files. `dst` must be new or empty unless `overwrite` (files of the same names are
then replaced). With `check_finite` (the default) NaN/Inf in the adapter or in a merged weight is refused before
anything is written.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.core.safetensors_file import check_finite as refuse_non_finite
from models.t2i.io import (
    INDEX_NAME,
    llm_weight_files,
    load_t2i_folder,
    save_llm_shard,
    write_llm_config,
    write_llm_index,
    write_t2i_parts,
)
from models.t2i.lora import adapted_modules, apply_adapter, check_base, merge_adapter, read_adapter_config
from training.output_folder import check_output_folder

MERGE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _widen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter narrower than `dtype` in `dtype` (wider ones keep theirs until written)."""
    for p in model.parameters():
        if p.is_floating_point() and torch.promote_types(p.dtype, dtype) != p.dtype:
            p.data = p.data.to(dtype)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A module's state dict for writing: floating tensors in `dtype`, contiguous."""
    state = module.state_dict()
    return {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous() for k, v in state.items()}


def merge_folder(
    base: Path,
    adapter: Path,
    dst: Path,
    dtype: str = "bf16",
    overwrite: bool = False,
    check_finite: bool = True,
) -> Path:
    """Write the official folder `dst`: `base` with the adapter of `adapter` merged, in `dtype` (bf16 | fp32). The
    flags, `dst`, the adapter folder and a recorded base fingerprint are checked before the base is loaded."""
    base, adapter, dst = Path(base), Path(adapter), Path(dst)
    if dtype not in MERGE_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(MERGE_DTYPES)}")
    if not base.is_dir():
        raise FileNotFoundError(f"--base {base} is not a folder; give an official-layout T2I folder")
    if dst.resolve() == base.resolve():
        raise ValueError(f"--dst {dst} is the --base folder; give another folder")
    check_output_folder(dst, "training.checkpoint merge", overwrite, "--dst")
    read_adapter_config(adapter)
    check_base(adapter, base)
    target = MERGE_DTYPES[dtype]
    model, text_tok, image_tok = load_t2i_folder(base)
    _widen(model, target)
    wrapped = apply_adapter(model, adapter, check_finite=check_finite)
    changed = adapted_modules(wrapped)
    model = merge_adapter(wrapped)
    parts = {name: _cast(getattr(model, name), target) for name in ("llm", "vision_head", "projector")}
    if check_finite:
        merged = {f"{part}.{k}": v for part, state in parts.items() for k, v in state.items()}
        refuse_non_finite({k: v for k, v in merged.items() if k.rpartition(".")[0] in changed}, "the merged weights")
    dst.mkdir(parents=True, exist_ok=True)
    llm = parts["llm"]
    write_llm_config(dst, model.cfg.llm, target)
    if (base / INDEX_NAME).is_file():
        shards: dict[str, list[str]] = {}
        for key, path in llm_weight_files(base).items():
            shards.setdefault(path.name, []).append(key)
        weight_map = {}
        for name in sorted(shards):
            weight_map.update(save_llm_shard(dst, name, {k: llm[k] for k in sorted(shards[name])}))
        write_llm_index(dst, weight_map, sum(t.numel() * t.element_size() for t in llm.values()))
    else:
        save_llm_shard(dst, "model.safetensors", llm)
    write_t2i_parts(dst, model.cfg, text_tok, image_tok, parts["vision_head"], parts["projector"])
    return dst
