"""`[torchrun ...] -m eval.generate --task NAME --model <folder or ckpt> --out <dir>`: a benchmark's images.

The one image-generation entry point, for benchmarks, free prompts and class-conditional checkpoints.

`--task` is a benchmark of `eval.benchmarks.BENCHMARKS` (geneval, dpg, shapes, prompts, imagenet): it gives the jobs
(prompts or classes), its own flags and its output layout (see its module); the model family it samples
(`models.family.FAMILIES`) gives the generator that loads `--model` once and turns conditions into bits, and the
image tokenizer decodes them here. Jobs are split across ranks; every image's noise comes from its own generator
seeded by (base seed, job index, image index), so an image does not depend on the number of ranks or the batch size.
Sampler settings are a `SamplingConfig`: the published settings of the model (`--preset`, by default the one the
checkpoint is recognised as, see `eval.presets`), each overridden by an explicit flag; on a GPU the models run in
bf16 autocast.

Output folders (`training.output_folder`): `--out` is a new or empty folder, or one eval.generate made (its marker
`.bitdance-output.json`), where re-runs skip the finished jobs (a job is finished when its last file is in place;
files are written atomically, so a half-written one is redone). Any other non-empty folder is refused in one line
unless `--overwrite`: then nothing found there counts as done, every job is generated afresh, its files replace those
of the same names and other files stay; the folder is marked as eval.generate's only once that run is complete, so an
interrupted `--overwrite` run starts afresh again. Job names (a DPG id, a prompt index) must be plain file names
(`safe_file_name`; an unsafe one is refused, not renamed) and every path written must stay inside `--out`, symlinks
followed (`resolve_inside`). Nothing is written before every check has passed: the flags and the prompt file (UTF-8)
when parsing, the folder, the paths and the image size (the model is loaded) before run.json. Errors are one line
(`--debug` or BITDANCE_DEBUG=1: the traceback).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before the process group: the note at training/engines/__init__.py imports)
from tqdm import tqdm

from eval.benchmarks import BENCHMARKS, Benchmark, Job, get_benchmark
from eval.benchmarks.base import check_job_names, output_file
from eval.presets import PRESETS, get_preset
from models.core.head_sampler import randn_rows
from models.core.low_memory import WEIGHT_MODES, apply_inference_memory
from models.core.registry import import_object
from models.core.sampling import CFG_SCHEDULES, SamplingConfig
from models.family import FAMILIES
from models.tokenizer.model import tensor_to_images
from training.cli_errors import add_debug_flag, one_line_errors
from training.output_folder import check_output_folder, claim_output_folder

PROG = "python -m eval.generate"
TOOL = "eval.generate"  # the marker of the folders it made (training.output_folder)
SAMPLING = SamplingConfig()  # --steps, --cfg-scale, --cfg-schedule when no preset applies


def image_seed(base: int, index: int, k: int) -> int:
    digest = hashlib.sha256(f"{base}/{index}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(
        steps=args.steps, cfg_scale=args.cfg_scale, cfg_schedule=args.cfg_schedule, compile=args.compile
    )


def generator_class(family: str) -> type:
    """The sampling adapter of a model family (`ModelFamily.generator`, e.g. models/t2i/generation.py): a class with
    `add_arguments(flags)` (its model flags), `resolve(args)` (checks them, a ValueError when wrong; returns the
    preset name the model is recognised as, or None), `__init__(args, device)` (loads the model once), `.ae` (the
    image tokenizer) and `bits(conditions, sampling, generators)` (±1 latents, image i drawn from generators[i])."""
    path = FAMILIES.get(family).generator
    if path is None:
        raise ValueError(f"model family {family!r} has no generator; a benchmark samples t2i or c2i models")
    return import_object(path)  # type: ignore[return-value]


def add_inference_arguments(p) -> None:
    """How the loaded model is held in memory (`models.core.low_memory`) and whether the sampler is compiled
    (`models.core.compiled_sampling`): eval.generate's and eval.app's flags."""
    helps = "; ".join(f"{name}: {mode.help}" for name, mode in WEIGHT_MODES.items())
    p.add_argument("--weights", choices=list(WEIGHT_MODES), help=f"{helps} (default: as stored)")
    p.add_argument(
        "--offload",
        action="store_true",
        help="keep the decoder layers in host memory, one or two on the GPU at a time: fits small GPUs, slow",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the sampler at fixed shapes (same bits as eager in every case measured; the first batch of "
        "each row bucket and image size compiles, about 10 s per graph on a CPU); CUDA graphs on a GPU",
    )


def load_generator(family: str, args: argparse.Namespace, device: torch.device):
    """The family's generator with `--model` loaded once, held as `--weights` / `--offload` ask (a model that is
    converted or offloaded is loaded on the CPU first, so one larger than the GPU can be)."""
    low = args.weights is not None or args.offload
    generator = generator_class(family)(args, torch.device("cpu") if low else device)
    if low:
        apply_inference_memory(generator.model, args.weights, args.offload, device)
        generator.ae.to(device)
        generator.device = device
    return generator


@torch.no_grad()
def sample_images(generator, pairs: list[tuple[Job, int]], sampling: SamplingConfig, seed: int, device) -> list:
    """uint8 images of (job, image index) pairs: the family's generator makes the bits, the image tokenizer decodes."""
    gens = [torch.Generator(device=device).manual_seed(image_seed(seed, j.index, k)) for j, k in pairs]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        bits = generator.bits([j.condition for j, _ in pairs], sampling, gens)
        ae = generator.ae
        q = bits.to(next(ae.parameters()).dtype)
        noise = randn_rows(tuple(q.shape), device, gens).to(q.dtype) if ae.config.gan_decoder else None
        decoded = ae.decode(q, noise=noise)
    return list(tensor_to_images(decoded.float()).cpu().numpy())


class FlagGroup:
    """An argument group that remembers its flags, to refuse them with a --task they do not go with."""

    def __init__(self, p: argparse.ArgumentParser, tasks: list[str], title: str):
        self.group, self.tasks, self.actions = p.add_argument_group(title), tasks, []

    def add_argument(self, *names, **kwargs) -> argparse.Action:
        action = self.group.add_argument(*names, **kwargs)
        self.actions.append(action)
        return action

    def check(self, p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.task in self.tasks:
            return
        for action in self.actions:
            if getattr(args, action.dest) != action.default:
                tasks = ", ".join(self.tasks[:-1]) + " or " * (len(self.tasks) > 1) + self.tasks[-1]
                p.error(f"{action.option_strings[0]} goes with --task {tasks}")


def resolve_sampling(p: argparse.ArgumentParser, args: argparse.Namespace, bench: Benchmark) -> None:
    """Checks the model flags with the family's generator, sets args.preset (given, or the one the checkpoint is
    recognised as), and fills --steps / --cfg-scale / --cfg-schedule left unset from the preset (else the
    SamplingConfig defaults)."""
    if args.preset is not None and get_preset(args.preset).family != bench.family:
        p.error(
            f"--preset {args.preset} is a {get_preset(args.preset).family} model; --task {args.task} needs "
            f"{bench.family}"
        )
    try:
        recognised = generator_class(bench.family).resolve(args)
    except ValueError as err:
        p.error(str(err))
    if args.preset is None and recognised in PRESETS:
        args.preset = recognised
    base = bench.sampling(get_preset(args.preset), args) if args.preset else SAMPLING
    for flag, value in (("steps", base.steps), ("cfg_scale", base.cfg_scale), ("cfg_schedule", base.cfg_schedule)):
        if getattr(args, flag) is None:
            setattr(args, flag, value)


def add_arguments(p: argparse.ArgumentParser) -> list[FlagGroup]:
    """Every generation flag but --model and --out (`eval.watch` supplies those per checkpoint): --task, the sampler,
    and each model family's and benchmark's own flags in groups that remember their --task."""
    p.add_argument("--task", choices=BENCHMARKS.names(), required=True)
    p.add_argument(
        "--prompts-file", help="prompts task: a text file, one prompt a line; other tasks: override their prompt file"
    )
    p.add_argument("--limit", type=int, help="only the first N prompts / images (smoke runs)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4, help="images per sampler call (does not change the images)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="published sampling settings of a released model (default: the checkpoint's, when recognised)",
    )
    p.add_argument("--steps", type=int, help=f"diffusion-head steps per AR step (no preset: {SAMPLING.steps})")
    p.add_argument("--cfg-scale", type=float, help=f"guidance weight, <= 1: none (no preset: {SAMPLING.cfg_scale})")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, help=f"(no preset: {SAMPLING.cfg_schedule})")
    p.add_argument("--seed", type=int, default=0, help="base seed; image k of prompt i uses image_seed(seed, i, k)")
    add_inference_arguments(p)
    benches = {name: get_benchmark(name) for name in BENCHMARKS}
    groups = []
    for family in dict.fromkeys(b.family for b in benches.values()):
        tasks = [name for name, b in benches.items() if b.family == family]
        groups.append(FlagGroup(p, tasks, f"{family} models (--task {', '.join(tasks)})"))
        generator_class(family).add_arguments(groups[-1])
    for name, bench in benches.items():
        groups.append(FlagGroup(p, [name], f"--task {name}"))
        bench.add_arguments(groups[-1])
    return groups


def load_jobs(bench: Benchmark, args: argparse.Namespace) -> list[Job]:
    """The jobs `generate` makes (`--limit` keeps the first ones), every name a plain file name; a ValueError (one
    line) for an unreadable or malformed prompt file."""
    return check_job_names(bench.load_jobs(args))[: args.limit]


def resolve_arguments(p: argparse.ArgumentParser, args: argparse.Namespace, groups: list[FlagGroup]) -> None:
    """Checks the parsed flags against their --task and the model (`args.model`), fills the sampler settings left
    unset (`resolve_sampling`) and reads the jobs (the prompt file); errors go through `p.error`."""
    for group in groups:
        group.check(p, args)
    bench = get_benchmark(args.task)
    resolve_sampling(p, args, bench)
    try:
        sampling_config(args)
    except ValueError as err:
        p.error(str(err))
    if args.batch_size < 1 or args.images_per_prompt < 1:
        p.error("--batch-size and --images-per-prompt must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1, got {args.limit}")
    bench.check(p, args)
    try:
        load_jobs(bench, args)
    except ValueError as err:
        p.error(str(err))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="official-layout T2I folder, or a class-conditional checkpoint")
    p.add_argument("--out", required=True, help="a new or empty folder, or one it made before (it resumes there)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out it did not make: every job afresh, same-named files replaced (a folder "
        "it made resumes either way)",
    )
    add_debug_flag(p)
    groups = add_arguments(p)
    args = p.parse_args(argv)
    resolve_arguments(p, args, groups)
    return args


def init_ranks() -> tuple[int, int, torch.device]:
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    )
    return rank, world, device


def generate(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> Path:
    """The images of parsed `args` in `args.out`: this rank's unfinished jobs, then (rank 0) the benchmark's finishing
    step; every rank of the process group (if any) calls it. Nothing is written before `--out` is accepted
    (`args.overwrite` for a non-empty folder it did not make; see the module docstring), every output path is checked
    to stay inside it and the model (the image size) is loaded; no rank writes images before rank 0 claimed it."""
    bench = get_benchmark(args.task)
    out = Path(args.out)
    jobs = load_jobs(bench, args)
    own = check_output_folder(out, TOOL, args.overwrite)  # False: taken over with --overwrite, nothing there is done
    finished = {j.index for j in jobs if bench.is_done(j, out)}  # also checks those paths stay inside --out
    pending = [j for j in jobs if not (own and j.index in finished)]
    mine = pending[rank::world]
    generator = load_generator(bench.family, args, device) if mine else None  # checks the image size
    if rank == 0:
        if own:
            claim_output_folder(out, TOOL)
        else:
            print(f"--overwrite: {out} is not eval.generate's; generating all {len(jobs)} prompts afresh", flush=True)
        run = {k: v for k, v in vars(args).items()}
        text = json.dumps({**run, "world_size": world, "prompts": len(jobs)}, indent=2)
        output_file(out, "run.json").write_text(text)
        how = f"preset {args.preset}" if args.preset else "no preset"
        print(f"sampling ({how}): {sampling_config(args)}", flush=True)
        print(f"{len(jobs)} prompts; rank 0 has {len(mine)} left to generate", flush=True)
    if dist.is_initialized():
        dist.barrier()
    if mine:
        sampling = sampling_config(args)
        pairs = [(j, k) for j in mine for k in range(args.images_per_prompt)]
        done: dict[int, list[np.ndarray]] = {}
        bar = tqdm(total=len(mine), desc=f"{args.task} (rank {rank})", disable=rank != 0, unit="prompt")
        for start in range(0, len(pairs), args.batch_size):
            chunk = pairs[start : start + args.batch_size]
            for (job, _), img in zip(chunk, sample_images(generator, chunk, sampling, args.seed, device), strict=True):
                done.setdefault(job.index, []).append(img)
                if len(done[job.index]) == args.images_per_prompt:
                    bench.write_job(job, done.pop(job.index), out)
                    bar.update(1)
        bar.close()
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        bench.finish(jobs, out)
        if not own:
            claim_output_folder(out, TOOL, overwrite=True)  # complete: from now on it resumes like its own
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors(PROG, args.debug):
        rank, world, device = init_ranks()
        generate(args, rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    from eval.generate import main as _main

    _main()
