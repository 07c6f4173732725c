"""The sampling settings every generator shares (diffusion-head steps, guidance scale and schedule, batched CFG,
torch.compile) and the per-step guidance weight; the one source of both for `models.core.next_patch` (so both family
samplers), training sample grids, `eval.generate` and the demo."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

CFG_SCHEDULES = ("constant", "linear")


@dataclass
class SamplingConfig:
    steps: int = 50  # Euler-Maruyama steps of the diffusion head per next-patch step
    cfg_scale: float = 7.5  # classifier-free guidance weight w (<= 1: no guidance, no unconditional rows)
    # constant: w at every step; linear: 1 at the first patch (no guidance there: every row samples its own
    # patch) growing linearly towards w, as the official ImageNet samplers do
    cfg_schedule: str = "constant"
    batched_cfg: bool = True  # conditional and unconditional rows in one batched call (same numbers as two calls)
    # torch.compile the head's step loop and the decoder's patch step at fixed shapes (rows padded to a power of two,
    # full-length KV cache; CUDA graphs for the head on CUDA): same noise, same bits up to float rounding
    # (models/core/compiled_sampling.py); the first call of each shape compiles
    compile: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampling steps must be >= 1, got {self.steps}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"unknown cfg_schedule {self.cfg_schedule!r}; choose one of {CFG_SCHEDULES}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0


def cfg_at_step(cfg_scale: float, schedule: str, step: int, num_ar_steps: int) -> float:
    """Guidance weight of next-patch step `step` of `num_ar_steps`: linear grows from 1 at step 0 towards w;
    constant is w; 1 (no guidance) when w <= 1."""
    if cfg_scale <= 1.0:
        return 1.0
    if schedule == "constant":
        return cfg_scale
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * step / num_ar_steps
    raise ValueError(f"unknown cfg_schedule {schedule!r}; choose one of {CFG_SCHEDULES}")


@dataclass(frozen=True)
class Preset:
    """The published sampling settings of one released model (`eval.generate --preset NAME`)."""

    name: str
    family: str  # the model.kind of the family it belongs to
    release: str  # the released checkpoint the settings belong to
    sampling: SamplingConfig
    task_cfg_scale: dict[str, float] = field(default_factory=dict)  # guidance of a benchmark that differs

    def sampling_for(self, benchmark: str, long_prompts: bool = False) -> SamplingConfig:
        key = f"{benchmark}_long" if long_prompts else benchmark
        if key in self.task_cfg_scale:
            return replace(self.sampling, cfg_scale=self.task_cfg_scale[key])
        return self.sampling
