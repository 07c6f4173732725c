"""The binary-token shard format: webdataset tars of packed bits + metadata, and the dataset manifest.

One output shard per input shard, named `<input shard stem>.tar`. Each sample has two members:
  `<key>.bits`  packed token bits, uint8, row-major [h * w, C / 8] in raster order (bit order: `models/core/bits.py`)
  `<key>.json`  {"h", "w", "bits_per_token", "text_ids", "caption", "source_key", "label", "image_hw", "scores"}
                (scores: numbers carried from the source, e.g. an aesthetic score, for curated subsets)
The key is `<shard stem>-<index in the input shard:06d>`, so it is deterministic and unique in the dataset.
Beside the shards: `<stem>.stats.json` per shard (written last: it marks the shard finished), `<stem>.errors.jsonl`,
with `--dedup` `<stem>.hashes.json` (the pixel digest of each kept sample, by key), and `manifest.json` and
`errors.jsonl` per dataset. Every file is written atomically, in a local folder or an object store
(`data_pipeline/storage.py`).
A dataset tokenized with `--val-fraction` holds its held-out samples in `val/`: a complete dataset of this format.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from data_pipeline.storage import Output
from models.core.bits import pack_bits, unpack_bits

FORMAT = "bitdance-binary-tokens/v1"
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
VAL_DIR = "val"  # the held-out validation dataset inside a training dataset's folder (tokenize --val-fraction)


@dataclass
class TokenRecord:
    """One tokenized sample."""

    key: str
    bits: np.ndarray  # packed uint8 [h * w, C / 8], raster order
    h: int
    w: int
    bits_per_token: int
    text_ids: list[int]
    caption: str
    source_key: str
    label: int | None = None
    image_hw: tuple[int, int] = (0, 0)
    scores: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_grid(cls, key: str, grid: torch.Tensor, **meta) -> TokenRecord:
        """From a ±1 latent grid [C, h, w]."""
        c, h, w = grid.shape
        packed = pack_bits(grid.permute(1, 2, 0).reshape(h * w, c)).cpu().numpy()
        return cls(key=key, bits=packed, h=h, w=w, bits_per_token=c, **meta)

    def grid(self) -> torch.Tensor:
        """The ±1 latent grid [C, h, w] (float32)."""
        flat = unpack_bits(torch.from_numpy(np.array(self.bits, dtype=np.uint8)), self.bits_per_token)
        return flat.view(self.h, self.w, self.bits_per_token).permute(2, 0, 1).contiguous()

    def meta(self) -> dict:
        d = asdict(self)
        d.pop("bits")
        d.pop("key")
        d["image_hw"] = list(self.image_hw)
        return d


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # deterministic bytes for identical content
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def write_tar(f: BinaryIO, records: list[TokenRecord]) -> None:
    """The shard tar of `records`, written to the file object `f` (deterministic bytes for identical records)."""
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for r in records:
            _add(tar, f"{r.key}.bits", np.ascontiguousarray(r.bits, dtype=np.uint8).tobytes())
            _add(tar, f"{r.key}.json", json.dumps(r.meta(), sort_keys=True).encode())


def write_shard_atomic(path: Path, records: list[TokenRecord]) -> None:
    """Write the tar to a temporary name in the same directory, fsync, then rename over `path`."""
    Output(Path(path).parent).write(Path(path).name, lambda f: write_tar(f, records))


def write_json_atomic(path: Path, obj) -> None:
    Output(Path(path).parent).write_json(Path(path).name, obj)


def record_from_members(key: str, bits: bytes, meta: bytes | dict) -> TokenRecord:
    m = json.loads(meta) if isinstance(meta, bytes | str) else meta
    arr = np.frombuffer(bits, dtype=np.uint8).reshape(m["h"] * m["w"], m["bits_per_token"] // 8)
    return TokenRecord(
        key=key,
        bits=arr,
        h=m["h"],
        w=m["w"],
        bits_per_token=m["bits_per_token"],
        text_ids=list(m["text_ids"]),
        caption=m["caption"],
        source_key=m["source_key"],
        label=m.get("label"),
        image_hw=tuple(m["image_hw"]),
        scores=dict(m.get("scores", {})),
    )


def read_shard(path: Path | str | BinaryIO) -> list[TokenRecord]:
    """All records of one shard (a local path or an open binary file), in order (plain tarfile; the training loader
    streams with webdataset)."""
    members: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(fileobj=path) if hasattr(path, "read") else tarfile.open(path) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            if key not in members:
                members[key] = {}
                order.append(key)
            members[key][ext] = tar.extractfile(info).read()
    return [record_from_members(k, members[k]["bits"], members[k]["json"]) for k in order]


@dataclass
class ShardStats:
    name: str
    inputs: int = 0
    ok: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)  # kept samples counted under a reason (empty_caption)
    seconds: float = 0.0
    tokens: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # "HxW" (pixels after resize) -> count

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def load_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no {MANIFEST}; run `python -m data_pipeline.tokenize` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, this code reads {FORMAT!r}")
    return manifest
