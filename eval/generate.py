"""`[torchrun ...] -m eval.generate --task geneval|dpg|shapes|prompts|imagenet --model <folder or ckpt> --out <dir>`:
the one image-generation entry point, for benchmarks, free prompts and class-conditional checkpoints.

Layouts (those the official scorers read): GenEval, shapes and free prompts (`--prompt` / `--prompts-file`)
`<out>/<idx:05d>/metadata.jsonl` + `samples/<k:04d>.png`; DPG-Bench one 2x2 grid `<out>/<id>.png`; ImageNet
(every class, or `--classes`, `--per-class` images each) PNGs `<out>/images/<index:06d>.png`, index =
class * per_class + j, then one ADM `<out>/samples.npz` written in chunks. Prompts are split across ranks; every
image's noise comes from its own generator seeded by (base seed, prompt index, image index), so an image does not
depend on the number of ranks or the batch size. Finished prompts are skipped on re-runs (a prompt is finished
when its last file is in place; files are written atomically), so a half-written prompt is redone. Sampler
settings are a `SamplingConfig`: the published settings of the model (`--preset`, by default the one the
checkpoint is recognised as, see `eval.presets`), each overridden by an explicit flag; on a GPU the models run in
bf16 autocast.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before the process group: the note at training/engines/__init__.py imports)
from PIL import Image
from tqdm import tqdm

from eval.presets import PRESETS, get_preset, recognise_c2i_checkpoint, recognise_t2i_folder
from models.core.head_sampler import randn_rows
from models.core.sampling import CFG_SCHEDULES, SamplingConfig
from models.tokenizer.model import tensor_to_images

SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "eval_prompts"
TASKS = ("geneval", "dpg", "shapes", "prompts", "imagenet")
FOLDER_TASKS = ("geneval", "shapes", "prompts")  # <out>/<idx:05d>/samples/<k:04d>.png + metadata.jsonl
SAMPLING = SamplingConfig()  # --steps, --cfg-scale, --cfg-schedule when no preset applies


@dataclass
class Job:
    """One prompt (or class) and the files it produces."""

    index: int
    name: str  # folder / file stem
    prompt: str
    meta: dict
    label: int = -1


def image_seed(base: int, index: int, k: int) -> int:
    digest = hashlib.sha256(f"{base}/{index}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(steps=args.steps, cfg_scale=args.cfg_scale, cfg_schedule=args.cfg_schedule)


def save_png_atomic(img: np.ndarray | Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(tmp)
    os.replace(tmp, path)


def read_prompt_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_jobs(args: argparse.Namespace) -> list[Job]:
    if args.task == "prompts":
        prompts = args.prompt or read_prompt_lines(Path(args.prompts_file))
        return [Job(i, f"{i:05d}", p, {"prompt": p}) for i, p in enumerate(prompts)]
    if args.task in ("geneval", "shapes"):
        if args.task == "shapes":
            from eval.shapes_bench import shapes_prompts

            metas = shapes_prompts(args.seed, args.per_tag)
        else:
            name = "evaluation_metadata_long.jsonl" if args.long_prompts else "evaluation_metadata.jsonl"
            path = Path(args.prompts_file) if args.prompts_file else SHARED_PROMPTS / name
            if not path.is_file():
                raise SystemExit(f"GenEval prompts not found at {path}; pass --prompts-file")
            metas = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [Job(i, f"{i:05d}", m["prompt"], m) for i, m in enumerate(metas)]
    if args.task == "dpg":
        path = Path(args.prompts_file) if args.prompts_file else SHARED_PROMPTS / "dpg_prompts.json"
        if not path.is_file():
            raise SystemExit(f"DPG-Bench prompts not found at {path}; pass --prompts-file")
        items = json.loads(path.read_text())
        return [Job(i, str(k), v, {"id": k}) for i, (k, v) in enumerate(items.items())]
    n = args.per_class
    classes = args.classes if args.classes is not None else range(args.num_classes)
    return [Job(c * n + j, f"{c * n + j:06d}", str(c), {"class": c}, c) for c in classes for j in range(n)]


def is_done(job: Job, args: argparse.Namespace, out: Path) -> bool:
    if args.task in FOLDER_TASKS:
        return (out / job.name / "metadata.jsonl").is_file()  # written after all samples
    if args.task == "dpg":
        return (out / f"{job.name}.png").is_file()
    return (out / "images" / f"{job.name}.png").is_file()


def write_job(job: Job, images: list[np.ndarray], args: argparse.Namespace, out: Path) -> None:
    if args.task in FOLDER_TASKS:
        folder = out / job.name
        for k, img in enumerate(images):
            save_png_atomic(img, folder / "samples" / f"{k:04d}.png")
        tmp = folder / ".metadata.jsonl.tmp"
        tmp.write_text(json.dumps(job.meta) + "\n")
        os.replace(tmp, folder / "metadata.jsonl")
    elif args.task == "dpg":
        h, w = images[0].shape[:2]
        grid = np.zeros((2 * h, 2 * w, 3), dtype=np.uint8)
        for k, img in enumerate(images[:4]):
            grid[(k // 2) * h : (k // 2 + 1) * h, (k % 2) * w : (k % 2 + 1) * w] = img
        save_png_atomic(grid, out / f"{job.name}.png")
    else:
        save_png_atomic(images[0], out / "images" / f"{job.name}.png")


class Generator:
    """Loads the model once and turns (job, image index) pairs into uint8 images."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device, self.sampling = args, device, sampling_config(args)
        if args.task == "imagenet":
            from models.c2i.io import load_c2i_checkpoint
            from models.c2i.model import get_c2i_config

            self.model, self.ae = load_c2i_checkpoint(
                args.model, get_c2i_config(args.model_config), use_ema=not args.no_ema, tokenizer_path=args.tokenizer
            )
        else:
            from models.t2i.io import load_t2i_folder

            sizes = args.image_size  # [(h, w), ...] or None: the official list
            self.model, self.text, self.ae = load_t2i_folder(args.model, image_sizes=sizes, device=str(device))
            try:
                self.model.cfg.grid(args.height, args.width)
            except ValueError as err:
                raise SystemExit(f"{err} (--height/--width, or list the size with --image-size)") from None
        self.model.to(device).eval()
        self.ae.to(device).eval()

    @torch.no_grad()
    def images(self, pairs: list[tuple[Job, int]]) -> list[np.ndarray]:
        a = self.args
        gens = [torch.Generator(device=self.device).manual_seed(image_seed(a.seed, j.index, k)) for j, k in pairs]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if a.task == "imagenet":
                from models.c2i.sampler import sample_class_conditional

                labels = torch.tensor([j.label for j, _ in pairs], device=self.device)
                bits = sample_class_conditional(self.model, labels, self.sampling, gens)
            else:
                from models.t2i.sampler import sample_t2i

                prompts = [j.prompt for j, _ in pairs]
                bits = sample_t2i(self.model, self.text, prompts, a.height, a.width, self.sampling, gens)
            q = bits.to(next(self.ae.parameters()).dtype)
            noise = randn_rows(tuple(q.shape), self.device, gens).to(q.dtype) if self.ae.config.gan_decoder else None
            decoded = self.ae.decode(q, noise=noise)
        return list(tensor_to_images(decoded.float()).cpu().numpy())


def image_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes look like 512x512 (HxW), got {text!r}") from None
    return h, w


def class_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated class ids like 1,2,3, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("no class ids given (e.g. --classes 1,2,3)")
    return ids


def check_imagenet(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Classes against the model config: --num-classes defaults to (and may not exceed) the config's count."""
    from models.c2i.model import get_c2i_config

    try:
        total = get_c2i_config(args.model_config).num_classes
    except ValueError as err:
        p.error(f"--model-config: {err}")
    if args.num_classes is None:
        args.num_classes = total
    elif not 1 <= args.num_classes <= total:
        p.error(f"--num-classes must be in [1, {total}] for --model-config {args.model_config}")
    if args.classes is not None:
        bad = sorted({c for c in args.classes if not 0 <= c < args.num_classes})
        if bad:
            p.error(f"--classes needs ids in [0, {args.num_classes}); bad: {bad}")
        twice = sorted({c for c in args.classes if args.classes.count(c) > 1})
        if twice:
            p.error(f"--classes lists {twice} more than once; use --per-class N for N images of a class")
    if args.per_class < 1:
        p.error("--per-class must be >= 1")


def resolve_sampling(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Sets args.preset (given, or the one the checkpoint is recognised as), args.model_config for ImageNet, and
    fills --steps / --cfg-scale / --cfg-schedule left unset from the preset (else the SamplingConfig defaults)."""
    family = "c2i" if args.task == "imagenet" else "t2i"
    if args.preset is not None and get_preset(args.preset).family != family:
        p.error(
            f"--preset {args.preset} is a {get_preset(args.preset).family} model; --task {args.task} needs {family}"
        )
    if family == "c2i":
        if not Path(args.model).is_file():
            p.error(f"--model {args.model} is not a checkpoint file")
        try:
            recognised = recognise_c2i_checkpoint(args.model)
        except Exception as err:  # not a torch file, or one that needs unpickling beyond tensors
            p.error(f"--model {args.model} is not a readable class-conditional checkpoint ({type(err).__name__})")
        if args.model_config is None:
            args.model_config = recognised or args.preset
        if args.model_config is None:
            p.error(f"{args.model} matches no named model config; pass --model-config (e.g. B-16x, tiny-4x)")
    else:
        recognised = recognise_t2i_folder(args.model)
    if args.preset is None and recognised in PRESETS:
        args.preset = recognised
    base = get_preset(args.preset).sampling_for(args.task, args.long_prompts) if args.preset else SAMPLING
    for flag, value in (("steps", base.steps), ("cfg_scale", base.cfg_scale), ("cfg_schedule", base.cfg_schedule)):
        if getattr(args, flag) is None:
            setattr(args, flag, value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--model", required=True, help="official-layout T2I folder, or a class-conditional checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--long-prompts", action="store_true", help="GenEval: the rewritten long prompts")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompts task: a prompt (repeatable)")
    src.add_argument(
        "--prompts-file", help="prompts task: a text file, one prompt a line; other tasks: override their prompt file"
    )
    p.add_argument("--limit", type=int, help="only the first N prompts / images (smoke runs)")
    p.add_argument("--per-tag", type=int, default=12, help="shapes: prompts per tag")
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
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument(
        "--image-size", action="append", type=image_size, help="supported HxW sizes of the model (default: official)"
    )
    p.add_argument("--seed", type=int, default=0, help="base seed; image k of prompt i uses image_seed(seed, i, k)")
    p.add_argument("--model-config", help="imagenet: the model's config name (default: recognised from the file)")
    p.add_argument("--tokenizer", help="imagenet: tokenizer file when the checkpoint has no vae. weights")
    p.add_argument("--no-ema", action="store_true", help="imagenet: the 'model' weights even when 'ema' exists")
    p.add_argument("--num-classes", type=int, help="imagenet: the first N classes (default: all of the config's)")
    p.add_argument("--classes", type=class_ids, help="imagenet: only these comma-separated class ids, e.g. 1,2,3")
    p.add_argument("--per-class", type=int, default=50, help="imagenet: images of every class")
    args = p.parse_args(argv)
    resolve_sampling(p, args)
    try:
        sampling_config(args)
    except ValueError as err:
        p.error(str(err))
    if args.batch_size < 1 or args.images_per_prompt < 1:
        p.error("--batch-size and --images-per-prompt must be >= 1")
    if args.task == "imagenet":
        args.images_per_prompt = 1
        check_imagenet(p, args)
    elif args.classes is not None or args.no_ema:
        p.error("--classes and --no-ema go with --task imagenet")
    if args.task == "dpg" and args.images_per_prompt != 4:
        p.error("DPG-Bench scores 2x2 grids: --images-per-prompt must be 4")
    if args.prompt and args.task != "prompts":
        p.error(f"--prompt goes with --task prompts (--task {args.task} reads its own prompt file)")
    if args.task == "prompts":
        if args.prompts_file:
            if not Path(args.prompts_file).is_file():
                p.error(f"--prompts-file {args.prompts_file} does not exist")
            if not read_prompt_lines(Path(args.prompts_file)):
                p.error(f"--prompts-file {args.prompts_file} has no prompts (one prompt a line)")
        elif not args.prompt:
            p.error("--task prompts needs --prompt TEXT (repeatable) or --prompts-file FILE")
        elif not all(x.strip() for x in args.prompt):
            p.error("--prompt text must not be empty")
    return args


def init_ranks() -> tuple[int, int, torch.device]:
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    )
    return rank, world, device


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device = init_ranks()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = load_jobs(args)[: args.limit]
    mine = [j for j in jobs[rank::world] if not is_done(j, args, out)]
    if rank == 0:
        run = {k: v for k, v in vars(args).items()}
        (out / "run.json").write_text(json.dumps({**run, "world_size": world, "prompts": len(jobs)}, indent=2))
        how = f"preset {args.preset}" if args.preset else "no preset"
        print(f"sampling ({how}): {sampling_config(args)}", flush=True)
        print(f"{len(jobs)} prompts; rank 0 has {len(mine)} left to generate", flush=True)
    if mine:
        gen = Generator(args, device)
        pairs = [(j, k) for j in mine for k in range(args.images_per_prompt)]
        done: dict[int, list[np.ndarray]] = {}
        bar = tqdm(total=len(mine), desc=f"{args.task} (rank {rank})", disable=rank != 0, unit="prompt")
        for start in range(0, len(pairs), args.batch_size):
            chunk = pairs[start : start + args.batch_size]
            for (job, _), img in zip(chunk, gen.images(chunk), strict=True):
                done.setdefault(job.index, []).append(img)
                if len(done[job.index]) == args.images_per_prompt:
                    write_job(job, done.pop(job.index), args, out)
                    bar.update(1)
        bar.close()
    if dist.is_initialized():
        dist.barrier()
    if rank == 0 and args.task == "imagenet":
        from eval.imagenet_metrics import NpzWriter

        first = np.asarray(Image.open(out / "images" / f"{jobs[0].name}.png"))
        writer = NpzWriter(out / "samples.npz", len(jobs), first.shape[0], first.shape[1])
        for start in range(0, len(jobs), 1000):
            batch = [
                np.asarray(Image.open(out / "images" / f"{j.name}.png").convert("RGB"))
                for j in jobs[start : start + 1000]
            ]
            writer.add(np.stack(batch), start)
        writer.close()
        print(f"wrote {out / 'samples.npz'}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    from eval.generate import main as _main

    _main()
