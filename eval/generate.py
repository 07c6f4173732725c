"""`torchrun ... -m eval.generate --task geneval|dpg|shapes|imagenet --model <ckpt or folder> --out <dir>`.

Writes the layouts the official scorers read (spec section 6): GenEval and shapes `<out>/<idx:05d>/metadata.jsonl`
+ `samples/<k:04d>.png`; DPG-Bench one 2x2 grid `<out>/<id>.png`; ImageNet PNGs under `<out>/images/` then one
ADM `.npz` written in chunks. Prompts are split across ranks; every image's noise comes from its own generator
seeded by (base seed, prompt index, image index), so results do not depend on the number of ranks. Finished
prompts are skipped on re-runs (a prompt is finished when its last file is in place; files are written
atomically), so a half-written prompt is redone.
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
from PIL import Image
from tqdm import tqdm

from models.core.head_sampler import randn_rows
from models.tokenizer.model import tensor_to_images

SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "eval_prompts"
TASKS = ("geneval", "dpg", "shapes", "imagenet")


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


def save_png_atomic(img: np.ndarray | Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(tmp)
    os.replace(tmp, path)


def load_jobs(args: argparse.Namespace) -> list[Job]:
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
    return [
        Job(c * n + j, f"{c * n + j:06d}", str(c), {"class": c}, c) for c in range(args.num_classes) for j in range(n)
    ]


def is_done(job: Job, args: argparse.Namespace, out: Path) -> bool:
    if args.task in ("geneval", "shapes"):
        return (out / job.name / "metadata.jsonl").is_file()  # written after all samples
    if args.task == "dpg":
        return (out / f"{job.name}.png").is_file()
    return (out / "images" / f"{job.name}.png").is_file()


def write_job(job: Job, images: list[np.ndarray], args: argparse.Namespace, out: Path) -> None:
    if args.task in ("geneval", "shapes"):
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
        self.args, self.device = args, device
        if args.task == "imagenet":
            from models.c2i.io import load_c2i_checkpoint
            from models.c2i.model import get_c2i_config

            self.model, self.ae = load_c2i_checkpoint(
                args.model, get_c2i_config(args.model_config), tokenizer_path=args.tokenizer
            )
        else:
            from models.t2i.io import load_t2i_folder

            sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.image_size] if args.image_size else None
            self.model, self.text, self.ae = load_t2i_folder(args.model, image_sizes=sizes, device=str(device))
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
                bits = sample_class_conditional(self.model, labels, a.steps, a.cfg_scale, a.cfg_schedule, gens)
            else:
                from models.t2i.sampler import sample_t2i

                bits = sample_t2i(
                    self.model,
                    self.text,
                    [j.prompt for j, _ in pairs],
                    a.height,
                    a.width,
                    a.steps,
                    a.cfg_scale,
                    a.cfg_schedule,
                    gens,
                )
            q = bits.to(next(self.ae.parameters()).dtype)
            noise = randn_rows(tuple(q.shape), self.device, gens).to(q.dtype) if self.ae.config.gan_decoder else None
            decoded = self.ae.decode(q, noise=noise)
        return list(tensor_to_images(decoded.float()).cpu().numpy())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--model", required=True, help="official-layout T2I folder, or a class-conditional checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--long-prompts", action="store_true", help="GenEval: the rewritten long prompts")
    p.add_argument("--prompts-file", help="override the prompt file of the task")
    p.add_argument("--limit", type=int, help="only the first N prompts / classes (smoke runs)")
    p.add_argument("--per-tag", type=int, default=12, help="shapes: prompts per tag")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4, help="images per sampler call")
    p.add_argument("--steps", type=int, default=50, help="diffusion-head steps per AR step")
    p.add_argument("--cfg-scale", type=float, default=7.5)
    p.add_argument("--cfg-schedule", choices=("constant", "linear"), default="constant")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--image-size", action="append", help="supported HxW sizes of the model (default: official)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-config", default="B-16x", help="imagenet: the model's config name")
    p.add_argument("--tokenizer", help="imagenet: tokenizer file when the checkpoint has no vae. weights")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=50)
    args = p.parse_args(argv)
    if args.task == "imagenet":
        args.images_per_prompt = 1
    if args.task == "dpg" and args.images_per_prompt != 4:
        p.error("DPG-Bench scores 2x2 grids: --images-per-prompt must be 4")
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
