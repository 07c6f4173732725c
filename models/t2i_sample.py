"""`python -m models.t2i_sample`: text-to-image sampling from an official-layout model folder into PNGs.

Example: python -m models.t2i_sample --model-dir BitDance-14B-16x --prompts-file prompts.txt \
             --height 1024 --width 1024 --cfg-scale 7.5 --steps 50 --out samples/t2i
Writes <out>/<prompt index:05d>_<image index>.png and <out>/prompts.jsonl (index -> prompt).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from models.t2i.io import load_t2i_folder
from models.t2i.sampler import sample_t2i
from models.tokenizer.model import tensor_to_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.t2i_sample", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, help="folder in the official T2I layout")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50, help="diffusion-head steps per AR step")
    p.add_argument("--cfg-scale", type=float, default=7.5)
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--batch-prompts", type=int, default=4, help="prompts decoded together")
    p.add_argument("--seed", type=int, default=0, help="batch k uses a generator seeded with seed + k")
    p.add_argument(
        "--image-size",
        action="append",
        default=None,
        metavar="HxW",
        help="supported size (repeatable); default: the official size list",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SystemExit(f"--prompts-file {path} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = [p for p in args.prompt if p.strip()]
    if not prompts:
        raise SystemExit("no prompts given (empty --prompt or --prompts-file)")
    return prompts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prompts = read_prompts(args)
    sizes = None
    if args.image_size:
        try:
            sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.image_size]
        except ValueError:
            raise SystemExit(f"--image-size must look like 512x512, got {args.image_size}") from None
    model, text_tok, image_tok = load_t2i_folder(args.model_dir, image_sizes=sizes, device=args.device)
    try:
        model.cfg.grid(args.height, args.width)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    use_bf16 = torch.device(args.device).type == "cuda"
    n = args.images_per_prompt
    with (out / "prompts.jsonl").open("w") as meta:
        for k, start in enumerate(tqdm(range(0, len(prompts), args.batch_prompts), desc="prompts", unit="batch")):
            chunk = prompts[start : start + args.batch_prompts]
            gen = torch.Generator(device=args.device).manual_seed(args.seed + k)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                bits = sample_t2i(
                    model,
                    text_tok,
                    chunk,
                    args.height,
                    args.width,
                    args.steps,
                    args.cfg_scale,
                    generator=gen,
                    images_per_prompt=n,
                )
                images = tensor_to_images(image_tok.decode(bits.to(next(image_tok.parameters()).dtype)))
            for i, img in enumerate(images.cpu().numpy()):
                index = start + i // n
                Image.fromarray(img).save(out / f"{index:05d}_{i % n}.png")
            for j, prompt in enumerate(chunk):
                meta.write(json.dumps({"index": start + j, "prompt": prompt}) + "\n")
    print(f"wrote {len(prompts) * n} images to {out}")


if __name__ == "__main__":
    main()
