"""The megatron-core engine behind the training loop (`engine.kind=megatron`, text-to-image).

It owns the model-parallel state (`parallel_state.initialize_model_parallel(tp, pp, virtual_pp)`), this rank's model
chunks (`MegatronT2IBitDance` with pre/post_process; one chunk per virtual stage when interleaved), megatron's
`DistributedDataParallel` with the distributed optimizer (`get_megatron_optimizer`, Adam with decoupled weight decay),
one optimizer step as megatron's micro-batch schedule (`get_forward_backward_func`: no pipelining, 1F1B or
interleaved 1F1B) with `finalize_model_grads`, and the dist_checkpointing state of model, EMA and optimizer (format:
`training.engines.megatron_checkpoint`). Implements `training.engines.Engine`. The models stay engine-free: everything
here wraps `models.t2i.megatron` from outside.

- Data: every rank of a model-parallel group reads the same micro-batches (the loader is split over data-parallel
  ranks only); each pipeline stage builds its attention mask from them, the first embeds, the last scores.
- Randomness: the model is built under one seed on every rank (replicated modules start equal; megatron's CUDA RNG
  tracker gives TP shards their own streams on GPU); then the default generator (bit flips, diffusion draws) is
  seeded per data-parallel rank, equal on the TP/PP ranks of a replica as the replicated diffusion head needs.
- Non-finite steps: a constant loss scale of 1 makes megatron's optimizer check the gradients for inf/NaN and skip
  the update (`step()` returns False), as the DeepSpeed engine does.
- Micro-batches are `PackedT2IBatch`es; with sequence parallelism they are padded to a multiple of tp
  (`models.t2i.megatron.batch.pad_packed_batch`); pipelines exchange variable sequence lengths.

Runs on GPUs (NCCL). megatron-core has no CPU path: on CPU this engine runs only under the test harness
(tests/megatron_cpu.py, which redirects megatron's CUDA lookups), and only without pipelining.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from models.t2i.megatron.batch import pad_packed_batch
from models.t2i.megatron.config import MegatronParallelConfig, validate_parallel
from models.t2i.megatron.mapping import load_model_state, reference_to_megatron, split_pp, split_tp
from models.t2i.megatron.model import MegatronT2IBitDance
from models.t2i.model import T2IConfig, TextToImageBitDance
from training.config import TrainConfig
from training.engines import Resume, StepResult, StepStats, precision
from training.engines.megatron_checkpoint import DIST, megatron_section, model_key, save_dist
from training.optim import NO_DECAY_NAMES

PAD_ID = 0  # sequence-parallel padding: any in-vocabulary id (padded positions are their own document, unlabelled)
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def parallel_config(cfg: TrainConfig) -> MegatronParallelConfig:
    """The `parallel` section plus what the engine decides: recompute, parameter dtype, where layers initialise."""
    return MegatronParallelConfig(
        **asdict(cfg.parallel),
        recompute=cfg.model.activation_checkpointing,
        params_dtype=torch.bfloat16 if precision(cfg) == "bf16" else torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
    )


def no_decay(param: torch.Tensor, name: str) -> bool:
    """Parameters trained without weight decay: the grouping of `training.optim.param_groups`."""
    return param.ndim < 2 or any(k in name for k in NO_DECAY_NAMES)


class MegatronEngine:
    kind = "megatron"
    full_model_on_rank0 = False  # each rank holds its TP shard of its pipeline stage

    def __init__(
        self,
        cfg: TrainConfig,
        model_cfg: T2IConfig,
        reference: TextToImageBitDance | None = None,
        init_checkpoint: Path | None = None,
    ):
        """Model chunks from megatron's own initialisation, or the weights of `reference` (a full model) or of a
        megatron checkpoint's model (`init_checkpoint`)."""
        from megatron.core import parallel_state, tensor_parallel

        self.cfg, self.model_cfg, self.par = cfg, model_cfg, parallel_config(cfg)
        validate_parallel(model_cfg, self.par)
        p = cfg.parallel
        ps = parallel_state
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(p.tp, p.pp, p.virtual_pp)
        elif (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size(),
        ) != (p.tp, p.pp, p.virtual_pp):
            raise ValueError("megatron's model-parallel state is already initialised with another layout")
        self.ps = parallel_state
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.precision = "bf16" if self.par.params_dtype == torch.bfloat16 else "fp32"
        torch.manual_seed(cfg.seed)
        if cuda:
            tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
        self.chunks = [self._build_chunk(v) for v in range(p.virtual_pp or 1)]
        if reference is not None:
            self._load_reference(reference)
        elif init_checkpoint is not None:
            self.load(Path(init_checkpoint) / DIST, ema=None, optimizer=False)
        self.ddp = self._wrap()  # copies the weights into megatron's contiguous buffers
        if reference is None and init_checkpoint is None:
            for m in self.ddp:
                m.broadcast_params()
        self.optimizer = self._build_optimizer()
        self.set_lr(cfg.optim.lr)  # also applies each group's weight-decay multiplier
        torch.manual_seed(cfg.seed * 1000 + self.dp_rank)
        self._configure_schedule()

    # ---- construction ---------------------------------------------------------------------------------------------

    def _build_chunk(self, v: int) -> MegatronT2IBitDance:
        vp = v if self.par.virtual_pp is not None else None
        first = self.ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
        last = self.ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        return MegatronT2IBitDance(self.model_cfg, self.par, pre_process=first, post_process=last, vp_stage=vp).to(
            self.device
        )

    @torch.no_grad()
    def _load_reference(self, reference: TextToImageBitDance) -> None:
        """Each chunk takes its layers (renumbered from 0, located by megatron's layer offset) and its TP shard of the
        full reference weights."""
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        state = {k: v.detach() for k, v in reference.state_dict().items()}
        full = reference_to_megatron(state, self.model_cfg.llm, self.par.transformer_impl)
        n_layers, tp_rank = self.model_cfg.llm.num_hidden_layers, self.ps.get_tensor_model_parallel_rank()
        for chunk in self.chunks:
            count = len(chunk.decoder.layers)  # every chunk holds the same number of layers
            start = get_transformer_layer_offset(chunk.config, chunk.vp_stage)
            part = split_pp(full, n_layers, n_layers // count)[start // count]
            load_model_state(chunk, split_tp(part, self.par.tp)[tp_rank])

    def _wrap(self) -> list:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
        return [DistributedDataParallel(c.config, ddp_config, c) for c in self.chunks]

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, ParamKey, ParamWithNamePredicate, get_megatron_optimizer

        o = self.cfg.optim
        config = OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=self.cfg.schedule.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.betas[0],
            adam_beta2=o.betas[1],
            adam_eps=o.eps,
            clip_grad=o.grad_clip,
            bf16=self.precision == "bf16",
            params_dtype=self.par.params_dtype,
            use_distributed_optimizer=True,
            loss_scale=1.0,  # a constant scaler of 1: megatron then checks gradients for inf/NaN and skips
        )
        overrides = {ParamKey(with_name_predicate=ParamWithNamePredicate("no_decay", no_decay)): {"wd_mult": 0.0}}
        return get_megatron_optimizer(config, self.ddp, config_overrides=overrides)

    def _configure_schedule(self) -> None:
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        no_sync = [m.no_sync for m in self.ddp]
        for chunk in self.chunks:
            chunk.config.finalize_model_grads_func = finalize_model_grads
            chunk.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            chunk.config.grad_scale_func = self.optimizer.scale_loss
        self.forward_backward = get_forward_backward_func()

    # ---- what the training loop uses ------------------------------------------------------------------------------

    @property
    def module(self) -> nn.ModuleList:
        """This rank's model chunks (their parameters are what the EMA tracks)."""
        return nn.ModuleList(self.chunks)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = self.cfg.optim.weight_decay * group.get("wd_mult", 1.0)

    def train_step(self, batches, task, grad_accum: int, poison: bool = False) -> StepStats:
        """Forward/backward over `grad_accum` micro-batches from `batches` and one optimizer step. `poison` makes the
        loss NaN (fault injection: the step must be skipped)."""
        micro = [next(batches) for _ in range(grad_accum)]
        first_of_group = self.ps.get_tensor_model_parallel_rank() == 0 and self.ps.is_pipeline_first_stage()
        counts = [task.batch_counts(b) for b in micro] if first_of_group else [(0, 0, 0.0)]
        if self.par.sequence_parallel:
            micro = [pad_packed_batch(b, self.par.tp, PAD_ID) for b in micro]
        for m in self.ddp:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()

        def loss_func(out):
            loss = out.loss * float("nan") if poison else out.loss
            return loss, {"loss": loss.detach().clone(), **task.loss_metrics(out)}

        def forward_step(data_iterator, model):
            return model(next(data_iterator).to(self.device)), loss_func

        store = self.forward_backward(
            forward_step_func=forward_step,
            data_iterator=[iter(micro) for _ in self.chunks],
            model=self.ddp,
            num_microbatches=grad_accum,
            seq_length=max(b.input_ids.shape[1] for b in micro),
            micro_batch_size=micro[0].input_ids.shape[0],
            forward_only=False,
        )
        applied, grad_norm, _ = self.optimizer.step()
        values = self._from_last_stage(store, ["loss", *task.metric_names], grad_accum)
        result = StepResult(bool(applied), True, float(grad_norm) if applied else float("nan"))
        samples, tokens, flops = (sum(c[i] for c in counts) for i in (0, 1, 2))
        return StepStats(values.pop("loss"), values, samples, tokens, flops, result)

    def _from_last_stage(self, store: list[dict], keys: list[str], n: int) -> dict[str, float]:
        """Means over the micro-batches of the values the last pipeline stage collected, on every rank of the pipeline
        (the other stages contribute zeros to a sum over the pipeline group)."""
        values = torch.tensor(
            [sum(float(s[k]) for s in store) / n for k in keys] if store else [0.0] * len(keys), dtype=torch.float64
        )
        if self.par.pp > 1:
            dist.all_reduce(values, group=self.ps.get_pipeline_model_parallel_group())
        return dict(zip(keys, values.tolist(), strict=True))

    # ---- checkpoints ----------------------------------------------------------------------------------------------

    def _model_sharded(self) -> dict:
        return {f"model{i}": _persistent(c.sharded_state_dict(prefix="model.")) for i, c in enumerate(self.chunks)}

    def _ema_sharded(self, ema, model: dict) -> dict:
        """The EMA shadows under the model's sharding, keyed `ema.<key>`."""
        out = {}
        for i, chunk in enumerate(self.chunks):
            shadow = {id(p): ema.shadow[f"{i}.{n}"] for n, p in chunk.named_parameters() if f"{i}.{n}" in ema.shadow}
            part = {}
            for k, sh in model[f"model{i}"].items():
                if id(sh.data) in shadow:
                    data = shadow[id(sh.data)]
                    kw = {"dtype": data.dtype} if hasattr(sh, "dtype") else {}
                    part[k] = replace(sh, key="ema." + model_key(sh.key), data=data, **kw)
            out[f"ema{i}"] = part
        return out

    def _optimizer_sharded(self, model: dict, loading: bool) -> dict:
        _materialize_adam_state(self.optimizer)
        return self.optimizer.sharded_state_dict(model, is_loading=loading, metadata=OPTIMIZER_FORMAT)

    def save_state(self, directory: Path, ema) -> tuple[dict, dict]:
        self.save(directory / DIST, ema)
        section = megatron_section(self.model_cfg, **self.layout(), contents=["model", "ema", "optimizer"])
        return {}, {"megatron": section}

    def load_state(self, directory: Path, ema, trainer: dict, per_rank: dict | None) -> Resume:
        """Any layout loads (dist_checkpointing reshards); RNG and loader state apply when the layout matches, the
        loader state alone when the data-parallel size does."""
        if "megatron" not in trainer:
            raise ValueError(f"{directory} was written by the DeepSpeed engine; resume it with engine.kind=deepspeed")
        section = trainer["megatron"]
        contents = section["contents"]
        self.load(directory / DIST, ema if "ema" in contents else None, optimizer="optimizer" in contents)
        if "ema" not in contents:  # a model-only checkpoint (e.g. imported): the EMA starts at its weights
            with torch.no_grad():
                for name, p in self.module.named_parameters():
                    if name in ema.shadow:
                        ema.shadow[name].copy_(p.detach().float())
        if trainer.get("world_size") == dist.get_world_size() and section["layout"] == self.layout() and per_rank:
            return "all"
        same_dp = section["layout"].get("dp") == self.dp_size
        if dist.get_rank() == 0:
            restart = "" if same_dp else "; the data stream restarts (data-parallel size changed)"
            was = f"layout {section['layout']} on {trainer.get('world_size')} ranks"
            print(
                f"{directory} was written with {was}, this run has {self.layout()}: weights and optimizer state "
                f"resharded; RNG states start fresh{restart}",
                flush=True,
            )
        return "loader" if same_dp else "none"

    def save(self, directory: Path, ema) -> None:
        """Model, EMA and optimizer state into a dist_checkpointing directory (every rank calls this)."""
        model = self._model_sharded()
        state = {**model, **self._ema_sharded(ema, model), "optimizer": self._optimizer_sharded(model, False)}
        save_dist(state, directory)

    @torch.no_grad()
    def load(self, directory: Path, ema=None, optimizer: bool = True) -> None:
        """Model (and the EMA when given, and the optimizer state) from a dist_checkpointing directory written at any
        TP/PP layout. Model-only loads happen before the optimizer exists (its main weights copy the model's)."""
        from megatron.core import dist_checkpointing

        model = self._model_sharded()
        state = dict(model)
        if ema is not None:
            state.update(self._ema_sharded(ema, model))
        if optimizer:
            state["optimizer"] = self._optimizer_sharded(model, True)
        loaded = dist_checkpointing.load(state, str(directory))
        for i, chunk in enumerate(self.chunks):
            load_model_state(chunk, {k.removeprefix("model."): v for k, v in loaded[f"model{i}"].items()})
            if ema is not None:
                for k, v in loaded[f"ema{i}"].items():
                    ema.shadow[f"{i}.{k.removeprefix('model.')}"].copy_(v)
        if optimizer:
            _load_optimizer(self.optimizer, loaded["optimizer"])

    def layout(self) -> dict:
        p = self.par
        return {"tp": p.tp, "pp": p.pp, "virtual_pp": p.virtual_pp, "dp": self.dp_size}


def _persistent(sharded: dict) -> dict:
    """A model's sharded state without TE/megatron `_extra_state` objects (not checkpointed: see the format doc)."""
    from megatron.core.dist_checkpointing import ShardedObject

    return {k: v for k, v in sharded.items() if not isinstance(v, ShardedObject)}


def _distributed_optimizers(optimizer) -> list:
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(inner) != 1:
        raise ValueError(f"expected one distributed optimizer, megatron built {len(inner)}")
    return inner


def _materialize_adam_state(optimizer) -> None:
    """Give torch.optim.AdamW (megatron's fallback without TE/apex) its state before the first step: megatron's
    DistributedOptimizer.state_dict() reads a per-parameter `step` that torch creates only on the first step."""
    for o in _distributed_optimizers(optimizer):
        if not isinstance(o.optimizer, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in o.optimizer.param_groups:
            for p in group["params"]:
                state = o.optimizer.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))


def _load_optimizer(optimizer, state: dict) -> None:
    """`DistributedOptimizer.load_state_dict` in its two parts. In between, torch AdamW's per-parameter `step` is set
    aside: megatron 0.16 restores it as one tensor shared by every parameter (which AdamW would then increment once
    per parameter) and expects it among the loaded tensors; each parameter gets its own copy back."""
    (o,) = _distributed_optimizers(optimizer)
    state = dict(state)
    param_state = state.pop("param_state")
    if state.pop("param_state_sharding_type") != OPTIMIZER_FORMAT["distrib_optim_sharding_type"]:
        raise ValueError("optimizer state was not saved fully reshardable")
    o.load_state_dict(state)
    steps = {p: s.pop("step") for p, s in o.optimizer.state.items() if "step" in s}
    o.load_parameter_state_from_fully_reshardable(param_state)
    for p, step in steps.items():
        o.optimizer.state[p]["step"] = step.detach().clone()
