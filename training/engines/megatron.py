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
  seeded per data-parallel rank, equal on the TP ranks of a stage as the replicated projector and diffusion head
  need. The last pipeline stage (diffusion draws) gets the seed a single-stage run has, earlier stages (bit flips on
  the first) streams of their own, so the flips of a micro-batch are not drawn from the numbers of its diffusion
  times and noises.
- Non-finite steps: a constant loss scale of 1 makes megatron's optimizer check the gradients for inf/NaN and skip
  the update (`step()` returns False), as the DeepSpeed engine does.
- Fixed shapes: micro-batches are `PackedT2IBatch`es padded to one length, `data.token_budget` rounded up to what
  sequence parallelism, FP8 and FlexAttention need (`models.t2i.megatron.batch`; padding is masked and unscored, the
  loss is unchanged), so compiled attention compiles once and pipeline stages exchange one tensor shape
  (`variable_seq_lengths=False`). A row longer than the budget (never from the loader) pads the step to a longer
  length, with a warning.
- Recompute (`parallel.recompute`, or `model.activation_checkpointing=true` = full recompute of every layer when
  `parallel.recompute` is unset; the `parallel` section wins): megatron reruns the backbone layers; with "full" the
  diffusion head's blocks rerun too (`training.activation_checkpointing.recompute_head`, parameter names unchanged).
- Pipelines: 1F1B for pp > 1, interleaved 1F1B with virtual_pp. With pp=2 both neighbours of a rank are the same
  rank, so batched p2p (one `batch_isend_irecv` for both directions, matched in posting order) swaps activations and
  gradients of the interleaved schedule; there megatron's unbatched p2p is used, which puts the two directions on
  two process groups.

Runs on GPUs (NCCL). megatron-core has no CPU path: on CPU this engine runs only under the test harness
(tests/helpers/megatron_cpu.py, which redirects megatron's CUDA lookups and runs every schedule over gloo).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from models.core.attention import resolve_attention
from models.t2i.megatron.batch import fixed_length, pad_to_length, pad_to_rows, row_length, sequence_multiple
from models.t2i.megatron.config import MegatronParallelConfig, validate_parallel
from models.t2i.megatron.mapping import chunk_state, load_model_state, reference_to_megatron, split_tp
from models.t2i.model import T2IConfig, TextToImageBitDance
from training.checkpoint_integrity import verify_checkpoint
from training.config import TrainConfig
from training.ema import ShardedEMA
from training.engines import EngineBase, Resume, StepResult, StepStats, precision
from training.engines.megatron_checkpoint import DIST, dist_path, megatron_section, model_key, save_dist
from training.finetune import method_class
from training.optim import NO_DECAY_NAMES
from training.step_monitor import ForwardClock

if TYPE_CHECKING:
    from models.t2i.megatron.model import MegatronT2IBitDance

PAD_ID = 0  # fixed-length padding: any in-vocabulary id (padded positions are their own document, unlabelled)
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def parallel_config(cfg: TrainConfig) -> MegatronParallelConfig:
    """The `parallel` section plus what the engine decides: parameter dtype, where layers initialise, and recompute:
    `parallel.recompute` when set, else "full" (every layer) if `model.activation_checkpointing` is on."""
    settings = asdict(cfg.parallel)
    if settings["recompute"] is None and cfg.model.activation_checkpointing:
        settings["recompute"] = "full"
    return MegatronParallelConfig(
        **settings,
        params_dtype=torch.bfloat16 if precision(cfg) == "bf16" else torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
    )


def no_decay(param: torch.Tensor, name: str) -> bool:
    """Parameters trained without weight decay: the grouping of `training.optim.param_groups`."""
    return param.ndim < 2 or any(k in name for k in NO_DECAY_NAMES)


class MegatronEngine(EngineBase):
    kind = "megatron"
    model_kinds = ("t2i",)
    shards_model = True
    supports_async_save = True
    export_how = (
        "`python -m training.checkpoint export --src <checkpoint> --dst <folder> --text-tokenizer ... "
        "--image-tokenizer ...`"
    )

    @classmethod
    def export_checkpoint(cls, checkpoint: Path, dst: Path, text_tokenizer: Path, image_tokenizer: Path) -> Path:
        from training.engines.export import export_megatron

        return export_megatron(checkpoint, dst, text_tokenizer, image_tokenizer)

    full_model_on_rank0 = False  # each rank holds its TP shard of its pipeline stage

    @classmethod
    def check(cls, cfg: TrainConfig) -> list[tuple[bool, str]]:
        p = cfg.parallel
        return [
            (p.tp >= 1 and p.pp >= 1, "parallel.tp and parallel.pp must be >= 1"),
            (
                cfg.engine.precision != "fp8",
                "engine.precision=fp8 is torchao FP8 for engine.kind=deepspeed; megatron's FP8 is Transformer Engine: "
                "set engine.precision=bf16 parallel.transformer_impl=te parallel.fp8=hybrid",
            ),
            (
                method_class(cfg).full_model,
                f"finetune.method={cfg.finetune.method} runs on engine.kind=deepspeed; megatron trains the whole model "
                "(finetune.method=full)",
            ),
            (
                cfg.engine.offload == "none",
                f"engine.offload={cfg.engine.offload} is DeepSpeed's ZeRO offload: use engine.kind=deepspeed or "
                "engine.offload=none",
            ),
        ]

    @classmethod
    def check_model(cls, cfg: TrainConfig, model_cfg: T2IConfig) -> None:
        """The layout against the model's heads, KV heads, MLP width and layers (`validate_parallel`, which the engine
        runs again when it builds), with the text vocabulary padded to a multiple of tp as the task pads it."""
        tp = cfg.parallel.tp
        llm = replace(model_cfg.llm, vocab_size=-(-model_cfg.llm.vocab_size // tp) * tp)
        try:
            validate_parallel(replace(model_cfg, llm=llm), parallel_config(cfg))
        except ValueError as e:  # "tp=3 does not divide ..." -> "parallel.tp=3 does not divide ..."
            setting = str(e).split("=", 1)[0]
            raise ValueError(f"parallel.{e}" if setting in asdict(cfg.parallel) else f"parallel: {e}") from None

    @classmethod
    def data_parallel_size(cls, cfg: TrainConfig, world_size: int) -> int:
        """World size / (tp * pp), which must divide exactly."""
        model_parallel = cfg.parallel.tp * cfg.parallel.pp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by parallel.tp {cfg.parallel.tp} x parallel.pp "
                f"{cfg.parallel.pp}; launch a multiple of {model_parallel} processes"
            )
        return world_size // model_parallel

    @classmethod
    def check_accumulation(cls, cfg: TrainConfig, micro_batches: int) -> None:
        p = cfg.parallel
        if p.virtual_pp is not None and micro_batches % p.pp:
            raise ValueError(
                f"the interleaved schedule (parallel.virtual_pp) needs micro-batches per step ({micro_batches}) to be "
                f"a multiple of parallel.pp {p.pp}; change data.global_batch"
            )

    @classmethod
    def vocab_multiple(cls, cfg: TrainConfig) -> int:
        return cfg.parallel.tp  # vocab-parallel embedding and LM head

    @classmethod
    def build(cls, cfg: TrainConfig, task, grad_accum: int) -> MegatronEngine:
        """The engine takes the task's weights (when it has a full model): its chunks replace the model."""
        reference, task.model = task.model, None
        return cls(cfg, task.model_cfg, reference, task.init_checkpoint, task.init_folder)

    def __init__(
        self,
        cfg: TrainConfig,
        model_cfg: T2IConfig,
        reference: TextToImageBitDance | None = None,
        init_checkpoint: Path | None = None,
        init_folder: Path | None = None,
    ):
        """Model chunks from megatron's own initialisation, or the weights of `reference` (a full model), of a
        megatron checkpoint's model (`init_checkpoint`) or of an official / Hugging Face Qwen3 folder (`init_folder`,
        read by every rank for its own shard only)."""
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
        self._pending = None  # a background checkpoint write not yet scheduled (checkpoint.async_save)
        self._queue = None  # megatron's AsyncCallsQueue, made at the first background write
        if cfg.checkpoint.async_save:
            self._start_async_writer()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.clock = ForwardClock(cuda)
        self.precision = "bf16" if self.par.params_dtype == torch.bfloat16 else "fp32"
        flex = resolve_attention(model_cfg.attention, cuda) == "flex"
        self.multiple = sequence_multiple(p.tp, p.sequence_parallel, p.fp8 is not None, flex)
        self.seq_length = row_length(cfg.data.token_budget, p.tp, p.sequence_parallel, p.fp8 is not None, flex)
        torch.manual_seed(cfg.seed)
        if cuda:
            tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
        self.chunks = [self._build_chunk(v) for v in range(p.virtual_pp or 1)]
        if reference is not None:
            self._load_reference(reference)
        elif init_checkpoint is not None:
            verify_checkpoint(init_checkpoint, cfg.checkpoint.checksums)
            self.load(Path(init_checkpoint) / DIST, ema=None, optimizer=False)
        elif init_folder is not None:
            self._load_folder(Path(init_folder))
        self.ddp = self._wrap()  # copies the weights into megatron's contiguous buffers
        if reference is None and init_checkpoint is None and init_folder is None:
            for m in self.ddp:
                m.broadcast_params()
        self.optimizer = self._build_optimizer()
        self.set_lr(cfg.optim.lr)  # also applies each group's weight-decay multiplier
        stages_after = ps.get_pipeline_model_parallel_world_size() - 1 - ps.get_pipeline_model_parallel_rank()
        torch.manual_seed(cfg.seed * 1000 + self.dp_rank + 7_919_777 * stages_after)  # see "Randomness" above
        self._configure_schedule()

    # ---- construction ---------------------------------------------------------------------------------------------

    def _build_chunk(self, v: int) -> MegatronT2IBitDance:
        from models.t2i.megatron.model import MegatronT2IBitDance  # megatron-core: imported when a model is built

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
        tp_rank = self.ps.get_tensor_model_parallel_rank()
        for chunk in self.chunks:
            start = get_transformer_layer_offset(chunk.config, chunk.vp_stage)
            part = chunk_state(full, start, len(chunk.decoder.layers), chunk.pre_process, chunk.post_process)
            load_model_state(chunk, split_tp(part, self.par.tp)[tp_rank])

    @torch.no_grad()
    def _load_folder(self, folder: Path) -> None:
        """This rank's shard (its stages' layers, its TP pieces) from an official or Hugging Face Qwen3 folder, read one
        layer at a time through the checkpoint tools' lazy fetcher (`checkpoint_stream`), never the whole model. The
        folder's vocabulary is resized to the model's (new rows: the mean); a Qwen3 folder's projector and head start
        fresh from `seed`."""
        from training.engines.checkpoint_stream import Fetcher, FolderLayers, fill_sharded

        source = FolderLayers(folder, self.model_cfg, self.cfg.seed)
        self._apply_model(fill_sharded(self._model_sharded(), Fetcher(source.read)))

    def _apply_model(self, loaded: dict) -> None:
        """Each chunk's weights from a loaded model state ({`model<i>`: {`model.<name>`: tensor}})."""
        for i, chunk in enumerate(self.chunks):
            load_model_state(chunk, {k.removeprefix("model."): v for k, v in loaded[f"model{i}"].items()})

    def _wrap(self) -> list:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        p = self.par
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=p.grad_reduce_in_fp32,
            use_distributed_optimizer=True,
            overlap_grad_reduce=p.overlap_grad_reduce,
            overlap_param_gather=p.overlap_param_gather,
        )
        return [DistributedDataParallel(c.config, ddp_config, c) for c in self.chunks]

    def _sync_params(self) -> None:
        """With `overlap_param_gather` the updated weights arrive during the next forward pass: finish the
        all-gather now (before a checkpoint or a sample grid reads the weights)."""
        if self.par.overlap_param_gather:
            for m in self.ddp:
                m.start_param_sync(force_sync=True)

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
            overlap_param_gather=self.par.overlap_param_gather,
            loss_scale=1.0,  # a constant scaler of 1: megatron then checks gradients for inf/NaN and skips
        )
        overrides = {ParamKey(with_name_predicate=ParamWithNamePredicate("no_decay", no_decay)): {"wd_mult": 0.0}}
        return get_megatron_optimizer(config, self.ddp, config_overrides=overrides)

    def _configure_schedule(self) -> None:
        """The schedule's hooks. Each TP rank runs the diffusion head on its share of the patches
        (`models.t2i.megatron.model`), so its head gradients are partial: `finalize` is megatron's
        `finalize_model_grads` followed by their sum over TP (exact after the data-parallel reduce-scatter too, the
        sums being linear, and safe with overlapped DP reduction). With recompute the head's blocks recompute too."""
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from training.activation_checkpointing import recompute_head

        heads = [chunk.vision_head for chunk in self.chunks if chunk.post_process]
        if self.par.recompute == "full":
            for chunk in self.chunks:
                if chunk.post_process:
                    recompute_head(chunk)

        def finalize(model, num_tokens=None, pg_collection=None, **kwargs):
            finalize_model_grads(model, num_tokens, pg_collection=pg_collection, **kwargs)
            group = pg_collection.tp if pg_collection is not None else self.ps.get_tensor_model_parallel_group()
            sum_head_grads_over_tp(heads, group)

        no_sync = [m.no_sync for m in self.ddp]
        overlap = {}
        if self.par.overlap_grad_reduce:  # the schedule launches each chunk's reduce-scatter as its backward ends
            grad_sync = [m.start_grad_sync for m in self.ddp]
            overlap["grad_sync_func"] = grad_sync[0] if len(grad_sync) == 1 else grad_sync
        if self.par.overlap_param_gather:  # and each chunk's all-gather before its forward (interleaved schedule)
            param_sync = [m.start_param_sync for m in self.ddp]
            overlap["param_sync_func"] = param_sync[0] if len(param_sync) == 1 else param_sync
        for chunk in self.chunks:
            for k, v in overlap.items():
                setattr(chunk.config, k, v)
            chunk.config.finalize_model_grads_func = finalize
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
        length = max(self.seq_length, *(fixed_length(b.input_ids.shape[1], self.multiple) for b in micro))
        if length > self.seq_length:  # the same on every rank of the model-parallel group: they read the same data
            warnings.warn(
                f"a packed row is longer than data.token_budget={self.cfg.data.token_budget}: this step runs at "
                f"length {length} instead of {self.seq_length} (one more compiled shape); raise data.token_budget",
                stacklevel=2,
            )
        micro = [pad_to_length(b, length, PAD_ID) for b in micro]
        for m in self.ddp:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()

        def loss_func(out):
            loss = out.loss * float("nan") if poison else out.loss
            return loss, {"loss": loss.detach().clone(), **task.loss_metrics(out)}

        def forward_step(data_iterator, model):
            batch = next(data_iterator).to(self.device)
            with self.clock:
                return model(batch), loss_func

        store = self.forward_backward(
            forward_step_func=forward_step,
            data_iterator=[iter(micro) for _ in self.chunks],
            model=self.ddp,
            num_microbatches=grad_accum,
            seq_length=length,
            micro_batch_size=micro[0].input_ids.shape[0],
            forward_only=False,
        )
        start = time.perf_counter()
        applied, grad_norm, _ = self.optimizer.step()
        optimizer_s = time.perf_counter() - start
        values = self._from_last_stage(store, ["loss", *task.metric_names], grad_accum)
        result = StepResult(bool(applied), True, float(grad_norm) if applied else float("nan"))
        samples, tokens, flops = (sum(c[i] for c in counts) for i in (0, 1, 2))
        loss = values.pop("loss")
        return StepStats(loss, values, samples, tokens, flops, result, optimizer_s, self.clock.take())

    @torch.no_grad()
    def validation_sums(self, batches: list[tuple[tuple, bool]], task) -> torch.Tensor:
        """The held-out batches through the schedule forward only, padded to the training shape ([micro_batch,
        seq_length]: one compiled shape, fixed pipeline messages); the sums come from the last stage."""
        if not batches:
            return torch.zeros(4, dtype=torch.float64)
        rows = max(self.cfg.data.micro_batch, *(inputs[0].input_ids.shape[0] for inputs, _ in batches))
        length = max(self.seq_length, *(fixed_length(i[0].input_ids.shape[1], self.multiple) for i, _ in batches))
        micro = [
            ((pad_to_rows(pad_to_length(inputs[0], length, PAD_ID), rows, PAD_ID), *inputs[1:]), keep)
            for inputs, keep in batches
        ]
        if self.par.virtual_pp is not None and len(micro) % self.par.pp:  # see check_accumulation: fillers, not counted
            micro += [(micro[0][0], False)] * (self.par.pp - len(micro) % self.par.pp)

        def forward_step(data_iterator, model):
            inputs, keep = next(data_iterator)
            inputs = tuple(x.to(self.device) for x in inputs)

            def loss_func(out):
                sums = task.validation_sums(out, inputs) if keep else torch.zeros(4, dtype=torch.float64)
                return out.loss, {"sums": sums}

            return model(*inputs), loss_func

        for m in self.ddp:
            m.eval()
        try:
            store = self.forward_backward(
                forward_step_func=forward_step,
                data_iterator=[iter(micro) for _ in self.chunks],
                model=self.ddp,
                num_microbatches=len(micro),
                seq_length=length,
                micro_batch_size=rows,
                forward_only=True,
            )
        finally:
            for m in self.ddp:
                m.train()
        total = sum((s["sums"] for s in store), torch.zeros(4, dtype=torch.float64))
        if self.par.pp > 1:  # only the last stage holds sums
            dist.all_reduce(total, group=self.ps.get_pipeline_model_parallel_group())
        dist.all_reduce(total, group=self.ps.get_data_parallel_group())
        return total

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

    def new_ema(self, decay: float) -> ShardedEMA:
        """The EMA sharded over data-parallel ranks exactly like the distributed optimizer: each rank averages the
        flat range of every parameter it owns, from the optimizer's fp32 main shard (the fp32 parameter's own range
        when the weights are fp32)."""
        (opt,) = _distributed_optimizers(self.optimizer)
        shards = {}
        for i, chunk in enumerate(self.chunks):
            for name, p in chunk.named_parameters():
                if not p.requires_grad:
                    continue
                if p in opt.model_param_gbuf_map:
                    r = opt._get_model_param_range_map(p)["param"]
                    rows = slice(r.start, r.end)
                else:  # no part of this parameter falls in this rank's shard of the buffer
                    rows = slice(0, 0)
                main = getattr(p, "main_param", None) if getattr(p, "main_param_sharded", False) else None
                src = main if main is not None and rows.stop > rows.start else p.detach().view(-1)[rows]
                shards[f"{i}.{name}"] = (p, rows, src)
        return ShardedEMA(shards, decay, self.ps.get_data_parallel_group())

    GATHER_MAX_PARAMS = 4_000_000_000  # sample grids gather the whole model into global rank 0 up to this size

    @torch.no_grad()
    def ema_model(self, ema: ShardedEMA) -> TextToImageBitDance | None:
        """The whole reference model with the EMA weights on global rank 0, None elsewhere (every rank calls this):
        the EMA shards are gathered over data-parallel ranks, then every chunk's tensor-parallel piece into rank 0, for
        sample grids. Models over `GATHER_MAX_PARAMS` return None with a note, once: their samples and scores come from
        the checkpoint watcher beside the run (`python -m eval.watch`), off the training GPUs."""
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        from models.t2i.megatron.mapping import merge_tp, model_state, reference_model_from_megatron

        with torch.device("meta"):
            size = sum(p.numel() for p in TextToImageBitDance(self.model_cfg).parameters())
        if size > self.GATHER_MAX_PARAMS:
            if dist.get_rank() == 0 and not getattr(self, "_grid_note", False):
                print(
                    f"sample grids skipped in the loop: gathering {size / 1e9:.1f}B parameters into one process does "
                    f"not fit; run `python -m eval.watch --run-dir {self.cfg.run_dir}` beside the run for the samples "
                    "and scores of every checkpoint",
                    flush=True,
                )
                self._grid_note = True
            return None
        self._sync_params()
        full = ema.full()
        mine: dict[str, torch.Tensor] = {}
        if self.dp_rank == 0:
            for i, chunk in enumerate(self.chunks):
                state = model_state(chunk)
                for n, _ in chunk.named_parameters():
                    if f"{i}.{n}" in full:
                        state[n] = full[f"{i}.{n}"].to(state[n].dtype)
                offset = get_transformer_layer_offset(chunk.config, chunk.vp_stage)
                for k, v in state.items():
                    if k.startswith("decoder.layers."):
                        index, rest = k[len("decoder.layers.") :].split(".", 1)
                        k = f"decoder.layers.{int(index) + offset}.{rest}"
                    mine[k] = v.detach().cpu().float()
        pieces = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((self.ps.get_tensor_model_parallel_rank(), mine), pieces, dst=0)
        if dist.get_rank() != 0:
            return None
        by_tp: dict[int, dict] = {}
        for tp_rank, state in pieces:
            by_tp.setdefault(tp_rank, {}).update(state)
        merged = merge_tp([by_tp[r] for r in range(self.par.tp)])
        model = reference_model_from_megatron(merged, self.model_cfg, self.par.transformer_impl)
        return model.to(self.device)

    def _ema_sharded(self, ema: ShardedEMA, model: dict, full: dict[str, torch.Tensor] | None = None) -> dict:
        """The EMA under the model's sharding, keyed `ema.<key>`: whole tensor-parallel-local tensors (gathered over
        data-parallel ranks for a save, only allocated for a load), like megatron's fully reshardable optimizer."""
        out = {}
        for i, chunk in enumerate(self.chunks):
            names = {id(p): f"{i}.{n}" for n, p in chunk.named_parameters() if f"{i}.{n}" in ema.shards}
            part = {}
            for k, sh in model[f"model{i}"].items():
                if id(sh.data) in names:
                    key = names[id(sh.data)]
                    data = full[key] if full is not None else torch.empty(sh.data.shape, dtype=torch.float32)
                    kw = {"dtype": data.dtype} if hasattr(sh, "dtype") else {}
                    part[k] = replace(sh, key="ema." + model_key(sh.key), data=data.to(sh.data.device), **kw)
            out[f"ema{i}"] = part
        return out

    def _optimizer_sharded(self, model: dict, loading: bool) -> dict:
        _materialize_adam_state(self.optimizer)
        return self.optimizer.sharded_state_dict(model, is_loading=loading, metadata=OPTIMIZER_FORMAT)

    def save_state(self, directory: Path, ema) -> tuple[dict, dict]:
        self._sync_params()
        self.wait_saves()  # one background write at a time
        self._pending = self.save(directory / DIST, ema, async_save=self.cfg.checkpoint.async_save)
        section = megatron_section(self.model_cfg, **self.layout(), contents=["model", "ema", "optimizer"])
        return {}, {"megatron": section}

    def load_state(self, directory: Path, ema, trainer: dict, per_rank: dict | None) -> Resume:
        """Any layout loads (dist_checkpointing reshards); RNG and loader state apply when the layout matches, the
        loader state alone when the data-parallel size does; otherwise the data stream is resized."""
        if "megatron" not in trainer:
            raise ValueError(f"{directory} was written by the DeepSpeed engine; resume it with engine.kind=deepspeed")
        section = trainer["megatron"]
        contents = section["contents"]
        self.load(directory / DIST, ema if "ema" in contents else None, optimizer="optimizer" in contents)
        if "ema" not in contents:  # a model-only checkpoint (e.g. imported): the EMA starts at its weights
            ema.reset_to_params()
        if trainer.get("world_size") == dist.get_world_size() and section["layout"] == self.layout() and per_rank:
            return "all"
        same_dp = section["layout"].get("dp") == self.dp_size
        if dist.get_rank() == 0:
            restart = "" if same_dp else "; the data stream is resized to the new data-parallel size"
            was = f"layout {section['layout']} on {trainer.get('world_size')} ranks"
            print(
                f"{directory} was written with {was}, this run has {self.layout()}: weights and optimizer state "
                f"resharded; RNG states start fresh{restart}",
                flush=True,
            )
        return "loader" if same_dp else "resized"

    def save(self, directory: Path, ema, async_save: bool = False):
        """Model, EMA and optimizer state into a dist_checkpointing directory (every rank calls this). With
        `async_save` the files are written in the background (megatron's async save: a snapshot taken now, written
        by a forked process); returns the pending request, which `when_saved` schedules."""
        model = self._model_sharded()
        ema_state = self._ema_sharded(ema, model, ema.full())
        state = {**model, **ema_state, "optimizer": self._optimizer_sharded(model, False)}
        return save_dist(state, directory, async_save=async_save)

    # ---- background checkpoint writes (checkpoint.async_save) ----

    def when_saved(self, finalize) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            finalize()
            return
        pending.finalize_fns.append(finalize)
        self._async_queue().schedule_async_request(pending)

    def _async_queue(self):
        if self._queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()
        return self._queue

    @staticmethod
    def _start_async_writer() -> None:
        """megatron's async writer reports through a multiprocessing manager it starts (a fresh interpreter, seconds)
        at the first async save; start it with the engine so that cost is not paid inside a training step."""
        try:
            from megatron.core.dist_checkpointing.strategies.filesystem_async import _get_write_results_queue
        except ImportError:  # another megatron-core version: the first save starts it
            return
        _get_write_results_queue()

    def poll_saves(self) -> None:
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait_saves(self) -> None:
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)

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
        loaded = dist_checkpointing.load(state, dist_path(directory))
        self._apply_model(loaded)
        if ema is not None:
            ema.load_full(
                {
                    f"{i}.{k.removeprefix('model.')}": v
                    for i in range(len(self.chunks))
                    for k, v in loaded[f"ema{i}"].items()
                }
            )
        if optimizer:
            _load_optimizer(self.optimizer, loaded["optimizer"])

    def layout(self) -> dict:
        p = self.par
        return {"tp": p.tp, "pp": p.pp, "virtual_pp": p.virtual_pp, "dp": self.dp_size}


def sum_head_grads_over_tp(heads: list[nn.Module], group) -> None:
    """Each TP rank ran the diffusion head on its share of the patches: sum the partial head gradients (DDP
    `main_grad`) over the TP group, one in-place all-reduce per tensor (no copy of the gradients)."""
    if group.size() > 1:
        grads = [p.main_grad for head in heads for p in head.parameters() if p.requires_grad]
        for work in [dist.all_reduce(g, group=group, async_op=True) for g in grads]:
            work.wait()


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
