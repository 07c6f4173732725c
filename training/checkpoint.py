"""Training checkpoints: exact resume, atomic directories, `latest` written last, keep-last-N; and the megatron
checkpoint tools (`python -m training.checkpoint reshard|export|import ...`).

    <run_dir>/checkpoints/step_00000100/
        model.safetensors   full model weights (rank 0)      ema.safetensors  EMA weights (rank 0; ZeRO<=2)
        rank_00000.pt       this rank's optimizer partition, RNG states, loader state, EMA shard (ZeRO-3)
        trainer.json        step, tokens/samples seen, skipped steps, world size, config
        manifest.json       size and sha256 of every file above (training.checkpoint_integrity), written last
    <run_dir>/checkpoints/latest   name of the newest complete checkpoint

A LoRA or head-only run (`finetune.method=lora|head`, training/finetune.py) writes no `model.safetensors`: its
trainable weights only (`adapter/adapter_config.json` + `adapter/adapter_model.safetensors` in PEFT's format, or
`trainable.safetensors`), their EMA and optimizer state, and in `trainer.json` a `finetune` entry naming the method,
its settings and the base (`model.init_from` and its fingerprint), which a resume must match.
Each engine writes its own state (`training.engines.Engine.save_state`; the files above are the DeepSpeed engine's);
the megatron engine writes `dist/` (model, EMA and optimizer state through megatron's dist_checkpointing, loadable at
any TP/PP layout) instead, see training/engines/megatron_checkpoint.py. This module adds RNG and loader state to each
`rank_*.pt`, and `trainer.json`. Everything is written into `.step_XXXXXXXX.tmp/`, renamed when all ranks are done,
and only then is `latest` replaced, so a crash at any point leaves the previous checkpoint as `latest`.
Keep-last-N deletes by step number, never the checkpoint `latest` names, and none that a live checkpoint reader
(eval.watch) has not read yet (training.checkpoint_readers). Resuming (`resolve_resume`) takes `latest`, else the
newest complete checkpoint (said in the log); a run that would start behind checkpoints already in its run folder
is refused unless `checkpoint.overwrite=true`. Loading verifies the manifest first and uses
safetensors and `torch.load(weights_only=True)` only (megatron's pickled DCP metadata passes a restricted unpickler).

    python -m training.checkpoint reshard --src <ckpt> --dst <ckpt> --tp N --pp M [--virtual-pp V] [--no-checksums]
    python -m training.checkpoint export --src <ckpt> --dst <official folder> --text-tokenizer <folder>
        --image-tokenizer <ae.safetensors> [--weights auto|model|ema] [--dtype bf16|fp32] [--no-checksums]
    python -m training.checkpoint import --src <official folder | HF Qwen3 folder> --dst <ckpt> --tp N --pp M
        [--model 14B-16x] [--vocab-size V] [--seed S]
    python -m training.checkpoint merge --base <official folder> --adapter <PEFT adapter folder> --dst <folder>
        [--dtype bf16|fp32] [--overwrite]
Merge writes the base with a LoRA adapter (PEFT's saved format) merged into its weights as an official folder
(training/adapters.py; needs peft, not megatron). Export, import and merge refuse weights holding NaN/Inf (naming the
tensor) unless `--no-check-finite`.
A `--src` may also be a run directory (its `checkpoints/latest` is used). The megatron tools run on CPU-only machines,
in one process that streams one decoder layer at a time (training/engines/checkpoint_stream.py): export writes one
`model-0000i-of-0000N.safetensors` per layer (bf16 by default, as the official folders).
A disk that fills up during a save is one line (`DiskFullError`): the folder, the space the checkpoint needs and the
space free; `latest` stays on the last complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from training.checkpoint_integrity import verify_checkpoint, write_manifest
from training.checkpoint_readers import delete_checkpoint, interrupted_deletions, keep_for_readers
from training.faults import maybe_kill
from training.run_guard import RunDirError

LATEST = "latest"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints (a `trainer.json` is written before the rename), oldest step first."""
    root = checkpoint_root(run_dir)
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit() and (p / "trainer.json").is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: str | Path, quiet: bool = False) -> Path | None:
    """The checkpoint `latest` names; when `latest` is missing or not a file while complete checkpoints exist, the
    newest complete one (said on stdout unless `quiet`). None when the run has no checkpoint."""
    root = checkpoint_root(run_dir)
    marker = root / LATEST
    if marker.is_file():
        path = root / marker.read_text().strip()
        if not (path / "trainer.json").is_file():
            raise RunDirError(
                f"{marker} points to {path}, which is not a complete checkpoint; point it at a complete step_* "
                "folder or pass checkpoint.resume=<checkpoint>"
            )
        return path
    done = complete_checkpoints(run_dir)
    if not done:
        return None
    if not quiet:
        why = "is not a file" if marker.exists() else "is missing"
        print(f"{marker} {why}: using the newest complete checkpoint {done[-1]}", flush=True)
    return done[-1]


def resolve_resume(run_dir: str | Path, resume: str, overwrite: bool, rank: int = 0) -> Path | None:
    """The checkpoint a run starts from (`checkpoint.resume`: auto | none | a checkpoint folder). A run that would
    start behind checkpoints already in its run folder (a fresh run in a used folder, or a resume from an older
    checkpoint) is refused: their higher step numbers would outrank every checkpoint it writes. With
    `checkpoint.overwrite=true` rank 0 deletes those checkpoints instead (and says so)."""
    if resume == "auto":
        return latest_checkpoint(run_dir, quiet=rank != 0)
    start = None if resume == "none" else Path(resume)
    if start is not None and not (start / "trainer.json").is_file():
        raise RunDirError(f"checkpoint.resume={resume} is not a checkpoint (no trainer.json); pass a step_* folder")
    step = -1 if start is None else int(json.loads((start / "trainer.json").read_text())["step"])
    root = checkpoint_root(run_dir)
    ahead = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit() and _step_of(p) > step]
    if ahead and not overwrite:
        what = "a fresh run" if start is None else f"a run from step {step}"
        raise RunDirError(
            f"{root} holds {len(ahead)} checkpoint(s) up to step {max(map(_step_of, ahead))} that "
            f"{what} would be mixed with; use checkpoint.resume=auto, another run_dir, or checkpoint.overwrite=true "
            "to delete them"
        )
    if ahead and rank == 0:
        for p in ahead:
            shutil.rmtree(p)
        (root / LATEST).unlink(missing_ok=True)
        print(f"checkpoint.overwrite=true: deleted {len(ahead)} checkpoint(s) of an earlier run in {root}", flush=True)
    return start


def retention(root: Path, keep_last: int) -> list[Path]:
    """The checkpoints keep-last-N deletes: all but the newest `keep_last` by step, never the one `latest` names, none
    that a live checkpoint reader (eval.watch) has not read yet (training.checkpoint_readers, which says what it
    keeps), and the leftovers of a deletion the trainer did not finish."""
    marker = root / LATEST
    keep = marker.read_text().strip() if marker.is_file() else None
    done = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=_step_of)
    old = [p for p in done[: max(0, len(done) - keep_last)] if p.name != keep]
    return keep_for_readers(root.parent, old) + interrupted_deletions(root)


def save_checkpoint(
    run_dir, step: int, engine, ema, loader_state: dict, trainer: dict, keep_last: int, checksums: bool = True
) -> Path:
    """Every rank calls this; returns the final checkpoint directory. The engine writes its own state; this adds each
    rank's RNG and loader state, `trainer.json`, `manifest.json` (sizes and sha256 of every file, see
    training.checkpoint_integrity), the atomic rename, `latest` and keep-last-N. When the engine writes in the
    background (megatron, `checkpoint.async_save`), the manifest, rename and `latest` follow when the write is done,
    so `latest` only ever names a complete checkpoint."""
    if keep_last < 1:
        raise RunDirError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    root = checkpoint_root(run_dir)
    name = f"step_{step:08d}"
    tmp, final = root / f".{name}.tmp", root / name
    with disk_full_in_one_line(run_dir, tmp):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        per_rank, fields = engine.save_state(tmp, ema)
        torch.save({**per_rank, "rng": rng_state(), "loader": loader_state}, tmp / f"rank_{rank:05d}.pt")
        if rank == 0:
            maybe_kill("after_model", step)
            meta = {**trainer, "step": step, "world_size": world, **fields}
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))
    _barrier()

    def finalize() -> None:  # every rank, once the engine's files are on disk
        with disk_full_in_one_line(run_dir, tmp):
            write_manifest(tmp, checksums)
            if rank == 0:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                maybe_kill("before_latest", step)
                marker_tmp = root / f".{LATEST}.tmp"
                marker_tmp.write_text(name + "\n")
                os.replace(marker_tmp, root / LATEST)
                for old in retention(root, keep_last):
                    delete_checkpoint(old)  # race-free with a checkpoint reader that is just starting on it
        _barrier()

    engine.when_saved(finalize)  # at once, or when a background write (checkpoint.async_save) completes
    return final


class DiskFullError(OSError):
    """A checkpoint did not fit on its disk (one line: the folder, the space it needs, the space free, the fix)."""


@contextmanager
def disk_full_in_one_line(run_dir: str | Path, tmp: Path) -> Iterator[None]:
    """Turn a failed write into checkpoint folder `tmp` into a `DiskFullError` when the disk is full: the error says
    so (errno ENOSPC or EDQUOT), or, for writers that drop the errno (torch.save raises a RuntimeError), the disk has
    less room left than the checkpoint needs. Needed: about the size of the run's last complete checkpoint (the same
    state), else more than what was written before the failure. Other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        written = _folder_bytes(tmp)
        done = complete_checkpoints(run_dir)
        last = _folder_bytes(done[-1]) if done else 0
        free = shutil.disk_usage(next(p for p in (tmp, *tmp.parents) if p.exists())).free
        if not (_says_disk_full(err) or free < max(last, written)):
            raise
        need = (
            f"about {_size(last)} (the size of {done[-1].name})"
            if done and last >= written
            else f"more than the {_size(written)} written before the disk filled"
        )
        raise DiskFullError(
            f"disk full writing checkpoint {tmp}: it needs {need}, {_size(free)} free; free space on that disk "
            "(or lower checkpoint.keep_last, or move run_dir) and resume"
        ) from err


def _says_disk_full(err: BaseException | None) -> bool:
    for _ in range(8):  # the error and what it was raised from
        if err is None:
            return False
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


def _folder_bytes(folder: Path) -> int:
    total = 0
    for f in folder.rglob("*") if folder.is_dir() else ():
        try:
            total += f.stat().st_size if f.is_file() else 0
        except OSError:  # removed meanwhile
            pass
    return total


def _size(n: float) -> str:
    """Bytes for a message: 512 B, 16.3 KiB, 1.2 GiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def load_checkpoint(
    path: Path, engine, ema, checksums: bool = True, verify: bool = True
) -> tuple[dict, dict | None, list[dict] | None]:
    """Restore model, optimizer and EMA (through the engine) and this rank's RNG; returns (trainer state, loader
    state, every previous data-parallel rank's loader state when the data stream must be resized, else None). The
    files are verified against the checkpoint's manifest first (sizes only without `checksums`; not at all with
    `verify=False`, for a caller that has just verified them)."""
    path = Path(path)
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint (no trainer.json); pass a step_* directory or 'auto'")
    if verify:
        verify_checkpoint(path, checksums)
    rank = dist.get_rank() if dist.is_initialized() else 0
    trainer = json.loads((path / "trainer.json").read_text())
    own = path / f"rank_{rank:05d}.pt"
    same_world = trainer.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1)
    per_rank = torch.load(own, map_location="cpu", weights_only=True) if own.is_file() and same_world else None
    applies = engine.load_state(path, ema, trainer, per_rank)
    if applies == "all" and per_rank is not None:
        set_rng_state(per_rank["rng"])
        return trainer, per_rank["loader"], None
    states = previous_loader_states(path)
    if not states:
        return trainer, None, None
    return trainer, states[0], (states if applies == "resized" else None)


def previous_loader_states(path: Path) -> list[dict]:
    """The loader state of every data-parallel rank of a checkpoint (one per data-parallel rank; the tensor-,
    pipeline- and context-parallel ranks of one data-parallel rank hold the same). Rank files are memory-mapped:
    only the small loader dicts are read."""
    by_dp: dict[int, dict] = {}
    for f in sorted(path.glob("rank_*.pt")):
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True).get("loader")
        if state:  # loaders keep a state; tools that save without one ({}) do not
            by_dp.setdefault(int(state["rank"]), state)
    return [by_dp[r] for r in sorted(by_dp)]


# ---- command line -------------------------------------------------------------------------------------------------


def _source(path: str) -> Path:
    """A checkpoint directory, or a run directory standing for its latest checkpoint."""
    p = Path(path)
    if checkpoint_root(p).is_dir():
        return latest_checkpoint(p) or p
    return p


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.checkpoint", description="megatron checkpoint tools")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reshard", help="rewrite a megatron checkpoint (model, EMA, optimizer) for a new TP/PP layout")
    e = sub.add_parser("export", help="megatron checkpoint -> official T2I folder")
    i = sub.add_parser("import", help="official T2I folder or Hugging Face Qwen3 folder -> megatron checkpoint")
    m = sub.add_parser("merge", help="official T2I folder + LoRA adapter (PEFT format) -> official T2I folder")
    m.add_argument("--base", required=True, help="official-layout T2I folder the adapter was trained on")
    m.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json, adapter_model.safetensors)")
    m.add_argument("--dst", required=True, help="a new or empty folder for the merged official folder")
    for q in (r, e, i):
        q.add_argument("--src", required=True)
        q.add_argument("--dst", required=True)
    for q in (r, i):
        q.add_argument("--tp", type=int, required=True)
        q.add_argument("--pp", type=int, required=True)
    r.add_argument("--virtual-pp", type=int, default=None)
    for q in (r, e):
        q.add_argument("--no-checksums", action="store_true", help="check the files' sizes only (huge checkpoints)")
    e.add_argument("--text-tokenizer", required=True, help="text tokenizer folder (Hugging Face files)")
    e.add_argument("--image-tokenizer", required=True, help="image tokenizer weights (ae safetensors)")
    e.add_argument("--weights", choices=("auto", "model", "ema"), default="auto", help="auto: EMA when saved")
    for q in (e, m):
        q.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of the written weights")
        q.add_argument("--overwrite", action="store_true", help="write into a --dst folder that is not empty")
    i.add_argument(
        "--model",
        default=None,
        help="named T2I config: the head of a Qwen3 import (e.g. 14B-16x), or another P for an official folder "
        "(14B-64x from a 16x folder: new query rows, models.t2i.repatch)",
    )
    i.add_argument("--vocab-size", type=int, default=None, help="resize the text vocabulary (new rows: mean)")
    i.add_argument("--seed", type=int, default=0, help="initialisation of the new head and projector")
    for q in (e, i, m):
        q.add_argument(
            "--check-finite",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="refuse weights holding NaN/Inf (default); --no-check-finite copies them as they are",
        )
    args = p.parse_args(argv)
    if args.command == "merge":
        return _merge(p, args)
    from training.engines import checkpoint_tools as mc

    dst = Path(args.dst)
    try:
        src = _source(args.src)
        if args.command == "reshard":
            out = mc.reshard(src, dst, args.tp, args.pp, args.virtual_pp, not args.no_checksums)
        elif args.command == "export":
            tokenizers = Path(args.text_tokenizer), Path(args.image_tokenizer)
            out = mc.export_folder(
                src,
                dst,
                *tokenizers,
                args.weights,
                args.dtype,
                not args.no_checksums,
                args.overwrite,
                args.check_finite,
            )
        else:
            out = mc.import_folder(
                src, dst, args.tp, args.pp, args.model, args.vocab_size, args.seed, args.check_finite
            )
    except ImportError as err:
        p.exit(2, f"error: the megatron tools need megatron-core ({err}); pip install -e '.[megatron]'\n")
    except (mc.CheckpointError, ValueError, FileNotFoundError) as err:
        p.exit(2, f"error: {str(err).splitlines()[0]}\n")
    print(f"{args.command}: wrote {out}")


def _merge(p, args) -> None:
    """The merge subcommand (plain PyTorch + peft: no megatron)."""
    from training.adapters import merge_folder

    try:
        out = merge_folder(args.base, args.adapter, args.dst, args.dtype, args.overwrite, args.check_finite)
    except (ValueError, FileNotFoundError) as err:
        p.exit(2, f"error: {str(err).splitlines()[0]}\n")
    print(f"merge: wrote {out}")


if __name__ == "__main__":
    from training.checkpoint import main as _main  # the importable module, not a second copy under __main__

    _main()
