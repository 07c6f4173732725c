"""LoRA adapters on the text-to-image model, in PEFT's own format: checked against a loaded base, applied unmerged
(PEFT's layers injected into the model in place: `eval.generate --lora`) or merged into its weights
(`merge_and_unload`: `python -m training.checkpoint merge`, training/adapters.py).

An adapter folder is what `peft.PeftModel.save_pretrained` writes: `adapter_config.json` (a PEFT config: target
modules, rank, alpha) and `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`, ...). It may also
hold `base.json` with {"fingerprint": base_fingerprint(<the official folder it was trained from>)}; the adapter is
then refused on any other base. Every check is a one-line `AdapterError` naming the problem and the fix: a missing
folder or file, a config PEFT does not read, target modules the base does not have, a tensor of the file with no
place in the base or with another shape (rank, width), a tensor the config asks for that the file lacks, NaN/Inf
(with `check_finite`, the default), another base than the recorded one. The weights are read through the checked
reader (`models.core.safetensors_file`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from models.core import safetensors_file
from models.t2i.io import llm_weight_files

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_JSON = "base.json"  # optional: {"fingerprint": base_fingerprint(base folder)}
HEAD_PARTS = ("vision_head.safetensors", "projector.safetensors")
CONFIG_FILES = ("config.json", "vision_head_config.json")  # in the fingerprint
SAMPLE_BYTES = 256  # per tensor and place (start, middle, end) in the fingerprint
PEFT_PREFIX = "base_model.model."  # of every key in a saved PEFT state dict
_SHOW = 3


class AdapterError(ValueError):
    """An adapter folder that cannot be applied to this base (one line: the problem and the fix)."""


def _peft():
    try:
        import peft
    except ImportError as err:
        raise AdapterError(f"LoRA adapters need peft ({err}); pip install -e '.[train]'") from None
    return peft


def _first(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _listed(names: list[str]) -> str:
    return ", ".join(names[:_SHOW]) + (", ..." if len(names) > _SHOW else "")


def read_adapter_config(folder: str | Path):
    """The PEFT config of an adapter folder (its `adapter_config.json`), after checking that both files are there."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(
            f"adapter {folder} is not a folder; give the folder PEFT's save_pretrained wrote ({ADAPTER_CONFIG}, "
            f"{ADAPTER_WEIGHTS})"
        )
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise AdapterError(f"adapter folder {folder} lacks {name}; give a folder PEFT's save_pretrained wrote")
    peft = _peft()
    try:
        return peft.PeftConfig.from_pretrained(str(folder))
    except Exception as err:  # malformed json, unknown peft_type, fields of another PEFT version
        raise AdapterError(
            f"{folder / ADAPTER_CONFIG} is not a PEFT adapter config ({_first(err)}); re-save it"
        ) from None


def base_fingerprint(folder: str | Path) -> str:
    """sha256 hex of an official folder's model: its configs (`config.json`, `vision_head_config.json`, as parsed
    json) and its weights (backbone, vision head, projector) independent of how they are sharded: every tensor's
    name, dtype and shape and three `SAMPLE_BYTES` samples of its data (start, middle, end), in name order. Reads the
    headers and a few hundred bytes a tensor: quick on a 14B folder, and two trainings of one architecture differ in
    it. A fine-tuning run records it (trainer.json, and the adapter folder's `base.json`)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for name in CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"T2I model folder is missing {name} (looked for {path})")
        digest.update(json.dumps(json.loads(path.read_text()), sort_keys=True).encode())
    files = dict(llm_weight_files(folder))
    for part in HEAD_PARTS:
        path = folder / part
        if not path.is_file():
            raise FileNotFoundError(f"T2I model folder is missing {part} (looked for {path})")
        files.update({f"{part}:{name}": path for name in safetensors_file.tensor_names(path)})
    headers = {path: safetensors_file.read_header(path) for path in set(files.values())}
    handles = {path: open(path, "rb") for path in headers}  # noqa: SIM115 (closed below)
    try:
        for key in sorted(files):
            path = files[key]
            entry = headers[path][key.split(":", 1)[-1]]
            digest.update(json.dumps([key, str(entry.dtype), list(entry.shape)]).encode())
            size = entry.end - entry.begin
            for start in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
                handles[path].seek(entry.begin + start)
                digest.update(handles[path].read(min(SAMPLE_BYTES, size - start)))
    finally:
        for f in handles.values():
            f.close()
    return digest.hexdigest()


def check_base(folder: str | Path, base: str | Path) -> None:
    """Refuse `base` when the adapter folder records the fingerprint of another base (`base.json`; none: no check)."""
    record = Path(folder) / BASE_JSON
    if not record.is_file():
        return
    try:
        wanted = json.loads(record.read_text()).get("fingerprint")
    except (ValueError, AttributeError):
        raise AdapterError(f"{record} is not a json object with a fingerprint; fix it or remove it") from None
    if wanted is None:
        return
    try:
        found = base_fingerprint(base)
    except OSError as err:
        raise AdapterError(f"cannot check the base {base} against {record}: {err}") from None
    if found != wanted:
        raise AdapterError(
            f"adapter {folder} was trained from a base with fingerprint {str(wanted)[:12]}, but {base} has "
            f"{found[:12]}; pass the base folder it was trained from"
        )


def apply_adapter(model: nn.Module, folder: str | Path, base: str | Path | None = None, check_finite: bool = True):
    """Inject the adapter of `folder` into `model` unmerged, in place (the model's own modules gain PEFT's LoRA
    layers, so code holding `model` samples with the adapter), and return the `peft.PeftModel` around it (for
    `merge_adapter`). `base`, the folder `model` was loaded from, is checked against a recorded fingerprint. On a
    refusal the model is left as it was."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    if base is not None:
        check_base(folder, base)
    try:
        state = safetensors_file.load_file(folder / ADAPTER_WEIGHTS, check_finite=check_finite)
    except safetensors_file.SafetensorsError as err:
        raise AdapterError(f"{err}; re-save the adapter") from None
    peft = _peft()
    config.inference_mode = True
    try:
        wrapped = peft.PeftModel(model, config)
    except ValueError as err:  # target modules that match nothing in the base, or modules PEFT cannot adapt
        raise AdapterError(
            f"adapter {folder} does not fit this base ({_first(err)}); pass the base it was trained for"
        ) from None
    try:
        _check_weights(folder, state, peft.get_peft_model_state_dict(wrapped))
    except AdapterError:
        wrapped.unload()  # the model without the injected layers again
        raise
    peft.set_peft_model_state_dict(wrapped, state)
    return wrapped.eval()


def _module(key: str) -> str:
    """The base module a PEFT state-dict key belongs to: `base_model.model.<module>.lora_A.weight` -> <module>."""
    return key.removeprefix(PEFT_PREFIX).split(".lora_", 1)[0]


def _modules(keys) -> list[str]:
    return sorted({_module(k) for k in keys})


def _check_weights(folder: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The file's tensors against the ones PEFT made for the base from the adapter's config: same names, shapes."""
    extra = _modules(set(state) - set(expected))
    if extra:
        raise AdapterError(
            f"adapter {folder} holds weights for {len(extra)} modules this base lacks or its config does not target "
            f"({_listed(extra)}); pass the base it was trained for"
        )
    missing = _modules(set(expected) - set(state))
    if missing:
        raise AdapterError(
            f"adapter {folder} lacks the weights of {len(missing)} modules its config's target_modules give this base "
            f"({_listed(missing)}); pass the base it was trained for (the same layers), or fix its {ADAPTER_CONFIG}"
        )
    wrong = [k for k in sorted(state) if state[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise AdapterError(
            f"adapter {folder} has {len(wrong)} tensors of other shapes than its rank and this base give, e.g. "
            f"{k.removeprefix(PEFT_PREFIX)} {tuple(state[k].shape)} where the base needs {tuple(expected[k].shape)}; "
            f"pass the base it was trained for, or fix the rank in its {ADAPTER_CONFIG}"
        )


def adapted_modules(wrapped) -> set[str]:
    """Names (in the base model) of the modules an applied adapter changes: the ones PEFT gave adapter layers."""
    layer = _peft().tuners.tuners_utils.BaseTunerLayer
    return {name for name, m in wrapped.get_base_model().named_modules() if isinstance(m, layer)}


def merge_adapter(wrapped) -> nn.Module:
    """The base model with the applied adapter merged into its weights (`merge_and_unload`): plain modules again,
    the model `apply_adapter` was given."""
    return wrapped.merge_and_unload()
