"""The one safetensors reader of the repository: every weight file the product code reads (official folders, image
tokenizers, DeepSpeed checkpoints, LPIPS weights) goes through `read_header` / `load_file` here. Writing stays with
`safetensors.torch.save_file`.

A file is 8 bytes of little-endian header length, a JSON header {tensor name: {"dtype", "shape", "data_offsets"}}
(plus an optional "__metadata__" {str: str}), then the data area the offsets index. The header is checked before any
tensor is read, and anything a file may not be is a `SafetensorsError` (a ValueError) in one line naming the file and,
where it applies, the tensor: a header length over `MAX_HEADER_BYTES` or past the end of the file (checked before
the header is read), a header that is not UTF-8 JSON holding an object (duplicate keys included), an unknown key,
an unknown dtype, a shape that is not a list of at most `MAX_DIMS` non-negative ints, `data_offsets` that are not
two ints with begin <= end inside the data area, a byte size other than prod(shape) x itemsize, tensors whose bytes
overlap, and BOOL bytes other than 0 and 1. Gaps between tensors are allowed.

Memory: each tensor is read with a plain file read into its own buffer (no memory map), so a process keeps only
the tensors it asked for (`names`), which the streaming checkpoint tools' one-layer bound relies on. Reading a file
takes its tensors' bytes (at most the file's size) plus the parsed header, a small multiple of the header's length,
which is capped and checked against the file size before it is read.

`check_finite` refuses NaN/Inf in floating tensors (the weight import/export tools and the model-folder loaders use
it); `load_file(..., check_finite=True)` checks each tensor as it is read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_HEADER_BYTES = 100 * 2**20  # a 14B model's shard headers are tens of kB
MAX_DIMS = 64
METADATA = "__metadata__"
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
FINITE_CHUNK = 1 << 22  # elements converted at a time for dtypes torch.isfinite does not take (float8)

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPES.update(
    {
        name: getattr(torch, attr)
        for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
        if hasattr(torch, attr)
    }
)


class SafetensorsError(ValueError):
    """A safetensors file that is not what a safetensors file must be, or holds what the caller refuses (one line)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a header: dtype, shape and its bytes [begin, end) as absolute file offsets."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _show(name: str, limit: int = 80) -> str:
    """A header-supplied string for a one-line message: quoted, escapes kept, long ones cut."""
    return repr(name[:limit]) + ("..." if len(name) > limit else "")


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise SafetensorsError(f"the key {_show(k)} appears twice")
        out[k] = v
    return out


def _read_raw_header(f, path: Path) -> tuple[bytes, int]:
    """(header bytes, offset of the data area); the length is checked before anything else is read."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise SafetensorsError(f"{path} is not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{path} declares a {n}-byte header, over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > size:
        raise SafetensorsError(f"{path} declares a {n}-byte header but the file has only {size - 8} bytes after it")
    raw = f.read(n)
    if len(raw) != n:
        raise SafetensorsError(f"{path} ended while its header was read (was it changed meanwhile?)")
    return raw, 8 + n


def _parse_json(raw: bytes, path: Path) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except SafetensorsError as err:
        raise SafetensorsError(f"{path} has a malformed header: {err}") from None
    except UnicodeDecodeError:
        raise SafetensorsError(f"{path} has a header that is not UTF-8 text") from None
    except (ValueError, RecursionError) as err:
        raise SafetensorsError(f"{path} has a header that is not JSON ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} has a header that is not a JSON object")
    return header


def _check_metadata(meta, path: Path) -> None:
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SafetensorsError(f"{path} has a {METADATA} that is not an object of strings")


def _entry(name: str, e, data_start: int, data_size: int, path: Path) -> TensorEntry:
    where = f"{path}: tensor {_show(name)}"
    if not isinstance(e, dict):
        raise SafetensorsError(f"{where} is described by {type(e).__name__}, not an object")
    if set(e) != ENTRY_KEYS:
        extra, missing = sorted(set(e) - ENTRY_KEYS), sorted(ENTRY_KEYS - set(e))
        problem = f"has the unknown key {_show(extra[0])}" if extra else f"lacks {missing[0]!r}"
        raise SafetensorsError(f"{where} {problem}; a tensor entry holds exactly dtype, shape and data_offsets")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        shown = _show(dtype) if isinstance(dtype, str) else type(dtype).__name__
        raise SafetensorsError(f"{where} has unknown dtype {shown}; known: {', '.join(DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_int(d) and d >= 0 for d in shape)):
        raise SafetensorsError(f"{where} has shape {repr(shape)[:80]}, not a list of at most {MAX_DIMS} ints >= 0")
    if math.prod(d for d in shape if d) >= 2**63:
        raise SafetensorsError(f"{where} has shape {shape}, too large for a tensor")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) for o in offsets)):
        raise SafetensorsError(f"{where} has data_offsets {repr(offsets)[:80]}, not two ints [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise SafetensorsError(f"{where} has data_offsets [{begin}, {end}]; they must satisfy 0 <= begin <= end")
    if end > data_size:
        raise SafetensorsError(f"{where} ends at byte {end} of a {data_size}-byte data area (file truncated?)")
    itemsize = DTYPES[dtype].itemsize
    if end - begin != math.prod(shape) * itemsize:
        raise SafetensorsError(
            f"{where} holds {end - begin} bytes but {dtype} {shape} needs {math.prod(shape) * itemsize}"
        )
    return TensorEntry(DTYPES[dtype], tuple(shape), data_start + begin, data_start + end)


def _check_overlaps(entries: dict[str, TensorEntry], path: Path) -> None:
    last_name, last_end = None, 0
    for name, e in sorted(((n, e) for n, e in entries.items() if e.end > e.begin), key=lambda ne: ne[1].begin):
        if e.begin < last_end:
            raise SafetensorsError(f"{path}: tensors {_show(last_name)} and {_show(name)} overlap in the file")
        last_name, last_end = name, e.end


def _parse(f, path: Path) -> dict[str, TensorEntry]:
    raw, data_start = _read_raw_header(f, path)
    header = _parse_json(raw, path)
    data_size = os.fstat(f.fileno()).st_size - data_start
    if METADATA in header:
        _check_metadata(header.pop(METADATA), path)
    entries = {name: _entry(name, e, data_start, data_size, path) for name, e in header.items()}
    _check_overlaps(entries, path)
    return entries


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """{tensor name: TensorEntry} of a safetensors file, in header order, the header checked (reads no tensor data)."""
    path = Path(path)
    with open(path, "rb") as f:
        return _parse(f, path)


def tensor_names(path: str | Path) -> list[str]:
    """The tensor names of a safetensors file (its header checked)."""
    return list(read_header(path))


def _read_tensor(f, name: str, e: TensorEntry, path: Path) -> torch.Tensor:
    f.seek(e.begin)
    buf = bytearray(e.end - e.begin)
    if f.readinto(buf) != len(buf):
        raise SafetensorsError(f"{path} ended inside tensor {_show(name)} (was it changed meanwhile?)")
    if not buf:
        return torch.empty(e.shape, dtype=e.dtype)
    if e.dtype == torch.bool and torch.frombuffer(buf, dtype=torch.uint8).max() > 1:
        raise SafetensorsError(f"{path}: tensor {_show(name)} is BOOL but holds bytes other than 0 and 1")
    return torch.frombuffer(buf, dtype=e.dtype).view(e.shape)


def load_file(
    path: str | Path, names=None, device: str | torch.device = "cpu", check_finite: bool = False
) -> dict[str, torch.Tensor]:
    """{name: tensor} of a safetensors file (all its tensors, or `names`, in that order), each read into its own
    buffer after the header is checked, then moved to `device`; with `check_finite`, a floating tensor holding NaN
    or Inf is refused as it is read."""
    path = Path(path)
    with open(path, "rb") as f:
        header = _parse(f, path)
        wanted = list(header) if names is None else list(names)
        missing = [n for n in wanted if n not in header]
        if missing:
            raise SafetensorsError(f"{path} has no tensor {_show(str(missing[0]))} ({len(header)} tensors in it)")
        out = {}
        for name in wanted:
            t = _read_tensor(f, name, header[name], path)
            if check_finite:
                _check_one(name, t, str(path))
            out[name] = t if torch.device(device).type == "cpu" else t.to(device)
    return out


def _finite(t: torch.Tensor) -> bool:
    if t.element_size() >= 2:
        return bool(torch.isfinite(t).all())
    flat = t.reshape(-1)  # float8: torch.isfinite does not take it; check in chunks converted to float32
    return all(
        bool(torch.isfinite(flat[i : i + FINITE_CHUNK].float()).all()) for i in range(0, flat.numel(), FINITE_CHUNK)
    )


def _check_one(name: str, t: torch.Tensor, where: str) -> None:
    if t.is_floating_point() and t.numel() and not _finite(t):
        raise SafetensorsError(
            f"{where}: tensor {_show(name)} holds NaN or Inf values, which no model can use (the checkpoint tools "
            "copy such weights only with --no-check-finite)"
        )


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse (SafetensorsError, one line naming `where` and the tensor) the first floating tensor holding NaN/Inf."""
    for name, t in tensors.items():
        _check_one(name, t, where)
