"""`torchrun --nproc_per_node N -m training.train --config <yaml> [key=value ...]`: the training loop.

One loop for every model family and engine (`models.family.FAMILIES`, `training.engines.ENGINES`: DeepSpeed, or
megatron-core with the `parallel` section): data loader -> one optimizer step through the engine over the step's
micro-batches -> LR schedule -> EMA -> logging (with where the step's time went and the peak memory per rank; a
profiler trace of `profile.steps`; a named straggler), the held-out validation loss (`training.validation`), periodic
samples and checkpoints. Non-finite steps are skipped and counted (K in a row stop the run); SIGTERM saves a checkpoint
and exits 0; `checkpoint.resume=auto` continues from `<run_dir>/checkpoints/latest` exactly where it stopped.
Settings the run cannot use are refused before any work (`training.config.startup_checks`), and an `OSError` or
`ValueError` that ends the run is one line, `python -m training.train: error: ...`, exit status 2 (the traceback with
`--debug` or BITDANCE_DEBUG=1; `training.cli_errors`); too many non-finite steps in a row exit with status 3.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.loader import LoaderError
from training.checkpoint import latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from training.checkpoint_integrity import verify_checkpoint
from training.cli_errors import add_debug_flag, one_line_errors
from training.config import (
    TrainConfig,
    check_eval_size,
    grad_accumulation,
    load_config,
    missing_data_folder,
    startup_checks,
    to_dict,
)
from training.ema import EMA
from training.engines import (
    Engine,
    StepStats,
    build_engine,
    engine_class,
    init_distributed,
    shutdown_distributed,
)
from training.faults import maybe_hang, maybe_kill, maybe_kill_rank, maybe_sigterm
from training.finetune import build_method
from training.flops import mfu
from training.hang_watch import HangWatchdog
from training.logger import RunLogger
from training.optim import lr_at
from training.run_guard import RunDirError, RunLock, exit_with_parent, launched_by_torchrun
from training.step_monitor import MemorySnapshot, ProfileWindow, TimedBatches, peak_memory_gib, straggler
from training.tasks import Task, build_task
from training.validation import held_out

NO_VALIDATION = "validation: none (set data.val_dir, or tokenize with --val-fraction to write <data_dir>/val)"


class StopTraining(RuntimeError):
    """The run cannot continue (e.g. too many consecutive non-finite steps)."""


@dataclass
class TrainerState:
    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0


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


def step_costs(stats: StepStats, seconds: float, data_s: float, since_log: dict, device) -> tuple[dict, list[float]]:
    """Where the step's time went and the peak memory, over the ranks: the slowest rank's seconds waiting for data, in
    forward+backward, in the optimizer and (since the last logged step) writing checkpoints; the peak memory of the
    fullest rank (and which rank that is) and of the emptiest. Also every rank's seconds computing forwards (for
    `straggler`). Every rank calls this at every step (one all_gather of a few numbers)."""
    since_log["peak_gib"] = max(since_log["peak_gib"], peak_memory_gib(device))
    optimizer_s = stats.optimizer_s
    mine = [data_s, seconds - data_s - optimizer_s, optimizer_s, since_log["checkpoint_s"], since_log["peak_gib"]]
    t = torch.tensor([*mine, stats.forward_s], dtype=torch.float64)
    if dist.is_initialized():
        rows = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, t)
        t = torch.stack(rows)
    t = t.reshape(-1, len(mine) + 1)
    slowest, peak = t.max(dim=0).values.tolist(), t[:, 4]
    costs = {
        "time/data_s": slowest[0],
        "time/forward_backward_s": slowest[1],
        "time/optimizer_s": slowest[2],
        "time/checkpoint_s": slowest[3],
        "memory/peak_gib": slowest[4],
        "memory/peak_rank": int(peak.argmax()),
        "memory/peak_gib_min": float(peak.min()),
    }
    return costs, t[:, 5].tolist()


def sum_over_ranks(values: list[int]) -> list[int]:
    t = torch.tensor(values, dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


@torch.no_grad()
def with_ema_weights(engine: Engine, ema: EMA, fn):
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


def lock_run_dir(run_dir: str, rank: int) -> RunLock | None:
    """Rank 0 takes the run folder's lock; every rank raises the same one-line error when it is taken."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir)
        except RunDirError as e:
            error = str(e)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RunDirError(error)
    return lock


@contextmanager
def reading_data(cfg: TrainConfig):
    """An error while the task reads its data is the one line naming the data folder's key when a local data folder
    the config names is not there."""
    try:
        yield
    except (OSError, ValueError) as err:
        message = missing_data_folder(cfg)
        if message is None:
            raise
        raise ValueError(message) from err


def launch_world_size() -> int:
    """The number of processes of this run, before its process group exists: torchrun's WORLD_SIZE, else one."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def train(cfg: TrainConfig) -> TrainerState:
    """The run, with the run folder locked by rank 0 for its whole life (training.run_guard)."""
    startup_checks(cfg, launch_world_size())  # before any work: batch and model layout over the ranks
    if launched_by_torchrun():
        exit_with_parent()  # a SIGKILLed torchrun takes its workers with it
    rank, world, device = init_distributed(engine_class(cfg))
    lock = lock_run_dir(cfg.run_dir, rank)
    try:
        resume = resolve_resume(cfg.run_dir, cfg.checkpoint.resume, cfg.checkpoint.overwrite, rank)
        if resume is not None:  # before any model is built: a damaged checkpoint fails fast
            verify_checkpoint(resume, cfg.checkpoint.checksums)
        if dist.is_initialized():
            dist.barrier()  # rank 0 may have deleted an earlier run's checkpoints (checkpoint.overwrite)
        return _train(cfg, rank, world, device, resume)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device, resume: Path | None) -> TrainerState:
    torch.manual_seed(cfg.seed * 1000 + rank)
    with reading_data(cfg):  # t2i, c2i: the model's shape comes from the data's manifest
        task = build_task(cfg, device)
    check_eval_size(cfg, task.model_cfg)  # the sizes the model supports come with its data
    grad_accum = grad_accumulation(cfg, world)
    engine = build_engine(cfg, task, grad_accum)
    ema = engine.new_ema(cfg.ema_decay)
    with reading_data(cfg):
        loader = task.loader(engine.dp_rank, engine.dp_size)
    state = TrainerState()
    if resume is not None:
        trainer, loader_state, all_loader_states = load_checkpoint(Path(resume), engine, ema, verify=False)
        if loader_state is not None:
            loader.load_state_dict(loader_state, all_loader_states)
        state = TrainerState(**{k: trainer[k] for k in TrainerState.__dataclass_fields__ if k in trainer})
        if rank == 0:
            print(f"resumed from {resume} at step {state.step}", flush=True)
    log = RunLogger(cfg, rank, state.step)
    preempt = Preemption()
    cuda = device.type == "cuda"
    window = ProfileWindow(cfg.profile.steps, cfg.run_dir, rank, cuda)
    snapshot = MemorySnapshot(cfg.memory.snapshot_step, cfg.run_dir, rank, cuda)
    since_log = {"checkpoint_s": 0.0, "peak_gib": 0.0}  # this rank's, since the last logged step
    named_straggler = None  # the slow rank named at the last step, if any
    validation = held_out(cfg, task, engine.dp_rank, engine.dp_size)
    if rank == 0 and cfg.eval.every and task.validation_kind is not None:
        print(validation.describe() if validation else NO_VALIDATION, flush=True)

    def validate() -> dict[str, float]:
        start = time.perf_counter()
        values = validation.loss(engine, device)
        return {**values, "time/validation_s": time.perf_counter() - start}

    store = dist.distributed_c10d._get_default_store() if dist.is_initialized() and world > 1 else None
    watchdog = HangWatchdog(cfg.fault.hang_seconds, cfg.run_dir, rank, world, store)

    def checkpoint() -> None:
        start = time.perf_counter()
        trainer = {**vars(state), "config": to_dict(cfg)}
        keep, checksums = cfg.checkpoint.keep_last, cfg.checkpoint.checksums
        save_checkpoint(cfg.run_dir, state.step, engine, ema, loader.state_dict(), trainer, keep, checksums)
        since_log["checkpoint_s"] += time.perf_counter() - start

    def evaluate(step: int, grid: bool) -> dict[str, float]:
        """EMA-weight metrics and sample grid on rank 0, where the loop logs ({} elsewhere): the EMA swapped into the
        model when rank 0 holds all of it, else a whole model the engine assembles (every rank takes part)."""
        metrics: dict = {}
        if engine.full_model_on_rank0:
            if rank == 0:
                metrics = with_ema_weights(engine, ema, lambda m: evaluate_model(task, m, grid))
        else:
            model = engine.ema_model(ema)
            if model is not None:
                metrics = evaluate_model(task, model, grid)
        image = metrics.pop("grid", None)
        if image is not None:
            log.image(step, "samples", image)
        if dist.is_initialized():
            dist.barrier()
        return metrics

    if task.evaluates_at_ends and state.step == 0:
        log.log(0, evaluate(0, grid=False))
    if validation is not None and state.step == 0:  # where the curve starts (e.g. a released model's loss)
        log.log(0, validate())
    batches = TimedBatches(iter(loader))
    try:
        while state.step < cfg.schedule.total_steps:
            lr = lr_at(state.step, cfg.optim.lr, cfg.schedule)
            engine.set_lr(lr)
            task.current_step = state.step
            maybe_hang(state.step + 1)
            watchdog.enter(state.step + 1)
            window.before(state.step + 1)
            start = time.perf_counter()
            stats = engine.train_step(batches, task, grad_accum, poison=state.step == cfg.fault_nan_at_step)
            result, metrics = stats.result, stats.metrics
            # a mixture's counts per source, data/<source>/samples and /tokens (other loaders have none)
            sources = {k: v for k, v in getattr(loader, "stats", dict)().items() if k.startswith("data/")}
            samples, tokens, *source_totals = sum_over_ranks([stats.samples, stats.tokens, *sources.values()])
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
            means = mean_over_ranks([stats.loss, stats.flops, *[metrics[k] for k in keys]])
            values = {
                "loss": means[0],
                **dict(zip(keys, means[2:], strict=True)),
                "lr": lr,
                "grad_norm": result.grad_norm,
                "skipped_steps": state.skipped_steps,
                "time/step_s": seconds,
                "tokens_per_s": tokens / seconds,
                "samples_per_s": samples / seconds,
                # over the data-parallel replicas (every rank of a model-parallel group reads the same data)
                **{k: v // (world // engine.dp_size) for k, v in zip(sources, source_totals, strict=True)},
            }
            costs, forward_s = step_costs(stats, seconds, batches.take(), since_log, device)
            values |= costs
            slow = straggler(forward_s, cfg.fault.straggler_fraction) if cfg.fault.straggler_fraction else None
            if slow is not None:
                values |= {"time/straggler_rank": slow[0], "time/straggler_forward_s": slow[1]}
                if rank == 0 and slow[0] != named_straggler:  # once per slow rank in a row
                    print(
                        f"straggler at step {state.step}: rank {slow[0]} computed its forwards in {slow[1]:.3f} s, "
                        f"{slow[1] / max(slow[2], 1e-9):.1f}x the median {slow[2]:.3f} s of {len(forward_s)} ranks",
                        flush=True,
                    )
            named_straggler = slow[0] if slow is not None else None
            if cfg.logging.peak_tflops > 0 and means[1] > 0:
                values["mfu"] = mfu(means[1] * world, seconds, cfg.logging.peak_tflops, world)
            final_step = state.step == cfg.schedule.total_steps
            if validation is not None and (state.step % cfg.eval.every == 0 or final_step):
                values |= validate()
            if (cfg.eval.every and state.step % cfg.eval.every == 0) or (final_step and task.evaluates_at_ends):
                values |= evaluate(state.step, grid=bool(cfg.eval.every) and state.step % cfg.eval.every == 0)
            if state.step % cfg.logging.every == 0 or state.step == 1 or final_step or not result.applied:
                log.log(state.step, values)
                since_log.update(checkpoint_s=0.0, peak_gib=0.0)
            log.advance()
            watchdog.completed()
            window.after(state.step)
            snapshot.after(state.step)
            engine.poll_saves()  # finish a background checkpoint write that is done
            maybe_kill("step", state.step)
            maybe_kill_rank(state.step, resumed=resume is not None)
            maybe_sigterm(state.step)
            if state.consecutive_skips >= cfg.max_consecutive_skips:
                raise StopTraining(
                    f"stopping: {state.consecutive_skips} consecutive steps had non-finite loss or gradients "
                    f"(last at step {state.step}); lower optim.lr or check the data, then resume from the last "
                    "checkpoint"
                )
            if preempt.requested():  # the same answer on every rank
                checkpoint()
                engine.wait_saves()
                if rank == 0:
                    print(f"SIGTERM: checkpoint written at step {state.step}; exiting", flush=True)
                return state
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                checkpoint()
        watchdog.close()  # the final checkpoint and export may take longer than a step
        engine.wait_saves()
        last = latest_checkpoint(cfg.run_dir, quiet=True)
        if last is None or last.name != f"step_{state.step:08d}":
            checkpoint()
            engine.wait_saves()
        if cfg.checkpoint.export_official and rank == 0:
            out, method = Path(cfg.run_dir) / "export", build_method(cfg)  # lora: the adapters, in PEFT's format
            if engine.full_model_on_rank0:
                exported = with_ema_weights(engine, ema, lambda m: method.export(task, m, out))
                if exported is not None:
                    print(f"exported EMA weights to {exported}", flush=True)
            elif (exported := method.export_checkpoint(latest_checkpoint(cfg.run_dir, quiet=True), out)) is not None:
                print(f"exported EMA weights to {exported}", flush=True)  # lora: read back from the checkpoint
            else:
                how = engine.export_how
                print(f"the EMA is sharded over ranks; export it from the last checkpoint with {how}", flush=True)
        if dist.is_initialized():
            dist.barrier()  # every rank leaves together, after rank 0's export
        return state
    finally:
        watchdog.close()
        log.close()


def evaluate_model(task: Task, model, grid: bool) -> dict:
    """The task's metrics of `model` and, when `grid`, its sample grid under the key "grid"."""
    out = dict(task.evaluate(model))
    if grid:
        image = task.sample_grid(model)
        if image is not None:
            out["grid"] = image
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config (see training/configs/)")
    add_debug_flag(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 schedule.total_steps=100")
    args = p.parse_args(argv)
    with one_line_errors(p.prog, args.debug):  # config, run folder, checkpoint, data and disk errors: one line
        try:
            train(load_config(args.config, args.overrides))
        except LoaderError as e:  # from a DataLoader worker the message is the last line of the wrapped traceback
            raise LoaderError(str(e).strip().splitlines()[-1].removeprefix(type(e).__name__ + ": ")) from e
        except StopTraining as e:
            print(str(e), file=sys.stderr, flush=True)
            sys.exit(3)
        finally:
            shutdown_distributed()


if __name__ == "__main__":
    from training.train import main as _main

    _main()
