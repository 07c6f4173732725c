"""The DeepSpeed engine behind the training loop (`engine.kind=deepspeed`): ZeRO stage 0-3, bf16 (GPU) or fp32 (CPU)
or fp8 (torchao float8 backbone linears, bf16 for the rest), gloo on CPU and NCCL on GPU, gradient clipping, and steps
skipped (not applied) when the gradients are not finite; optionally ZeRO's CPU offload of the optimizer state
(`engine.offload=optimizer`) and of the parameters (`params`, ZeRO-3), torch's AdamW stepping on the CPU (DeepSpeed's
own CPU Adam is a compiled extension: `zero_force_ds_cpu_optimizer` is off). It owns its setup (the fine-tuning
method of `training.finetune`, FP8 conversion, activation checkpointing, the optimizer; `DeepSpeedEngine.build`) and
its config checks (`DeepSpeedEngine.check`). A LoRA or head-only run (`finetune.method`) checkpoints the trainable
weights, their optimizer state and EMA only, with a reference to the base model its resume must match.

The loop sees only `train_step`, `set_lr`, `module` and the checkpoint hooks, so other engines
(training/engines/megatron.py) stand behind the same calls.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from models.family import FAMILIES
from training.config import TrainConfig
from training.ema import EMA
from training.engines import EngineBase, Resume, StepResult, StepStats, precision
from training.engines.export import read_weights
from training.finetune import Method, build_method, method_class, trainable_parameters
from training.optim import set_lr
from training.step_monitor import ForwardClock

OFFLOADS = ("none", "optimizer", "params")


def offload_settings(offload: str) -> dict:
    """The `zero_optimization` entries of `engine.offload`: the optimizer state (and fp32 master weights) in CPU memory,
    and for `params` the ZeRO-3 parameter partitions too; pinned host memory where there is a GPU."""
    cpu = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "none": {},
        "optimizer": {"offload_optimizer": cpu},
        "params": {"offload_optimizer": cpu, "offload_param": cpu},
    }[offload]


class DeepSpeedEngine(EngineBase):
    kind = "deepspeed"
    precisions = ("fp32", "bf16", "fp8")
    export_how = "DeepSpeed's zero_to_fp32 on the checkpoint's model (ZeRO-3)"

    @classmethod
    def export_checkpoint(cls, checkpoint: Path, dst: Path, text_tokenizer: Path, image_tokenizer: Path) -> Path:
        from training.checkpoint_integrity import CheckpointError
        from training.engines.export import export_deepspeed, read_trainer_json
        from training.finetune import FINETUNE_METHODS

        tuned = read_trainer_json(checkpoint).get("finetune")
        if tuned and not FINETUNE_METHODS.get(tuned["method"]).full_model:
            how = FINETUNE_METHODS.get(tuned["method"]).export_how
            raise CheckpointError(
                f"{checkpoint} holds the trainable state of a finetune.method={tuned['method']} run only, not a whole "
                f"model; {how}"
            )
        return export_deepspeed(checkpoint, dst, text_tokenizer, image_tokenizer)

    @classmethod
    def check(cls, cfg: TrainConfig) -> list[tuple[bool, str]]:
        e, resolved = cfg.engine, precision(cfg)
        whole = getattr(FAMILIES.get(cfg.model.kind).task_class(), "whole_parameters", False)
        method = cfg.finetune.method
        partial = not method_class(cfg).full_model
        return [
            *method_class(cfg).check(cfg),  # the fine-tuning method's own (this engine trains every method)
            (e.offload in OFFLOADS, f"engine.offload must be {', '.join(OFFLOADS)}, got {e.offload}"),
            (
                e.offload == "none" or e.zero_stage >= 1,
                f"engine.offload={e.offload} moves ZeRO's state to the CPU: set engine.zero_stage 1-3 (3 for params)",
            ),
            (
                e.offload != "params" or e.zero_stage == 3,
                "engine.offload=params needs engine.zero_stage=3 (only ZeRO-3 partitions the parameters); set "
                "engine.zero_stage=3 or engine.offload=optimizer",
            ),
            (
                not partial or resolved != "fp8",
                f"finetune.method={method} trains with engine.precision fp32 or bf16 (fp8 converts the frozen base's "
                "linears); set engine.precision=bf16",
            ),
            (
                not partial or resolved == "fp32" or cfg.finetune.base_dtype == "bf16",
                f"finetune.base_dtype={cfg.finetune.base_dtype} needs engine.precision=fp32 (under {resolved} "
                "DeepSpeed holds the whole model in bf16); set finetune.base_dtype=bf16",
            ),
            (0 <= e.zero_stage <= 3, f"engine.zero_stage must be 0-3, got {e.zero_stage}"),
            (
                resolved == "fp32" or e.zero_stage >= 1,
                f"engine.precision {resolved} needs engine.zero_stage >= 1 (fp32 master weights live there)",
            ),
            (
                not whole or e.zero_stage <= 2,
                f"model.kind={cfg.model.kind} trains with engine.zero_stage 0-2 (it needs whole parameters on every "
                "rank)",
            ),
        ]

    @classmethod
    def auto_precision(cls, cfg: TrainConfig, cuda: bool) -> str:
        """bf16 on GPUs when ZeRO holds fp32 master weights (stage >= 1), else fp32."""
        return "bf16" if cuda and cfg.engine.zero_stage >= 1 else "fp32"

    @classmethod
    def before_process_group(cls) -> None:
        import deepspeed  # noqa: F401  (before the process group exists: see training/engines/__init__.py)

    @classmethod
    def after_process_group(cls, cuda: bool) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")  # adopts the process group

    @classmethod
    def build(cls, cfg: TrainConfig, task, grad_accum: int) -> DeepSpeedEngine:
        """FP8 conversion (before the optimizer and the checkpoint wrappers: plain module names), activation
        checkpointing, the optimizer, then the engine around the task's model."""
        from training.optim import build_optimizer

        method = build_method(cfg)
        method.apply(task)  # before the FP8 and checkpoint wrappers: PEFT's module paths are the model's own
        if dist.get_rank() == 0 and not method.full_model:
            print(method.describe(task.model), flush=True)  # trainable parameters: count and fraction
        if precision(cfg) == "fp8":
            from training.fp8 import convert_backbone, skipped_unaligned

            prefixes = FAMILIES.get(cfg.model.kind).fp8_prefixes
            converted = convert_backbone(task.model, prefixes, cfg.engine.fp8_recipe)
            skipped = skipped_unaligned(task.model, prefixes)
            if dist.get_rank() == 0:
                print(
                    f"fp8 (torchao {cfg.engine.fp8_recipe}): {len(converted)} backbone linears converted, "
                    f"{len(skipped)} left in bf16 (dims not multiples of 16)"
                    f"{': ' + ', '.join(skipped) if skipped else ''}",
                    flush=True,
                )
        if cfg.model.activation_checkpointing:
            from training.activation_checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(task.model)
        return cls(task.model, build_optimizer(task.model, cfg.optim), cfg, grad_accum, method)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        grad_accum: int,
        method: Method | None = None,
    ):
        import deepspeed

        self.method = method or build_method(cfg)
        self.base_reference = None if self.method.full_model else self.method.base_reference()
        self.zero_stage = cfg.engine.zero_stage
        self.precision = precision(cfg)
        bf16 = self.precision in ("bf16", "fp8")  # fp8: float8 matmuls in the converted linears, bf16 elsewhere
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.data.micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": self.zero_stage, **offload_settings(cfg.engine.offload)},
            "bf16": {"enabled": bf16, "check_grad_overflow": True},
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        if cfg.engine.offload != "none":
            ds_config["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW steps the offloaded state
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.base_optimizer = optimizer
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.full_model_on_rank0 = self.zero_stage < 3
        self.clock = ForwardClock(torch.cuda.is_available())
        offload = offload_settings(cfg.engine.offload)
        if offload and self.dp_rank == 0:
            what = " and ".join(offload)
            print(f"engine.offload={cfg.engine.offload}: ZeRO-{self.zero_stage} with {what} to the CPU", flush=True)

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def set_lr(self, lr: float) -> None:
        set_lr(self.base_optimizer, lr)

    def new_ema(self, decay: float) -> EMA:
        return EMA(self.module, decay)

    def ema_model(self, ema: EMA) -> None:
        """ZeRO-3 shards every parameter: sample grids and evaluation need an export of the checkpoint."""
        if dist.get_rank() == 0:
            print(
                "evaluation skipped under ZeRO-3 (parameters are sharded); evaluate an exported checkpoint", flush=True
            )
        return None

    def train_step(self, batches, task, grad_accum: int, poison: bool = False) -> StepStats:
        """Forward/backward over `grad_accum` micro-batches from `batches`, the update applied at the last one.
        `poison` makes the loss NaN (fault injection: the step must be skipped)."""
        losses, metrics, samples, tokens, flops, optimizer_s = [], {}, 0, 0, 0.0, 0.0
        for _ in range(grad_accum):
            batch = next(batches)
            with self.clock:
                out = task.step(self, batch)
            loss = out.loss * float("nan") if poison else out.loss
            self.backward(loss)
            start = time.perf_counter()
            result = self.step()
            optimizer_s += time.perf_counter() - start
            losses.append(loss.item())
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v / grad_accum
            samples += out.samples
            tokens += out.tokens
            flops += out.flops
        loss = sum(losses) / len(losses)
        return StepStats(loss, metrics, samples, tokens, flops, result, optimizer_s, self.clock.take())

    @torch.no_grad()
    def validation_sums(self, batches: list[tuple[tuple, bool]], task) -> torch.Tensor:
        total = torch.zeros(4, dtype=torch.float64)
        device = next(self.module.parameters()).device
        self.engine.eval()
        try:
            for inputs, keep in batches:
                inputs = tuple(x.to(device) for x in inputs)
                out = self.engine(*inputs)  # through the engine: ZeRO-3 gathers the parameters
                if keep:
                    total += task.validation_sums(out, inputs)
        finally:
            self.engine.train()
        dist.all_reduce(total)
        return total

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def _grads_finite_stage0(self) -> tuple[bool, float]:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()
        return bool(torch.isfinite(torch.tensor(norm))), norm

    def step(self) -> StepResult:
        """Call after every micro-batch's backward; applies the update at the accumulation boundary."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if not boundary:
            self.engine.step()
            return StepResult(False, False, float("nan"))
        if self.zero_stage == 0:  # DeepSpeed would apply non-finite fp32 gradients: skip its step ourselves
            finite, norm = self._grads_finite_stage0()
            if finite:
                self.engine.step()
            else:  # what engine.step() does at a boundary, minus the update (keeps its step counters in sync)
                self.engine.zero_grad()
                self.engine.global_steps += 1
                self.engine.micro_steps += 1
            return StepResult(finite, True, norm)
        self.engine.step()  # ZeRO optimizers detect the non-finite norm, clear the gradients and skip
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return StepResult(not self.optimizer.overflow, True, norm)

    # ---- checkpoints -----------------------------------------------------------------------------------------------

    def save_state(self, directory: Path, ema) -> tuple[dict, dict]:
        """The whole model (`model.safetensors`), or for a LoRA / head run the trainable weights only (the method's
        files, e.g. `adapter/`) and its base reference in trainer.json; the EMA; each rank's optimizer state."""
        full = self.method.full_model
        model_state = self.full_state_dict() if full else self.trainable_state_dict()
        per_rank = {"optimizer": self.optimizer_state()}
        if self.zero_stage == 3:
            per_rank["ema"] = ema.state_dict()
        if dist.get_rank() == 0:
            if full:
                save_file({k: v.contiguous() for k, v in model_state.items()}, str(directory / "model.safetensors"))
            else:
                self.method.save_weights(directory, model_state)
            if self.zero_stage < 3:
                save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(directory / "ema.safetensors"))
        return per_rank, {} if full else {"finetune": self.base_reference}

    def when_saved(self, finalize) -> None:
        finalize()  # DeepSpeed's state is on disk when save_state returns

    def poll_saves(self) -> None:
        pass

    def wait_saves(self) -> None:
        pass

    def load_state(self, directory: Path, ema, trainer: dict, per_rank: dict | None) -> Resume:
        """Same world size: everything, exactly. Another world size (ZeRO 0-2): weights, EMA and the optimizer state
        re-partitioned for this layout; the data stream is resized and RNG states start fresh."""
        if "megatron" in trainer:
            raise ValueError(f"{directory} was written by the megatron engine; resume it with engine.kind=megatron")
        old_world, world = int(trainer["world_size"]), dist.get_world_size()
        resized = old_world != world
        if resized and self.zero_stage == 3:
            raise ValueError(
                f"{directory} was written by {old_world} ranks under ZeRO-3, this run has {world}: ZeRO-3 resumes on "
                "the same world size only; resume a ZeRO 0-2 run on another size, or keep the size"
            )
        if not resized and per_rank is None:
            raise ValueError(f"{directory} has no rank_{dist.get_rank():05d}.pt for this rank")
        self.method.check_resume(directory, trainer)
        if self.method.full_model:
            self.load_full_state_dict(read_weights(directory, "model.safetensors"))
        else:
            self.load_trainable_state_dict(self.method.load_weights(directory))
        optimizer = self._resized_optimizer_state(directory, old_world) if resized else per_rank["optimizer"]
        self.load_optimizer_state(optimizer)
        own_ema = per_rank is not None and not resized and "ema" in per_rank
        ema.load_state_dict(per_rank["ema"] if own_ema else read_weights(directory, "ema.safetensors"))
        if resized and dist.get_rank() == 0:
            print(
                f"{directory} was written by {old_world} ranks, this run has {world}: optimizer state re-partitioned, "
                "data stream resized, RNG states start fresh",
                flush=True,
            )
        return "resized" if resized else "all"

    def _resized_optimizer_state(self, directory: Path, old_world: int) -> dict:
        """This rank's optimizer state (as `optimizer_state` makes it) cut from a checkpoint of `old_world` ranks.

        ZeRO 1/2 keep each parameter group as one flat buffer (parameters in order, padding at the end only) split
        into equal partitions, one per rank; the old partitions are laid end to end and this rank's slice taken
        (the old files are memory-mapped, so only the overlapping slices are read). ZeRO-0 state is replicated."""
        files = [directory / f"rank_{r:05d}.pt" for r in range(old_world)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} lacks {missing[0]}: a resized resume needs every rank's file")
        olds = [torch.load(f, map_location="cpu", weights_only=True, mmap=True)["optimizer"] for f in files]
        if self.zero_stage == 0:
            return olds[0]
        rank, base = dist.get_rank(), olds[0]["base"]
        new = {"base": {"param_groups": base["param_groups"], "state": {}}, "fp32_partitions": []}
        for g, part in enumerate(self.optimizer.single_partition_of_fp32_groups):
            n, total = part.numel(), sum(p.numel() for p in self.optimizer.bit16_groups[g])
            old_n = olds[0]["fp32_partitions"][g].numel()

            def cut(pieces: list[torch.Tensor], n=n, total=total, old_n=old_n) -> torch.Tensor:
                out, start = torch.zeros(n, dtype=pieces[0].dtype), rank * n
                for r, t in enumerate(pieces):
                    lo, hi = max(start, r * old_n), min(start + n, (r + 1) * old_n, total)
                    if lo < hi:
                        out[lo - start : hi - start] = t[lo - r * old_n : hi - r * old_n]
                return out

            new["fp32_partitions"].append(cut([o["fp32_partitions"][g] for o in olds]))
            state = base["state"].get(g)
            if state is not None:
                new["base"]["state"][g] = {
                    k: cut([o["base"]["state"][g][k] for o in olds]) if torch.is_tensor(v) and v.numel() == old_n else v
                    for k, v in state.items()
                }
        return new

    # every tensor state this rank owns, loadable with torch.load(weights_only=True)
    def optimizer_state(self) -> dict:
        if self.zero_stage == 0:
            return {"base": self.base_optimizer.state_dict()}
        if self.zero_stage in (1, 2):
            return {
                "base": self.optimizer.optimizer.state_dict(),
                "fp32_partitions": [t.detach().clone() for t in self.optimizer.single_partition_of_fp32_groups],
            }
        flats = self.optimizer.fp32_partitioned_groups_flat  # ZeRO-3 steps its sub-groups one flat tensor at a time
        base = self.optimizer.optimizer
        return {
            "base_state": [
                {k: (v.clone() if torch.is_tensor(v) else v) for k, v in base.state[f].items()}
                if f in base.state
                else {}
                for f in flats
            ],
            "fp32_partitions": [t.detach().clone() for t in flats],
            "param_shards": [p.ds_tensor.detach().clone() for p in self.saved_parameters()],
        }

    @torch.no_grad()
    def load_optimizer_state(self, state: dict) -> None:
        if self.zero_stage == 0:
            self.base_optimizer.load_state_dict(state["base"])
            return
        if self.zero_stage == 3:
            base = self.optimizer.optimizer
            for flat, st in zip(self.optimizer.fp32_partitioned_groups_flat, state["base_state"], strict=True):
                if st:
                    base.state[flat] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        else:
            self.optimizer.optimizer.load_state_dict(state["base"])
        mine = (
            self.optimizer.single_partition_of_fp32_groups
            if self.zero_stage in (1, 2)
            else self.optimizer.fp32_partitioned_groups_flat
        )
        if len(mine) != len(state["fp32_partitions"]) or any(
            a.shape != b.shape for a, b in zip(mine, state["fp32_partitions"], strict=False)
        ):
            raise ValueError("optimizer partitions differ from the checkpoint's (same world size and ZeRO stage?)")
        for dst, src in zip(mine, state["fp32_partitions"], strict=True):
            dst.copy_(src)
        if self.zero_stage == 3:
            for p, shard in zip(self.saved_parameters(), state["param_shards"], strict=True):
                p.ds_tensor.copy_(shard)

    def saved_parameters(self) -> list[nn.Parameter]:
        """The parameters a checkpoint holds: all of them, or the trainable ones of a LoRA / head run."""
        if self.method.full_model:
            return list(self.module.parameters())
        return list(trainable_parameters(self.module).values())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """{plain name: weight} of the trainable parameters (gathered under ZeRO-3); every rank must call it."""
        params = trainable_parameters(self.module)
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
                return {k: p.detach().cpu().clone() for k, p in params.items()}
        return {k: p.detach().cpu().clone() for k, p in params.items()}

    @torch.no_grad()
    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = trainable_parameters(self.module)
        odd = sorted(set(params) ^ set(state))
        if odd:
            where = "lacks" if odd[0] in params else "has the unknown weight"
            raise ValueError(f"the checkpoint {where} {odd[0]}; resume with the settings it was trained with")
        if self.zero_stage == 3:
            return  # shards come back with the optimizer state
        for k, p in params.items():
            p.copy_(state[k])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights (gathered under ZeRO-3); every rank must call it."""
        if self.zero_stage == 3:
            import deepspeed

            params = list(self.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.zero_stage == 3:
            return  # shards come back with the optimizer state
        missing, unexpected = self.module.load_state_dict(state, strict=True)
        del missing, unexpected
