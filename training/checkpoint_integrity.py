"""What a checkpoint folder must prove before anything loads it: its files match the checksums recorded when it was
written, they all lie inside it, and its pickled torch DCP metadata holds nothing but checkpoint metadata.

- `manifest.json` (written last, before the folder is renamed into place) lists every file of the checkpoint with its
  size and sha256 (`hashlib`). Loading checks that every listed file is there with its size and, unless checksums
  are off (`checkpoint.checksums=false` for huge checkpoints: sizes only), its sha256; a file missing, changed or not
  listed, an entry without its size (or, with checksums on, without its sha256), and a listed name or a symlink that
  leads outside the folder are each a one-line `CheckpointError` naming it. Ranks split the hashing (rank r takes
  every world-th file) and share the results, at save and at load. Checkpoints written before manifests existed load
  with a note.
- megatron's dist_checkpointing reads `dist/.metadata` with `pickle.load` (torch.distributed.checkpoint
  `FileSystemReader.read_metadata`), so a payload planted there would run on load, checksums or not (whoever plants
  it can rewrite the manifest too). `check_dcp_metadata` unpickles every `*.metadata` file first with an unpickler
  that admits only the classes such metadata is made of (the torch.distributed.checkpoint metadata dataclasses,
  torch.Size, dtypes and layouts, paths, builtin containers) and refuses anything else before megatron reads the
  folder. None of those turns a short pickle into a large object (`bytes(n)` is not admitted), so unpickling takes
  memory in proportion to the file, and a file over `MAX_METADATA_BYTES` is refused unread; every data file the
  metadata names (`relative_path`) must lie inside `dist/`. Every megatron read path goes through it
  (`training.engines.megatron_checkpoint.dist_path`); the other checkpoint files load with safetensors, json and
  `torch.load(weights_only=True)`; megatron's `common.pt` loads with torch's default, weights_only unless
  TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set, so the check loads it that way first.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from models.core.contained_path import resolve_inside

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "bitdance-checkpoint-manifest/v1"
BLOCK = 4 << 20
MAX_METADATA_BYTES = 1 << 30  # a 14B model's dist/.metadata is tens of MB


class CheckpointError(ValueError):
    """A checkpoint or a requested layout that cannot be used (one-line message)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[str]:
    """Every file under `directory` but the manifest; a file or folder whose symlink leads outside it is refused."""
    names = []
    for root, dirs, files in os.walk(directory):  # symlinked folders: checked, not descended into
        for entry in dirs + files:
            path = Path(root) / entry
            if path.is_symlink():
                _contained(directory, str(path.relative_to(directory)))
        names += [str((Path(root) / f).relative_to(directory)) for f in files if (Path(root) / f).is_file()]
    return sorted(n for n in names if n != MANIFEST)


def _contained(directory: Path, name: str) -> Path:
    try:
        return resolve_inside(directory, name, "checkpoint file")
    except ValueError as err:
        raise CheckpointError(f"{err}; refusing to read it") from None


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _shared(mine: dict) -> dict:
    """The union of every rank's dict (all ranks call this)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _hash_all(directory: Path, names: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib releases the GIL on large blocks
        return dict(zip(names, pool.map(lambda n: sha256_file(directory / n), names), strict=True))


def write_manifest(directory: Path, checksums: bool = True) -> None:
    """Record every file of `directory` (all ranks call this once every file is written; rank 0 writes)."""
    rank, world = _rank_world()
    names = _files(directory)
    digests = _shared(_hash_all(directory, names[rank::world]) if checksums else {})
    if rank == 0:
        files = {n: {"bytes": (directory / n).stat().st_size, "sha256": digests.get(n)} for n in names}
        manifest = {"format": MANIFEST_FORMAT, "algorithm": "sha256" if checksums else None, "files": files}
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _entry_problem(manifest: Path, name: str, want, checksums: bool) -> str | None:
    """What is wrong with a manifest entry itself (before its file is looked at)."""
    if not isinstance(want, dict) or not isinstance(want.get("bytes"), int) or want["bytes"] < 0:
        return f"{manifest} lists {name!r} without its size in bytes"
    if checksums and not (isinstance(want.get("sha256"), str) and _SHA256.fullmatch(want["sha256"])):
        return (
            f"{manifest} lists {name!r} without a sha256 (a checkpoint written with checksums off loads with "
            "checkpoint.checksums=false / --no-checksums)"
        )
    return None


def _problem(directory: Path, name: str, want: dict, checksums: bool) -> str | None:
    path = directory / name
    if not path.is_file():
        return f"{path} is missing"
    if path.stat().st_size != want["bytes"]:
        return f"{path} has {path.stat().st_size} bytes, its manifest says {want['bytes']}"
    if checksums and sha256_file(path) != want["sha256"]:
        return f"{path} does not match the sha256 in {directory / MANIFEST}"
    return None


def _problems(directory: Path, listed: dict, names: list[str], checksums: bool) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        found = pool.map(lambda n: _problem(directory, n, listed[n], checksums), names)
        return {n: p for n, p in zip(names, found, strict=True) if p is not None}


def verify_checkpoint(directory: str | Path, checksums: bool = True) -> None:
    """One-line CheckpointError when a file of the checkpoint is missing, unlisted or differs from its manifest (all
    ranks call this; each checks its share of the files)."""
    directory = Path(directory)
    path = directory / MANIFEST
    rank, world = _rank_world()
    if not path.is_file():
        if rank == 0:
            print(f"{directory} has no {MANIFEST} (written before checksums were recorded): not verified", flush=True)
        return
    try:
        listed = json.loads(path.read_text())["files"]
        assert isinstance(listed, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{path} is not a checkpoint manifest; restore the checkpoint from a copy") from None
    for name, want in sorted(listed.items()):
        _contained(directory, name)
        if problem := _entry_problem(path, name, want, checksums):
            raise CheckpointError(problem)
    unlisted = sorted(set(_files(directory)) - set(listed))
    if unlisted:
        raise CheckpointError(
            f"{directory / unlisted[0]} is not listed in {path}; remove it (or restore the checkpoint from a copy)"
        )
    names = sorted(listed)
    problems = _shared(_problems(directory, listed, names[rank::world], checksums))
    if problems:
        first = sorted(problems)[0]
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        raise CheckpointError(
            f"checkpoint damaged: {problems[first]}{more}; restore it from a copy or resume from another checkpoint"
        )


# ---- pickled torch DCP metadata -----------------------------------------------------------------------------------

_DCP = "torch.distributed.checkpoint.metadata"
ALLOWED = (
    {
        (_DCP, n)
        for n in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        # megatron's async writer keeps every rank's save plan in the metadata (to reuse it at the next save)
        ("torch.distributed.checkpoint.planner", n)
        for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
        *(
            ("builtins", n)
            # containers (older pickle protocols rebuild sets this way); never bytes/bytearray: bytes(n) from a few
            # pickle bytes would allocate n
            for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bool")
        ),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what torch DCP metadata is made of (`ALLOWED`, torch dtypes); anything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"persistent id {pid!r}")


def check_dcp_metadata(dist_dir: str | Path) -> None:
    """Refuse a dist_checkpointing folder whose pickled `*.metadata` holds anything but DCP metadata, or whose
    `common.pt` does not load with `weights_only=True` (one line), before megatron or torch unpickles them."""
    from torch.distributed.checkpoint.metadata import Metadata

    common = Path(dist_dir) / "common.pt"
    if common.is_file():  # megatron loads it with torch's default, weights_only unless the environment turns it off
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(
                f"{common} holds pickled objects that are not tensors or containers; refusing to load it (restore the "
                "checkpoint from a trusted copy)"
            ) from None

    for path in sorted(Path(dist_dir).glob("*.metadata")):
        if path.stat().st_size > MAX_METADATA_BYTES:
            raise CheckpointError(
                f"{path} has {path.stat().st_size} bytes, more than checkpoint metadata ever needs "
                f"({MAX_METADATA_BYTES}); refusing to read it"
            )
        try:
            obj = RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path} holds a pickled {e}, which checkpoint metadata never contains; refusing to load it "
                "(restore the checkpoint from a trusted copy)"
            ) from None
        except Exception as e:  # noqa: BLE001 - truncated or garbled bytes: not loadable either
            raise CheckpointError(f"{path} is not readable checkpoint metadata ({type(e).__name__}: {e})") from None
        if not isinstance(obj, Metadata):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not checkpoint metadata; refusing to load it")
        for info in (obj.storage_data or {}).values() if isinstance(obj.storage_data, dict) else ():
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str):
                raise CheckpointError(f"{path} names a data file that is not a path ({name!r}); refusing to load it")
            try:
                resolve_inside(dist_dir, name, f"data file named by {path.name}")
            except ValueError as err:
                raise CheckpointError(f"{err}; refusing to load it") from None
