"""`torchrun --nproc_per_node N -m training.train --config <yaml> [key=value ...]`: the training loop.

One loop for every model kind and engine (DeepSpeed, or megatron-core with `engine.kind=megatron` and the `parallel`
section): data loader -> one optimizer step through the engine over the step's micro-batches -> LR schedule -> EMA
-> logging, periodic samples and checkpoints. Non-finite steps are skipped and counted
(K in a row stop the run); SIGTERM saves a checkpoint and exits 0; `checkpoint.resume=auto` continues from
`<run_dir>/checkpoints/latest` exactly where it stopped.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import TrainConfig, grad_accumulation, load_config, to_dict
from training.ema import EMA
from training.engines.deepspeed import DeepSpeedEngine, init_distributed
from training.faults import maybe_kill
from training.logger import RunLogger
from training.optim import build_optimizer, lr_at
from training.tasks import build_task


class StopTraining(RuntimeError):
    """The run cannot continue (e.g. too many consecutive non-finite steps)."""


@dataclass
class TrainerState:
    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    extra: dict = field(default_factory=dict)


class Preemption:
    """SIGTERM sets a flag; all ranks agree on it once per step."""

    def __init__(self) -> None:
        self.flag = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.flag = True

    def requested(self) -> bool:
        t = torch.tensor([1.0 if self.flag else 0.0])
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def mean_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def sum_over_ranks(values: list[int]) -> list[int]:
    t = torch.tensor(values, dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


@torch.no_grad()
def with_ema_weights(engine: DeepSpeedEngine, ema: EMA, fn):
    """Run fn(model) with the EMA weights swapped into the (unsharded) model, then restore the trained ones."""
    model = engine.module
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if n in ema.shadow}
    ema.copy_to(model)
    try:
        return fn(model)
    finally:
        params = dict(model.named_parameters())
        for n, v in saved.items():
            params[n].copy_(v)


def build_engine(cfg: TrainConfig, task, world: int):
    """(engine, data-parallel rank, data-parallel size, micro-batches per step) for `engine.kind`."""
    grad_accum = grad_accumulation(cfg, world)
    if cfg.engine.kind == "megatron":
        from training.engines.megatron import MegatronEngine

        reference, task.model = task.model, None  # the engine takes the weights; its chunks replace the model
        engine = MegatronEngine(cfg, task.model_cfg, reference, task.init_checkpoint)
        return engine, engine.dp_rank, engine.dp_size, grad_accum
    if cfg.model.activation_checkpointing:
        from training.activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(task.model)
    engine = DeepSpeedEngine(task.model, build_optimizer(task.model, cfg.optim), cfg, grad_accum)
    return engine, dist.get_rank(), world, grad_accum


def train(cfg: TrainConfig) -> TrainerState:
    rank, world, device = init_distributed(cfg.engine.kind)
    torch.manual_seed(cfg.seed * 1000 + rank)
    task = build_task(cfg, device)
    engine, dp_rank, dp_size, grad_accum = build_engine(cfg, task, world)
    full_model_here = cfg.engine.kind == "deepspeed" and engine.zero_stage < 3  # rank 0 can sample / export
    ema = EMA(engine.module, cfg.ema_decay)
    loader = task.loader(dp_rank, dp_size)
    state = TrainerState()
    resume = (
        None
        if cfg.checkpoint.resume == "none"
        else (latest_checkpoint(cfg.run_dir) if cfg.checkpoint.resume == "auto" else Path(cfg.checkpoint.resume))
    )
    if resume is not None:
        trainer, loader_state, _ = load_checkpoint(resume, engine, ema)
        if loader_state is not None:
            loader.load_state_dict(loader_state)
        state = TrainerState(**{k: trainer[k] for k in TrainerState.__dataclass_fields__ if k in trainer})
        if rank == 0:
            print(f"resumed from {resume} at step {state.step}", flush=True)
    log = RunLogger(cfg, rank, state.step)
    preempt = Preemption()
    flops_per_token = task.flops_per_token()

    def checkpoint() -> None:
        trainer = {**vars(state), "config": to_dict(cfg)}
        save_checkpoint(cfg.run_dir, state.step, engine, ema, loader.state_dict(), trainer, cfg.checkpoint.keep_last)

    batches = iter(loader)
    try:
        while state.step < cfg.schedule.total_steps:
            lr = lr_at(state.step, cfg.optim.lr, cfg.schedule)
            engine.set_lr(lr)
            start = time.perf_counter()
            stats = engine.train_step(batches, task, grad_accum, poison=state.step == cfg.fault_nan_at_step)
            result, metrics = stats.result, stats.metrics
            samples, tokens = sum_over_ranks([stats.samples, stats.tokens])
            if result.applied:
                ema.update(engine.module)
                state.consecutive_skips = 0
            else:
                state.skipped_steps += 1
                state.consecutive_skips += 1
            state.step += 1
            state.samples_seen += samples
            state.tokens_seen += tokens
            seconds = time.perf_counter() - start
            keys = sorted(metrics)
            means = mean_over_ranks([stats.loss, *[metrics[k] for k in keys]])
            values = {
                "loss": means[0],
                **dict(zip(keys, means[1:], strict=True)),
                "lr": lr,
                "grad_norm": result.grad_norm,
                "skipped_steps": state.skipped_steps,
                "tokens_per_s": tokens / seconds,
                "samples_per_s": samples / seconds,
            }
            if cfg.logging.peak_tflops > 0:
                values["mfu"] = flops_per_token * tokens / seconds / (cfg.logging.peak_tflops * 1e12 * world)
            final_step = state.step == cfg.schedule.total_steps
            if state.step % cfg.logging.every == 0 or state.step == 1 or final_step or not result.applied:
                log.log(state.step, values)
            log.advance()
            maybe_kill("step", state.step)
            if state.consecutive_skips >= cfg.max_consecutive_skips:
                raise StopTraining(
                    f"stopping: {state.consecutive_skips} consecutive steps had non-finite loss or gradients "
                    f"(last at step {state.step}); lower optim.lr or check the data, then resume from the last "
                    "checkpoint"
                )
            if cfg.eval.sample_every and state.step % cfg.eval.sample_every == 0 and full_model_here:
                if rank == 0:
                    grid = with_ema_weights(engine, ema, task.sample_grid)
                    if grid is not None:
                        log.image(state.step, "samples", grid)
                if dist.is_initialized():
                    dist.barrier()
            if preempt.requested():
                checkpoint()
                if rank == 0:
                    print(f"SIGTERM: checkpoint written at step {state.step}; exiting", flush=True)
                return state
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                checkpoint()
        last = latest_checkpoint(cfg.run_dir)
        if last is None or last.name != f"step_{state.step:08d}":
            checkpoint()
        if cfg.checkpoint.export_official and not full_model_here and rank == 0:
            how = (
                "`python -m training.checkpoint export --src <checkpoint> --dst <folder> --text-tokenizer ... "
                "--image-tokenizer ...`"
                if cfg.engine.kind == "megatron"
                else "the resharding tools (ZeRO-3)"
            )
            print(f"the EMA is sharded over ranks; export it from the last checkpoint with {how}", flush=True)
        elif cfg.checkpoint.export_official and rank == 0:
            exported = with_ema_weights(engine, ema, lambda m: task.export(m, Path(cfg.run_dir) / "export"))
            if exported is not None:
                print(f"exported EMA weights to {exported}", flush=True)
        return state
    finally:
        log.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config (see training/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 schedule.total_steps=100")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    try:
        train(cfg)
    except StopTraining as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from training.train import main as _main

    _main()
