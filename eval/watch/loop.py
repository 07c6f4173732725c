"""The watch loop: rank 0 finds the next checkpoint to evaluate, claims it, exports it in a child process and hands the
folder to every rank; every rank generates its share (`eval.generate.generate`); rank 0 scores, records and cleans up
(eval/watch/__init__.py says how and why)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from eval.benchmarks import get_benchmark
from eval.generate import FlagGroup, generate, init_ranks, resolve_arguments
from eval.watch.record import MetricsLog, WandbLog, save_grid, scores_row
from training.checkpoint import complete_checkpoints
from training.checkpoint_readers import Registration, step_of
from training.run_guard import LOCK_FILE, RunDirError, RunLock, exit_with_parent, launched_by_torchrun


@dataclass
class Job:
    """One checkpoint to evaluate, as every rank gets it."""

    step: int
    checkpoint: str  # its folder name
    folder: Path  # its scratch folder: model/ (the export) and samples/ (eval.generate's output)
    generation: argparse.Namespace  # eval.generate's arguments, resolved for the exported folder
    started: float


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def failed_steps(path: Path) -> set[int]:
    """The steps listed in `failed.jsonl` (a line torn by a crash is skipped)."""
    steps = set()
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.add(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return steps


TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def outside_torchrun() -> None:
    """The export child's start: it dies with this process, and forgets the torchrun job it was spawned from (with
    TORCHELASTIC_USE_AGENT_STORE inherited, its own one-process group would wait for torchrun's agent store)."""
    exit_with_parent()
    for name in [*TORCHRUN_ENV, *(k for k in os.environ if k.startswith("TORCHELASTIC_"))]:
        os.environ.pop(name, None)


def export_in_child(checkpoint: Path, dst: Path, text_tokenizer: Path, image_tokenizer: Path) -> Path:
    """The engine's export in a fresh process: it may start its own process group (megatron's tools do), its memory
    goes back when it ends, and it dies with this process."""
    from training.engines.export import export_checkpoint

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=outside_torchrun) as pool:
        return pool.submit(export_checkpoint, checkpoint, dst, text_tokenizer, image_tokenizer).result()


def remove_scratch(folder: Path) -> None:
    """Delete a checkpoint's scratch folder at once as far as any watcher can see (renamed aside, then removed): a
    watcher killed midway leaves no half-deleted `step_*` (one without its model is taken for neither done nor
    exported, and would stay), only a `.removing-*` that the next one sweeps."""
    aside = folder.with_name(f".removing-{folder.name}-{os.getpid()}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


class Coordinator:
    """Rank 0's side: the run's checkpoints, which are done (metrics.jsonl), failed or lost, the claims, the exports,
    scoring and recording. Every skip and failure is printed and counted."""

    def __init__(self, p: argparse.ArgumentParser, args: argparse.Namespace, groups: list[FlagGroup], r: Registration):
        self.p, self.args, self.groups, self.registration = p, args, groups, r
        self.run_dir = Path(args.run_dir)
        self.bench = get_benchmark(args.task)
        self.state = self.run_dir / "watch" / args.task
        self.state.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.run_dir)
        self.metrics.refresh()
        for leftover in self.state.glob(".removing-*"):  # of a watcher killed while deleting a scratch folder
            shutil.rmtree(leftover, ignore_errors=True)
        for folder in self.state.glob("step_*"):  # a recorded step's scratch, whatever state a killed watcher left
            if self.metrics.is_done(args.task, step_of(folder.name)):
                remove_scratch(folder)
        self.failed_log = self.state / "failed.jsonl"
        self.failed = failed_steps(self.failed_log)
        self.until: int | None = args.until_step
        self.settled: set[int] = set()  # done, failed or lost: nothing more to do
        self.seen: set[int] = set()
        self.counts: Counter = Counter()
        self.tokenizers: tuple[Path, Path] | None = None
        self.wandb: WandbLog | None = None
        self.bar: tqdm | None = None  # from the first checkpoint on (a bad run config fails in one line before)

    def say(self, line: str) -> None:
        tqdm.write(line)

    # ---- finding work ------------------------------------------------------------------------------------------------

    def next_job(self) -> Job | None:
        """The next checkpoint to evaluate, waiting `--interval` seconds between looks; None when done."""
        while True:
            self.metrics.refresh()
            present = {step_of(c.name): c for c in complete_checkpoints(self.run_dir)}
            if not present:  # none yet (the trainer never deletes the one `latest` names)
                if self._finished(None):
                    return None
                time.sleep(self.args.interval)
                continue
            if self.tokenizers is None:
                self._first_checkpoint(self._config(present[max(present)]))
            exported = {step_of(d.name): d for d in self.state.glob("step_*") if (d / "model").is_dir()}
            self._set_until(present)
            self._note_lost(present, exported)
            for step in sorted(set(present) | set(exported)):
                if self.until is not None and step > self.until:
                    break
                if step in self.settled or self._skip(step):
                    continue
                job = self._prepare(step, present.get(step), exported.get(step, self.state / f"step_{step:08d}"))
                if job is not None:
                    return job
            if self._finished(max(present)):
                return None
            time.sleep(self.args.interval)

    def _set_until(self, present: dict[int, Path]) -> None:
        """--until-step, else (--once) the newest checkpoint at the first look, else the run's schedule.total_steps."""
        if self.args.until_step is not None or (self.args.once and self.until is not None):
            return
        until = max(present) if self.args.once else int(self._config(present[max(present)])["schedule"]["total_steps"])
        if until != self.until:
            self.until = until
            self.registration.update(until_step=until)

    def _note_lost(self, present: dict[int, Path], exported: dict[int, Path]) -> None:
        self.seen |= set(present)
        for step in sorted(self.seen - set(present) - set(exported) - self.settled):
            if not self.metrics.is_done(self.args.task, step):
                self._settle(step, "lost", f"step {step}: deleted before it was evaluated")

    def _skip(self, step: int) -> bool:
        if self.metrics.is_done(self.args.task, step):
            self._settle(step, "already done", f"step {step}: already evaluated (its row is in metrics.jsonl)")
        elif step in self.failed:
            self._settle(step, "failed before", f"step {step}: failed in an earlier attempt ({self.failed_log})")
        else:
            return False
        remove_scratch(self.state / f"step_{step:08d}")  # a crash between record and clean-up
        return True

    def _settle(self, step: int, what: str, line: str) -> None:
        self.settled.add(step)
        self.counts[what] += 1
        self.say(f"{line} [{what}: {self.counts[what]}]")
        self.registration.done_through(step)
        if self.bar is None:
            self.bar = tqdm(desc=f"watch {self.args.task}", unit="ckpt", dynamic_ncols=True)
        self.bar.set_postfix(self.counts)
        if what == "evaluated":
            self.bar.update(1)

    def _finished(self, newest: int | None) -> bool:
        """Nothing left to do, every checkpoint up to the last step being settled (`next_job` asks no earlier)."""
        if self.until is None:
            return self.args.once  # --once on a run without checkpoints
        return any(step >= self.until for step in self.settled) or (newest is not None and newest > self.until)

    # ---- one checkpoint ----------------------------------------------------------------------------------------------

    def _config(self, checkpoint: Path) -> dict:
        return json.loads((checkpoint / "trainer.json").read_text())["config"]

    def _first_checkpoint(self, config: dict) -> None:
        """Checks against the run's config, once: the model family, the tokenizers (flags, else the config)."""
        family = config["model"]["kind"]
        if family != self.bench.family:
            self.p.error(f"--task {self.args.task} samples {self.bench.family} models; this run trains {family} models")
        given = {"text": self.args.text_tokenizer, "image": self.args.image_tokenizer}
        paths = {k: v or config["model"].get(f"{k}_tokenizer") for k, v in given.items()}
        for kind, path in paths.items():
            if not path:
                self.p.error(f"the run's config has no model.{kind}_tokenizer; pass --{kind}-tokenizer")
            if not Path(path).exists():
                self.p.error(f"{kind} tokenizer {path} does not exist; pass --{kind}-tokenizer")
        self.tokenizers = (Path(paths["text"]), Path(paths["image"]))
        self.wandb = WandbLog(self.run_dir, config.get("logging", {}), self.state / "wandb")
        if self.wandb.off:
            self.say(f"wandb: {self.wandb.off}; scores go to metrics.jsonl only")

    def _prepare(self, step: int, checkpoint: Path | None, folder: Path) -> Job | None:
        """The job of a checkpoint: exported first unless an earlier attempt did; None (counted) when it cannot be."""
        started = time.time()
        model = folder / "model"
        if not model.is_dir():
            if not self.registration.claim(checkpoint):
                self._settle(step, "lost", f"step {step}: deleted before it could be read")
                return None
            try:
                self._export(checkpoint, folder)
            except Exception as err:  # noqa: BLE001 (any export failure: recorded, the next checkpoint goes on)
                self._fail(step, f"export failed: {first_line(err)}")
                return None
        self.registration.done_through(step)  # exported: the checkpoint itself is not needed any more
        generation = argparse.Namespace(**vars(self.args))
        generation.model, generation.out = str(model), str(folder / "samples")
        generation.overwrite = True  # its own scratch folder: samples it did not mark (an older watcher's) are redone
        resolve_arguments(self.p, generation, self.groups)
        return Job(step, f"step_{step:08d}", folder, generation, started)

    def _export(self, checkpoint: Path, folder: Path) -> None:
        for leftover in folder.glob("model.tmp-*"):  # of an attempt that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"model.tmp-{os.getpid()}"
        try:
            export_in_child(checkpoint, tmp, *self.tokenizers)
        except FileNotFoundError:  # moved aside for an instant by a deletion our claim stopped: once more
            if not (checkpoint / "trainer.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            export_in_child(checkpoint, tmp, *self.tokenizers)
        os.rename(tmp, folder / "model")

    def _fail(self, step: int, why: str) -> None:
        with self.failed_log.open("a") as f:
            f.write(json.dumps({"step": step, "why": why}) + "\n")
        self.failed.add(step)
        remove_scratch(self.state / f"step_{step:08d}")
        self._settle(step, "failed", f"step {step}: {why}")

    def finish(self, job: Job) -> None:
        """Score, grid, wandb, then the metrics.jsonl row (the record that it is done), then the scratch goes."""
        samples = Path(job.generation.out)
        try:
            result = self.bench.score(samples, self.args)
            grid = save_grid(self.bench, samples, self.run_dir / "samples" / f"watch_{job.step:08d}.png")
        except Exception as err:  # noqa: BLE001 (recorded; the next checkpoint goes on)
            self._fail(job.step, f"scoring failed: {first_line(err)}")
            return
        extra = {"grid": str(grid.relative_to(self.run_dir)), "seconds": round(time.time() - job.started, 1)}
        row = scores_row(self.args.task, job.step, job.checkpoint, result, self.bench.score_key, extra)
        said = self.wandb.log(job.step, row, grid)
        self.metrics.append(row)
        remove_scratch(job.folder)
        score = row["watch/score"]
        self._settle(job.step, "evaluated", f"step {job.step}: {self.args.task} score {score:.4g}; {grid}; {said}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        summary = ", ".join(f"{n} {what}" for what, n in sorted(self.counts.items())) or "nothing to do"
        print(f"watch {self.args.task}: {summary}", flush=True)


def start_ranks() -> tuple[int, int, torch.device, object]:
    """(rank, world size, device, the gloo group that carries the jobs) under torchrun; one process without it. The
    job group waits as long as an export or a checkpoint interval takes (a day, not the default minutes)."""
    if "RANK" not in os.environ:
        return 0, 1, init_ranks()[2], None
    if launched_by_torchrun():
        exit_with_parent()  # a killed torchrun takes its workers with it
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    rank, world, device = init_ranks()
    return rank, world, device, dist.new_group(backend="gloo", timeout=timedelta(days=1))


def broadcast(job: Job | None, group) -> Job | None:
    if group is None:
        return job
    box = [job]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def watcher_lock(p: argparse.ArgumentParser, args: argparse.Namespace) -> RunLock:
    """One watcher per run and task: the lock on `<run_dir>/watch/<task>/.lock` (training.run_guard: dropped by the
    kernel however the holder dies, so a killed watcher's successor starts at once)."""
    folder = Path(args.run_dir) / "watch" / args.task
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return RunLock(folder)
    except RunDirError:
        holder = (folder / LOCK_FILE).read_text().strip() or "unknown"
        p.error(f"another `eval.watch --task {args.task}` watches {args.run_dir} (pid {holder}); stop it first")


def watch(p: argparse.ArgumentParser, args: argparse.Namespace, groups: list[FlagGroup]) -> None:
    """Every rank runs this: rank 0 decides, every rank generates, until rank 0 says stop."""
    rank, world, device, group = start_ranks()
    try:
        if rank != 0:
            while (job := broadcast(None, group)) is not None:
                generate(job.generation, rank, world, device)
            return
        lock = watcher_lock(p, args)
        try:
            with Registration(args.run_dir, args.task, args.stale_after, args.until_step) as registration:
                coordinator = Coordinator(p, args, groups, registration)
                try:
                    while (job := broadcast(coordinator.next_job(), group)) is not None:
                        generate(job.generation, rank, world, device)
                        coordinator.finish(job)
                finally:
                    coordinator.close()
        finally:
            lock.release()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
