"""Fine-tuning a released or exported model (`finetune.method`): which parameters train, the base they adapt, and how
their weights are saved. One class per method in `FINETUNE_METHODS`:

- `full` (`FullTraining`): every parameter trains; checkpoints and the export are the whole model (the default).
- `lora` (`LoRA`): PEFT LoRA adapters (`peft.inject_adapter_in_model`; rank `finetune.lora.rank`, alpha
  `finetune.lora.alpha`, dropout `finetune.lora.dropout`) on the linears of the decoder layers whose names end in one of
  `finetune.lora.target_modules`, and with `finetune.lora.head` on every linear of the diffusion head; everything else
  is frozen. Its weights are written in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, keys
  `base_model.model.<module path>.lora_A.weight`), so `peft.PeftModel.from_pretrained(base, folder)` loads them.
- `head` (`HeadOnly`): the backbone is frozen; the diffusion head, the projector (the image-token embedding) and the
  text-embedding rows of the query tokens (`RowTunedEmbedding`) train.

The parts a method adapts are named by the task (`Task.finetune_targets`, a `Targets`). The frozen base is cast to
`finetune.base_dtype` (trainable parameters stay fp32; an engine training in bf16 casts everything itself). A run of
`lora` or `head` saves the trainable state only and a reference to its base, `model.init_from` and its fingerprint
(`base_fingerprint`), which a resume must match. Engines that cannot train a method refuse it in their config checks.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from models.core.registry import Registry
from models.core.safetensors_file import load_file
from models.t2i.lora import BASE_JSON

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.tasks import Task

WRAPPER = "_checkpoint_wrapped_module."  # activation checkpointing's wrapper, in parameter names only
BASE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # beside PEFT's adapter_config.json
PEFT_PREFIX = "base_model.model."  # what PEFT puts before a module path in its saved keys


@dataclass(frozen=True)
class Targets:
    """What a task's model offers to fine-tuning, as module paths: the decoder layers (`<layers>.<i>`), the diffusion
    head's network, the parts `head` trains whole, and the text embedding with the rows `head` trains."""

    layers: str
    head: str
    parts: tuple[str, ...]
    embedding: str
    rows: tuple[int, ...] = ()


def plain_name(name: str) -> str:
    """A parameter name without activation checkpointing's wrapper (as in state dicts and PEFT files)."""
    return name.replace(WRAPPER, "")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{plain name: parameter} of the parameters that train."""
    return {plain_name(n): p for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (ZeRO-3 partitioned parameters counted whole)."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, t in sizes if t), sum(n for n, _ in sizes)


def base_fingerprint(path: str | Path) -> str:
    """The fingerprint of the base folder (`models.t2i.lora.base_fingerprint`: its configs and weights)."""
    from models.t2i.lora import base_fingerprint as folder_fingerprint

    return folder_fingerprint(path)


@contextmanager
def seeded(seed: int):
    """The default generator seeded with `seed` inside, restored after (new weights the same on every rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Method:
    """Defaults of a method that trains a subset of the model and saves only that subset."""

    name: str
    full_model = False  # checkpoints hold the whole model (else the trainable state and a reference to the base)
    # how to get a whole model out of one of its checkpoints (said when a checkpoint export is asked for)
    export_how = "the run exports the whole model with the EMA weights at its end (<run_dir>/export)"

    @classmethod
    def check(cls, cfg: TrainConfig) -> list[tuple[bool, str]]:
        """The method's own config checks (ok, one-line message naming the fix); the engine that trains it runs them."""
        from models.family import FAMILIES

        with_targets = "|".join(k for k, f in FAMILIES.items() if f.task_class().finetune_targets is not None)
        targets = FAMILIES.get(cfg.model.kind).task_class().finetune_targets
        return [
            (
                cfg.finetune.base_dtype in BASE_DTYPES,
                f"finetune.base_dtype must be {' or '.join(BASE_DTYPES)}, got {cfg.finetune.base_dtype}",
            ),
            (
                targets is not None,
                f"finetune.method={cls.name} adapts model.kind {with_targets}; use finetune.method=full for "
                f"model.kind={cfg.model.kind}",
            ),
            (
                bool(cfg.model.init_from),
                f"finetune.method={cls.name} adapts a trained model: set model.init_from=<official folder or an "
                "exported checkpoint>",
            ),
        ]

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def apply(self, task: Task) -> None:
        """Make `task.model` train this method's parameters only, the frozen base cast to `finetune.base_dtype`."""
        model = task.model
        self.adapt(model, task.finetune_targets)
        dtype = BASE_DTYPES[self.cfg.finetune.base_dtype]
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)

    def adapt(self, model: nn.Module, targets: Targets) -> None:
        raise NotImplementedError

    def describe(self, model: nn.Module) -> str:
        trainable, total = count_parameters(model)
        return (
            f"finetune.method={self.name}: {trainable:,} trainable parameters of {total:,} "
            f"({100 * trainable / max(total, 1):.3f}%)"
        )

    def settings(self) -> dict:
        """What the trainable state's shape depends on; a resume must have the same."""
        return {"method": self.name}

    def base_reference(self) -> dict:
        """For trainer.json: the method, its settings and the base it adapts (`model.init_from` and its fingerprint)."""
        src = self.cfg.model.init_from
        return {**self.settings(), "init_from": str(src), "fingerprint": base_fingerprint(src)}

    def check_resume(self, directory: Path, trainer: dict) -> None:
        """Refuse (one line) a checkpoint of another method, other settings or another base."""
        saved = trainer.get("finetune") or {"method": FullTraining.name}
        if saved.get("method") != self.name:
            raise ValueError(
                f"{directory} was written by finetune.method={saved.get('method')}, this run has finetune.method="
                f"{self.name}; resume with the same method or start a new run_dir"
            )
        if self.full_model:
            return
        mine = self.settings()
        changed = sorted(k for k in mine if saved.get(k) != mine[k])
        if changed:
            k = changed[0]
            raise ValueError(
                f"{directory} was trained with finetune {k}={saved.get(k)}, this run has {mine[k]}; resume with the "
                "same settings or start a new run_dir"
            )
        now = base_fingerprint(self.cfg.model.init_from)
        if saved["fingerprint"] != now:
            raise ValueError(
                f"{directory} adapts the base {saved['init_from']} (fingerprint {saved['fingerprint'][:12]}), but "
                f"model.init_from={self.cfg.model.init_from} has fingerprint {now[:12]}; resume with the base it was "
                "trained from, or start a new run_dir"
            )

    def save_weights(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        """Write the trainable weights {plain name: tensor} into checkpoint folder `directory`."""
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "trainable.safetensors"))

    def load_weights(self, directory: Path) -> dict[str, torch.Tensor]:
        """The trainable weights {plain name: tensor} `save_weights` wrote."""
        from training.engines.export import read_weights

        return read_weights(directory, "trainable.safetensors")

    def export(self, task: Task, model: nn.Module, out_dir: Path) -> Path | None:
        """Write `model` (the EMA weights swapped in) at the end of the run; the path written, or None."""
        return task.export(model, out_dir)

    def export_checkpoint(self, checkpoint: Path, out_dir: Path) -> Path | None:
        """Write the EMA weights of one of this run's checkpoints (when no rank holds the whole model, e.g. ZeRO-3),
        on CPU in this process; None where only a whole model makes an export."""
        return None


class FullTraining(Method):
    name = "full"
    full_model = True

    @classmethod
    def check(cls, cfg: TrainConfig) -> list[tuple[bool, str]]:
        return []

    def apply(self, task: Task) -> None:
        pass


class LoRA(Method):
    name = "lora"
    export_how = (
        "merge its adapter into the base: python -m training.checkpoint merge --base <model.init_from> --adapter "
        "<checkpoint>/adapter --dst <folder>"
    )

    @classmethod
    def check(cls, cfg: TrainConfig) -> list[tuple[bool, str]]:
        lo = cfg.finetune.lora
        return [
            *super().check(cfg),
            (lo.rank >= 1, f"finetune.lora.rank must be >= 1, got {lo.rank}"),
            (lo.alpha > 0, f"finetune.lora.alpha must be > 0, got {lo.alpha}"),
            (0.0 <= lo.dropout < 1.0, f"finetune.lora.dropout must be in [0, 1), got {lo.dropout}"),
            (
                bool(lo.target_modules) and all(re.fullmatch(r"\w+", t) for t in lo.target_modules),
                f"finetune.lora.target_modules must list module names such as q_proj, got {lo.target_modules}",
            ),
        ]

    def settings(self) -> dict:
        lo = self.cfg.finetune.lora
        targets = list(lo.target_modules)
        return {"method": self.name, "rank": lo.rank, "alpha": lo.alpha, "targets": targets, "head": lo.head}

    def target_pattern(self, model: nn.Module, targets: Targets) -> str:
        """The PEFT `target_modules` regex: the decoder layers' modules named in `finetune.lora.target_modules`, and
        with `finetune.lora.head` every linear of the head, by its full path. Every match must be a linear."""
        names = "|".join(self.cfg.finetune.lora.target_modules)
        parts = [rf"{re.escape(targets.layers)}\.\d+\.(?:\w+\.)*(?:{names})"]
        if self.cfg.finetune.lora.head:
            prefix = targets.head + "."
            linears = [n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear)]
            parts.append("|".join(map(re.escape, linears)))
        pattern = "|".join(parts)
        matched = {n: m for n, m in model.named_modules() if re.fullmatch(pattern, n)}
        if not matched:
            raise ValueError(
                f"finetune.lora.target_modules={list(self.cfg.finetune.lora.target_modules)} names no module of "
                f"{targets.layers}.<i>; name its linears (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                "down_proj)"
            )
        other = sorted(n for n, m in matched.items() if not isinstance(m, nn.Linear))
        if other:
            raise ValueError(
                f"finetune.lora.target_modules names {other[0]}, a {type(matched[other[0]]).__name__}, not a linear; "
                "name linears only"
            )
        return pattern

    def peft_config(self, pattern: str):
        from peft import LoraConfig

        lo = self.cfg.finetune.lora
        return LoraConfig(
            r=lo.rank,
            lora_alpha=lo.alpha,
            lora_dropout=lo.dropout,
            target_modules=pattern,
            base_model_name_or_path=self.cfg.model.init_from,
        )

    def adapt(self, model: nn.Module, targets: Targets) -> None:
        from peft import inject_adapter_in_model

        self.config = self.peft_config(self.target_pattern(model, targets))
        with seeded(self.cfg.seed):  # lora_A's initialisation, the same on every rank
            inject_adapter_in_model(self.config, model)
        for n, p in model.named_parameters():
            p.requires_grad_(".lora_" in n)

    def save_weights(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        write_adapter(directory / "adapter", state, self.config)

    def load_weights(self, directory: Path) -> dict[str, torch.Tensor]:
        return read_adapter(directory / "adapter")

    def export(self, task: Task, model: nn.Module, out_dir: Path) -> Path:
        """The EMA adapters in PEFT's format, to `<out_dir>/adapter` (the config PEFT keeps on the injected model)."""
        state = {k: p.detach().cpu() for k, p in trainable_parameters(model).items()}
        return write_adapter(Path(out_dir) / "adapter", state, model.peft_config["default"])

    def export_checkpoint(self, checkpoint: Path, out_dir: Path) -> Path:
        """The EMA adapters of `checkpoint` (from `ema.safetensors`, or under ZeRO-3 every rank's partition) in PEFT's
        format, to `<out_dir>/adapter`."""
        from peft import LoraConfig

        from training.engines.export import ema_weights, read_trainer_json

        adapter = Path(checkpoint) / "adapter"
        shapes = {k: v.shape for k, v in read_adapter(adapter).items()}
        state = ema_weights(Path(checkpoint), read_trainer_json(checkpoint), shapes)
        return write_adapter(Path(out_dir) / "adapter", state, LoraConfig.from_pretrained(str(adapter)))


def peft_key(name: str) -> str:
    """A LoRA parameter's name as PEFT saves it: `x.lora_A.default.weight` -> `base_model.model.x.lora_A.weight`."""
    return PEFT_PREFIX + re.sub(r"\.(lora_[AB])\.default\.", r".\1.", plain_name(name))


def write_adapter(folder: Path, state: dict[str, torch.Tensor], config) -> Path:
    """`folder` as PEFT writes an adapter: `adapter_config.json` (inference mode) and `adapter_model.safetensors`
    with PEFT's key names, from {parameter name: tensor} of the injected model."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {peft_key(k): v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    inference_mode, config.inference_mode = config.inference_mode, True
    try:
        # PEFT's own writer (its version and field names); no `auto_mapping`: that is for AutoPeftModel, which cannot
        # build this base (PeftModel.from_pretrained takes the loaded base)
        config.save_pretrained(str(folder))
    finally:
        config.inference_mode = inference_mode
    base = config.base_model_name_or_path
    if base and Path(base).is_dir():  # merge and eval.generate --lora refuse the adapter on another base
        (folder / BASE_JSON).write_text(json.dumps({"fingerprint": base_fingerprint(base)}) + "\n")
    return folder


def read_adapter(folder: Path) -> dict[str, torch.Tensor]:
    """{plain parameter name: tensor} of an adapter folder `write_adapter` wrote."""
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {ADAPTER_WEIGHTS}; pass a checkpoint of a finetune.method=lora run")
    out = {}
    for key, value in load_file(str(path)).items():
        name = re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", key.removeprefix(PEFT_PREFIX))
        out[name] = value
    return out


class RowTunedEmbedding(nn.Embedding):
    """An embedding whose `rows` of token ids `ids` train while its `weight` stays frozen: a looked-up id of `ids` gives
    its row of `rows` (in the weight's dtype). Its state dict is a plain embedding's (`weight` with the trained rows
    folded in), and loading one sets `rows` from it, so exports and official folders keep their layout."""

    def __init__(self, embedding: nn.Embedding, ids: tuple[int, ...]):
        weight = embedding.weight.data
        super().__init__(*weight.shape, embedding.padding_idx, _weight=weight, _freeze=True)
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.weight.device)
        self.rows = nn.Parameter(self.weight.data[ids_t].float().clone())
        slot = torch.full((self.num_embeddings,), -1, dtype=torch.long, device=self.weight.device)
        slot[ids_t] = torch.arange(len(ids), device=self.weight.device)
        self.register_buffer("slot", slot, persistent=False)
        self.register_buffer("ids", ids_t, persistent=False)
        self._register_state_dict_hook(RowTunedEmbedding._fold)
        self.register_load_state_dict_pre_hook(RowTunedEmbedding._unfold)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        slot = self.slot[input_ids]
        tuned = self.rows.to(out.dtype)[slot.clamp_min(0)]
        return torch.where((slot >= 0).unsqueeze(-1), tuned, out)

    @staticmethod
    def _fold(module, state: dict, prefix: str, local_metadata) -> None:
        weight = state[prefix + "weight"].clone()
        weight[module.ids.to(weight.device)] = state.pop(prefix + "rows").to(weight.dtype)
        state[prefix + "weight"] = weight

    @staticmethod
    def _unfold(module, state: dict, prefix: str, *args) -> None:
        if prefix + "weight" in state and prefix + "rows" not in state:
            state[prefix + "rows"] = state[prefix + "weight"][module.ids.to(state[prefix + "weight"].device)].float()


class AtBaseDtype:
    """The forward of a trained part (fp32 weights) inside a frozen base of another dtype: floating inputs are cast to
    the part's dtype and a floating output back to the dtype of its first floating input, so the base sees the part
    as one of its own (no-op when the dtypes agree, e.g. under an engine that holds everything in bf16)."""

    def __init__(self, module: nn.Module):
        self.module, self.forward = module, module.forward

    def __call__(self, *args, **kwargs):
        own = next(self.module.parameters()).dtype
        floats = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.is_floating_point()]
        out = self.forward(*(a.to(own) if i in floats else a for i, a in enumerate(args)), **kwargs)
        return out.to(args[floats[0]].dtype) if floats and torch.is_tensor(out) and out.is_floating_point() else out


class HeadOnly(Method):
    name = "head"

    def adapt(self, model: nn.Module, targets: Targets) -> None:
        model.requires_grad_(False)
        for part in targets.parts:
            trained = model.get_submodule(part)
            trained.requires_grad_(True)
            trained.forward = AtBaseDtype(trained)
        if targets.rows:
            parent, _, leaf = targets.embedding.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, leaf, RowTunedEmbedding(getattr(owner, leaf), targets.rows))


FINETUNE_METHODS: Registry[type[Method]] = Registry("finetune.method")
FINETUNE_METHODS.register("full", FullTraining)
FINETUNE_METHODS.register("lora", LoRA)
FINETUNE_METHODS.register("head", HeadOnly)


def method_class(cfg: TrainConfig) -> type[Method]:
    return FINETUNE_METHODS.get(cfg.finetune.method)


def build_method(cfg: TrainConfig) -> Method:
    """The run's fine-tuning method (`finetune.method`)."""
    return method_class(cfg)(cfg)
