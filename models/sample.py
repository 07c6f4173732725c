"""`python -m models.sample`: class-conditional sampling from a checkpoint into PNGs and an ADM-format .npz.

Example (official BitDance-B-16x weights):
    python -m models.sample --ckpt BitDance_B_16x.pt --model B-16x --tokenizer ae_d16c32.pt \
        --per-class 50 --cfg-scale 6.1 --steps 50 --out samples/b16x --to-npz
Images are written as <out>/<index:06d>.png; `--to-npz` then writes <out>.npz with arr_0 = uint8 [N, H, W, 3].
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.c2i.io import load_c2i_checkpoint
from models.c2i.model import get_c2i_config
from models.c2i.sampler import CFG_SCHEDULES, sample_class_conditional
from models.tokenizer.model import tensor_to_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.sample", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="torch checkpoint with 'model' and/or 'ema' state dicts")
    p.add_argument("--model", required=True, help="config name: B, L, H or tiny, with -1x/-4x/-16x")
    p.add_argument("--tokenizer", default=None, help="tokenizer file when the checkpoint has no 'vae.' weights")
    p.add_argument("--no-ema", action="store_true", help="use the 'model' weights even when 'ema' exists")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--classes", type=str, help="comma-separated class ids, one image each")
    who.add_argument("--per-class", type=int, help="this many images of every class, class-major order")
    p.add_argument("--steps", type=int, default=50, help="diffusion-head sampling steps per AR step")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default="linear")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="batch k uses a generator seeded with seed + k")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on the backbone (head math stays fp32)")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument("--to-npz", action="store_true", help="also write <out>.npz for the ADM evaluation suite")
    return p.parse_args(argv)


def class_list(args: argparse.Namespace, num_classes: int) -> list[int]:
    if args.per_class is not None:
        if args.per_class < 1:
            raise SystemExit("--per-class must be >= 1")
        return [c for c in range(num_classes) for _ in range(args.per_class)]
    try:
        labels = [int(x) for x in args.classes.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--classes must be comma-separated integers, got {args.classes!r}") from None
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad or not labels:
        raise SystemExit(f"--classes needs ids in [0, {num_classes}); bad: {bad or 'none given'}")
    return labels


def write_npz(folder: Path, count: int) -> Path:
    arrays = [np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in range(count)]
    path = folder.with_suffix(".npz")
    np.savez(path, arr_0=np.stack(arrays).astype(np.uint8))
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = get_c2i_config(args.model)
    model, tokenizer = load_c2i_checkpoint(args.ckpt, cfg, use_ema=not args.no_ema, tokenizer_path=args.tokenizer)
    model.to(args.device)
    tokenizer.to(args.device)
    labels = class_list(args, cfg.num_classes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = range(0, len(labels), args.batch_size)
    device_type = torch.device(args.device).type
    for k, start in enumerate(tqdm(batches, desc="sampling", unit="batch")):
        y = torch.tensor(labels[start : start + args.batch_size], device=args.device)
        gen = torch.Generator(device=args.device).manual_seed(args.seed + k)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.bf16):
            bits = sample_class_conditional(model, y, args.steps, args.cfg_scale, args.cfg_schedule, gen)
            images = tensor_to_images(tokenizer.decode(bits.float(), generator=gen).float())
        for i, img in enumerate(images.cpu().numpy()):
            Image.fromarray(img).save(out / f"{start + i:06d}.png")
    print(f"wrote {len(labels)} images to {out}")
    if args.to_npz:
        print(f"wrote {write_npz(out, len(labels))}")


if __name__ == "__main__":
    main()
