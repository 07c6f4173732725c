"""Training checkpoints: exact resume, atomic directories, `latest` written last, keep-last-N.

    <run_dir>/checkpoints/step_00000100/
        model.safetensors   full model weights (rank 0)      ema.safetensors  EMA weights (rank 0; ZeRO<=2)
        rank_00000.pt       this rank's optimizer partition, RNG states, loader state, EMA shard (ZeRO-3)
        trainer.json        step, tokens/samples seen, skipped steps, world size, config
    <run_dir>/checkpoints/latest   name of the newest complete checkpoint

Everything is written into `.step_XXXXXXXX.tmp/`, renamed when all ranks are done, and only then is `latest`
replaced, so a crash at any point leaves the previous checkpoint as `latest`. Loading uses safetensors and
`torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from training.faults import maybe_kill

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
        },  # fmt: skip
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


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = checkpoint_root(run_dir)
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"{marker} points to {path}, which is not a complete checkpoint")
    return path


def save_checkpoint(
    run_dir, step: int, engine, ema, loader_state: dict, trainer: dict, keep_last: int, extra: dict | None = None
) -> Path:
    """Every rank calls this; returns the final checkpoint directory. `extra`: more per-rank tensor state
    (e.g. a second model and its optimizer), returned as is by `load_checkpoint`."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = checkpoint_root(run_dir)
    name = f"step_{step:08d}"
    tmp, final = root / f".{name}.tmp", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state = engine.full_state_dict()
    zero3 = engine.zero_stage == 3
    per_rank = {"optimizer": engine.optimizer_state(), "rng": rng_state(), "loader": loader_state, "extra": extra or {}}
    if zero3:
        per_rank["ema"] = ema.state_dict()
    torch.save(per_rank, tmp / f"rank_{rank:05d}.pt")
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        maybe_kill("after_model", step)
        if not zero3:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        world = dist.get_world_size() if dist.is_initialized() else 1
        (tmp / "trainer.json").write_text(json.dumps({**trainer, "step": step, "world_size": world}, indent=2))
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        maybe_kill("before_latest", step)
        marker_tmp = root / f".{LATEST}.tmp"
        marker_tmp.write_text(name + "\n")
        os.replace(marker_tmp, root / LATEST)
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[: max(0, len(done) - keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, engine, ema) -> tuple[dict, dict, dict]:
    """Restore model, optimizer, EMA and this rank's RNG; returns (trainer state, loader state, extra)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    trainer = json.loads((path / "trainer.json").read_text())
    if trainer["world_size"] != world:
        raise ValueError(
            f"{path} was written by {trainer['world_size']} ranks, this run has {world}; resume with the same "
            "world size (resharding: the checkpoint tools of the scale-out issue)"
        )
    engine.load_full_state_dict(load_file(str(path / "model.safetensors")))
    per_rank = torch.load(path / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=True)
    engine.load_optimizer_state(per_rank["optimizer"])
    ema.load_state_dict(per_rank["ema"] if "ema" in per_rank else load_file(str(path / "ema.safetensors")))
    set_rng_state(per_rank["rng"])
    return trainer, per_rank["loader"], per_rank.get("extra", {})
