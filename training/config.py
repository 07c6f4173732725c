"""The one typed config tree of a training run: YAML file + dotted CLI overrides -> validated `TrainConfig`.

    torchrun ... -m training.train --config training/configs/tiny_t2i.yaml optim.lr=3e-4 schedule.total_steps=50
Unknown keys and wrong types are rejected by OmegaConf against these dataclasses; `validate` adds the checks
that need several fields or the named model (one line each, naming the key and the fix): every float finite, ranges,
the model name, the engine's own (with those of the fine-tuning method it trains, `training.finetune`).
`startup_checks` adds, before a run does any work, those that need the machine: the world size (batch and
model-parallel layout) and the named model under the engine's layout; `check_eval_size` checks the sample size against
the model the task built, and `missing_data_folder` names the key of a data folder that is not there when reading the
data fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.loader import LoaderSettings, MixtureSource
from data_pipeline.loader.settings import mixture_checks
from models.core.sampling import SamplingConfig
from models.t2i.megatron.config import ParallelSettings

PRECISIONS = ("auto", "fp32", "bf16", "fp8")


@dataclass
class ModelConfig:
    kind: str = "t2i"  # a model family of models.family.FAMILIES: t2i (text-to-image), c2i (ImageNet), tokenizer
    name: str = "tiny-4x"  # a named config of the family (its `get_config`; P is the -<P>x suffix)
    init_from: str | None = None  # t2i: HF Qwen3 folder or official T2I folder; c2i: official checkpoint
    image_tokenizer: str | None = None  # ae weights, to decode periodic samples (and online encoding)
    text_tokenizer: str | None = None  # HF tokenizer folder, to tokenize the periodic sample prompts
    attention: str = "auto"  # t2i attention backend (models.core.attention.resolve_attention): auto|dense|segments|flex
    activation_checkpointing: bool = False
    # tokenizer
    disc_start: int = 0  # step at which the PatchGAN discriminator joins (0 = never)
    disc_weight: float = 0.1
    lpips_weights: str | None = None  # local LPIPS weights; perceptual loss off without
    entropy_weight: float = 0.1
    commit_weight: float = 0.25


@dataclass
class DataConfig(LoaderSettings):
    """The loader's settings (token_budget, num_workers, shuffle_buffer, caption_dropout, subset, cache_dir, cache_gb,
    prefetch_shards: declared once, in `LoaderSettings`) and the run's data and batch shape."""

    # tokenized shards (t2i, c2i: a local folder or an fsspec URL such as s3://bucket/tokens) or raw webdataset tars
    # (tokenizer); ignored when `sources` is set
    data_dir: str = "data/tokens"
    # t2i, c2i: a weighted mixture instead of data_dir: [{dir: <folder or URL>, weight: w, name: <for the logs>}, ...]
    sources: list[MixtureSource] = field(default_factory=list)
    global_batch: int = 8  # optimizer batch: packed rows (t2i) or samples (c2i, tokenizer) over all ranks
    micro_batch: int = 1  # per rank and forward pass
    image_size: int = 64  # tokenizer: crop size, a multiple of the model's downsample stride
    holdout: int = 16  # tokenizer: held-out images for PSNR/SSIM
    val_dir: str | None = None  # t2i, c2i: tokenized validation set (default: <data_dir>/val, when tokenized)

    def range_checks(self, prefix: str = "") -> list[tuple[bool, str]]:
        return super().range_checks(prefix) + mixture_checks(self.sources, prefix)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    total_steps: int = 100
    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine
    min_lr: float = 0.0


@dataclass
class EngineConfig:
    kind: str = "deepspeed"  # an engine of training.engines.ENGINES: deepspeed | megatron (t2i; the `parallel` section)
    zero_stage: int = 0  # 0-3 (deepspeed)
    # auto (the engine's choice: bf16 on GPU when it can, fp32 on CPU) | fp32 | bf16 | fp8 (deepspeed: torchao float8
    # backbone linears, bf16 elsewhere)
    precision: str = "auto"
    fp8_recipe: str = "tensorwise"  # engine.precision=fp8: tensorwise | rowwise (torchao float8 scaling)
    # deepspeed: none | optimizer (ZeRO 1-3: optimizer state and fp32 master weights in CPU memory) | params (ZeRO-3:
    # the parameters too); DeepSpeed's `offload_optimizer` / `offload_param` with torch's AdamW stepping on the CPU
    offload: str = "none"


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: int = 32  # the adapters' update is scaled by alpha / rank
    dropout: float = 0.0
    # names of the decoder layers' linears that get adapters (only modules inside the decoder layers match)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    head: bool = False  # also every linear of the diffusion head


@dataclass
class FinetuneConfig:
    """What trains (`training.finetune`): the whole model, LoRA adapters (PEFT) or the head only, from model.init_from;
    lora and head checkpoints hold the trainable state and a reference to the base (deepspeed only)."""

    method: str = "full"  # full | lora | head (training.finetune.FINETUNE_METHODS)
    base_dtype: str = "bf16"  # the frozen base weights of lora / head: bf16 | fp32 (trainable weights stay fp32)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class CheckpointConfig:
    every: int = 100  # steps; 0 = only at the end and on SIGTERM
    keep_last: int = 3  # >= 1; the checkpoint `latest` names is never deleted
    resume: str = "auto"  # auto (from <run_dir>/checkpoints/latest, else its newest complete one) | none | a folder
    overwrite: bool = False  # let a run start behind the run folder's checkpoints, deleting them (else refused)
    checksums: bool = True  # sha256 of every file, recorded at save and verified at load (false: sizes only)
    async_save: bool = False  # megatron: write the checkpoint in the background while training goes on
    export_official: bool = True  # also write the EMA weights in the official layout at the end


@dataclass
class LoggingConfig:
    project: str = "bitdance"
    run_name: str = "run"
    every: int = 10
    wandb: str = "auto"  # auto (online with WANDB_API_KEY, else offline) | online | offline | disabled
    peak_tflops: float = 0.0  # per device, for the MFU estimate (0 = not reported)


@dataclass
class EvalConfig:
    """Periodic evaluation: the validation loss of the trained weights (t2i, c2i: `training.validation`), and with the
    EMA weights sample grids (t2i, c2i) and held-out reconstruction (tokenizer)."""

    every: int = 0  # steps between evaluations (0 = only the tokenizer's at the start and the end)
    val_samples: int = 256  # validation samples read (the first ones of the set; 0: all)
    prompts: list[str] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)
    height: int = 64  # t2i sample grids: a size the model supports (its data's tokenized sizes)
    width: int = 64


@dataclass
class ProfileConfig:
    steps: list[int] = field(default_factory=list)  # [first, last]: torch profiler trace of these steps per rank


@dataclass
class MemoryConfig:
    snapshot_step: int = 0  # CUDA allocator snapshot after this step (0: off)


@dataclass
class FaultConfig:
    # a rank that completes no step for this long dumps its stacks to <run_dir>/hangs/ and the job exits (torchrun
    # restarts it and the run resumes); 0: off
    hang_seconds: float = 0.0
    # rank 0 names a rank whose forwards took more than this fraction longer than the median rank's; 0: off
    straggler_fraction: float = 0.2


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    ema_decay: float = 0.9999
    max_consecutive_skips: int = 10
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)  # engine.kind=megatron only
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    fault_nan_at_step: int = -1  # testing: make the loss NaN at this step


def validate(cfg: TrainConfig) -> TrainConfig:
    """Every check that needs several fields, once: the model family and the engine are looked up in their registries
    (an unknown name is a one-line error listing the known ones), every float must be finite, the engine adds its own
    checks (a DeepSpeed run's include those of its `finetune.method`), and `model.name` must name one of the family's
    models, whose downsample stride data.image_size tiles."""
    from models.core.attention import ATTENTION_BACKENDS
    from models.family import FAMILIES
    from training.engines import ENGINES

    family, engine = FAMILIES.get(cfg.model.kind), ENGINES.get(cfg.engine.kind)
    _raise_first(_finite_checks(cfg))  # first: a NaN passes no range check, and its own message is clearer
    background = "|".join(k for k, e in ENGINES.items() if e.supports_async_save)
    steps = cfg.profile.steps
    checks = [
        (
            engine.model_kinds is None or cfg.model.kind in engine.model_kinds,
            f"engine.kind={cfg.engine.kind} trains model.kind={'|'.join(engine.model_kinds or ())} only",
        ),
        (cfg.engine.precision in PRECISIONS, f"engine.precision must be {', '.join(PRECISIONS)}"),
        *engine.check(cfg),  # the engine's own, before the general ones: its messages name its fixes
        *_fp8_checks(cfg, family.fp8_prefixes, engine.precisions),
        (cfg.schedule.decay in ("constant", "cosine"), "schedule.decay must be constant or cosine"),
        (cfg.schedule.total_steps > 0, "schedule.total_steps must be > 0"),
        (0 <= cfg.schedule.warmup_steps <= cfg.schedule.total_steps, "schedule.warmup_steps must be in [0, total]"),
        (cfg.data.micro_batch > 0 and cfg.data.global_batch > 0, "data.micro_batch and data.global_batch must be > 0"),
        (0.0 <= cfg.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
        (cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}"),
        (
            not cfg.checkpoint.async_save or engine.supports_async_save,
            f"checkpoint.async_save needs engine.kind={background} (engine.kind={cfg.engine.kind} writes its "
            "checkpoints synchronously)",
        ),
        *_range_checks(cfg),
        (
            not steps or (len(steps) == 2 and 1 <= steps[0] <= steps[1]),
            f"profile.steps must be [first, last] with 1 <= first <= last, got {steps}",
        ),
        (
            cfg.fault.straggler_fraction >= 0,
            f"fault.straggler_fraction must be >= 0 (0: off), got {cfg.fault.straggler_fraction}",
        ),
        (cfg.eval.val_samples >= 0, f"eval.val_samples must be >= 0 (0: all), got {cfg.eval.val_samples}"),
        (cfg.fault.hang_seconds >= 0, f"fault.hang_seconds must be >= 0 (0: off), got {cfg.fault.hang_seconds}"),
        (cfg.memory.snapshot_step >= 0, f"memory.snapshot_step must be >= 0 (0: off), got {cfg.memory.snapshot_step}"),
        (cfg.logging.wandb in ("auto", "online", "offline", "disabled"), "logging.wandb: auto|online|offline|disabled"),
        (
            cfg.model.attention in ATTENTION_BACKENDS,
            f"model.attention must be one of {', '.join(ATTENTION_BACKENDS)}",
        ),
    ]
    _raise_first(checks)
    stride = getattr(named_model(cfg), "downsample", 1)  # the tokenizer crops data.image_size, then downsamples
    size = cfg.data.image_size
    if size % stride:
        raise ValueError(
            f"data.image_size={size} is not a multiple of the downsample stride {stride} of model.name="
            f"{cfg.model.name}; use e.g. {-(-size // stride) * stride}"
        )
    return cfg


def _raise_first(checks: list[tuple[bool, str]]) -> None:
    """Raise the message of the first failed (ok, one-line message) check as a ValueError."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _finite_checks(node: object, key: str = "") -> list[tuple[bool, str]]:
    """One (ok, message) per float setting under `node` (a config dataclass, a list or a value at dotted `key`): NaN
    and infinities are refused; integers cannot hold them."""
    if is_dataclass(node):
        return [c for f in fields(node) for c in _finite_checks(getattr(node, f.name), f"{key}.{f.name}".lstrip("."))]
    if isinstance(node, list | tuple):
        return [c for i, value in enumerate(node) for c in _finite_checks(value, f"{key}[{i}]")]
    if isinstance(node, float):
        return [(math.isfinite(node), f"{key}={node} is not a finite number; give a finite value")]
    return []


def named_model(cfg: TrainConfig):
    """The model config `model.name` names in its family (the run's model, but for what the data or `model.init_from`
    supply); a one-line error listing the family's names when it names none."""
    from models.family import FAMILIES

    family = FAMILIES.get(cfg.model.kind)
    try:
        return family.get_config(cfg.model.name)
    except ValueError:
        raise ValueError(
            f"model.name={cfg.model.name} is not a model.kind={cfg.model.kind} config; choose one of "
            f"{family.config_names}"
        ) from None


def _fp8_checks(cfg: TrainConfig, prefixes: tuple[str, ...], precisions: tuple[str, ...]) -> list[tuple[bool, str]]:
    """engine.precision=fp8: a recipe of training.fp8, a family with a backbone to convert, an engine that trains it."""
    from models.family import FAMILIES
    from training.fp8 import FP8_RECIPES

    fp8 = cfg.engine.precision == "fp8"
    with_backbone = "|".join(k for k, f in FAMILIES.items() if f.fp8_prefixes)
    return [
        (cfg.engine.fp8_recipe in FP8_RECIPES, f"engine.fp8_recipe must be {' or '.join(FP8_RECIPES)}"),
        (not fp8 or bool(prefixes), f"engine.precision=fp8 converts a backbone: model.kind {with_backbone}"),
        (
            not fp8 or "fp8" in precisions,
            f"engine.precision=fp8 is not trained by engine.kind={cfg.engine.kind}; use engine.precision=bf16",
        ),
    ]


def _range_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """Single-field ranges: (ok, one-line message) per field."""
    o, c = cfg.optim, cfg
    fields = [
        ("seed", c.seed, c.seed >= 0, ">= 0"),
        ("max_consecutive_skips", c.max_consecutive_skips, c.max_consecutive_skips >= 1, ">= 1"),
        ("optim.lr", o.lr, o.lr >= 0, ">= 0"),
        ("optim.eps", o.eps, o.eps > 0, "> 0"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optim.grad_clip", o.grad_clip, o.grad_clip >= 0, ">= 0 (0 turns clipping off)"),
        ("optim.betas", o.betas, len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "two values in [0, 1)"),
        ("schedule.min_lr", c.schedule.min_lr, c.schedule.min_lr >= 0, ">= 0"),
        ("checkpoint.every", c.checkpoint.every, c.checkpoint.every >= 0, ">= 0 (0: only at the end and on SIGTERM)"),
        ("logging.every", c.logging.every, c.logging.every >= 1, ">= 1"),
        ("logging.peak_tflops", c.logging.peak_tflops, c.logging.peak_tflops >= 0, ">= 0"),
        ("eval.every", c.eval.every, c.eval.every >= 0, ">= 0 (0: off)"),
        ("data.image_size", c.data.image_size, c.data.image_size >= 1, ">= 1"),
        ("eval.height", c.eval.height, c.eval.height >= 1, ">= 1"),
        ("eval.width", c.eval.width, c.eval.width >= 1, ">= 1"),
        ("data.holdout", c.data.holdout, c.data.holdout >= 0, ">= 0"),
    ]
    checks = [(ok, f"{name} must be {rule}, got {value}") for name, value, ok, rule in fields]
    return checks + c.data.range_checks("data.")


def data_parallel_size(cfg: TrainConfig, world_size: int) -> int:
    """The data-parallel size of `world_size` processes under the run's engine (megatron: world / (tp * pp))."""
    from training.engines import ENGINES

    return ENGINES.get(cfg.engine.kind).data_parallel_size(cfg, world_size)


def grad_accumulation(cfg: TrainConfig, world_size: int) -> int:
    """global_batch / (micro_batch * data-parallel size), which must divide exactly."""
    from training.engines import ENGINES

    dp = data_parallel_size(cfg, world_size)
    per_step = cfg.data.micro_batch * dp
    if cfg.data.global_batch % per_step:
        raise ValueError(
            f"data.global_batch {cfg.data.global_batch} is not divisible by micro_batch {cfg.data.micro_batch} x "
            f"data-parallel size {dp}; change one of them"
        )
    accum = cfg.data.global_batch // per_step
    ENGINES.get(cfg.engine.kind).check_accumulation(cfg, accum)
    return accum


def startup_checks(cfg: TrainConfig, world_size: int) -> int:
    """The checks a run makes before any work (before its process group, run folder lock and checkpoint reads), one
    line each: the batch divides over `world_size` processes under the engine's layout, and the engine can lay out
    the named model (unless `model.init_from` supplies another). Returns the micro-batches per optimizer step."""
    from training.engines import ENGINES

    if cfg.model.init_from is None:
        ENGINES.get(cfg.engine.kind).check_model(cfg, named_model(cfg))
    return grad_accumulation(cfg, world_size)


def missing_data_folder(cfg: TrainConfig) -> str | None:
    """The one-line error for the first local data folder the config names (data.sources[i].dir, else data.data_dir;
    data.val_dir) that is not there, None when all are (URLs are left to the loader). Asked when reading the data
    fails: a family may read no data folder at all."""
    folders = [(f"data.sources[{i}].dir", s.dir) for i, s in enumerate(cfg.data.sources)]
    if not folders:
        folders.append(("data.data_dir", cfg.data.data_dir))
    if cfg.data.val_dir:
        folders.append(("data.val_dir", cfg.data.val_dir))
    for key, folder in folders:
        if "://" not in str(folder) and not Path(folder).is_dir():
            what = "is not a folder" if Path(folder).exists() else "does not exist"
            return f"{key}={folder} {what}; point it at the dataset's folder (or a URL: s3://bucket/tokens)"
    return None


def check_eval_size(cfg: TrainConfig, model_cfg) -> None:
    """Sample grids (`eval.every` with `eval.prompts`) are drawn at eval.height x eval.width: a size the model the task
    built supports (its config's `grid`, where it has one), refused in one line before the first step."""
    grid = getattr(model_cfg, "grid", None)
    if not (cfg.eval.every and cfg.eval.prompts and grid is not None):
        return
    try:
        grid(cfg.eval.height, cfg.eval.width)
    except ValueError as e:
        raise ValueError(f"eval.height={cfg.eval.height} eval.width={cfg.eval.width}: {e}") from None


def _load_yaml(path: Path):
    """The YAML file as an OmegaConf mapping; a one-line error naming the file and line when it does not parse."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{where}: YAML does not parse ({problem}); fix the file") from None
    if not OmegaConf.is_dict(loaded):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a mapping of config sections")
    return loaded


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML (optional) + `key.sub=value` overrides merged onto the dataclass defaults, then validated."""
    base = OmegaConf.structured(TrainConfig)
    try:
        parts = [base]
        if path is not None:
            parts.append(_load_yaml(Path(path)))
        bad = [o for o in overrides or [] if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key.sub=value, got {bad}")
        parts.append(OmegaConf.from_dotlist(list(overrides or [])))
        merged = OmegaConf.merge(*parts)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ValueError(f"invalid config: {str(e).splitlines()[0]}") from None
    return validate(cfg)


def to_dict(cfg: TrainConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
