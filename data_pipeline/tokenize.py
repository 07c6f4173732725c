"""`python -m data_pipeline.tokenize`: the Ray Data job that turns image(-text) data into binary-token shards.

Stage 1 (Ray tasks, CPU) reads one input shard, decodes every sample inside the UDF (bad samples are counted
and skipped with a reason, never crash the job), resizes to the nearest aspect bucket (T2I) or ADM centre
crop (ImageNet), tokenizes the caption, and emits the shard as chunks. Stage 2 (an actor pool, one GPU per
actor when the cluster has GPUs) encodes the chunks in batches with the binary tokenizer. The driver writes
one output shard per input shard, atomically, with its stats and errors, then `manifest.json` and
`errors.jsonl`. Finished shards are skipped on re-runs; a different tokenizer, resolution or filter config is refused.
With `--val-fraction F` the samples whose source key hashes below F (`split_point`) are held out: each input shard's
go to the shard of the same name in `<output>/val/`, a complete dataset of the same format with its own manifest.
The hash sees only the source's own key, so re-runs, other shard layouts and other actor counts hold out the same
samples; the fraction is part of the dataset identity.

Inputs and outputs are local paths or URLs of any filesystem fsspec knows (`--input s3://bucket/raw --output
s3://bucket/tokens`), with that filesystem's own credentials and endpoint (S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles; Ray workers need them in their environment too). Every output file
is written atomically, and a shard's stats are its last object (data_pipeline/storage.py), so finished-shard detection
and resumption are the same on an object store. The tokenizers (--tokenizer, --text-tokenizer) stay local paths.

Filters, each dropping a sample under its own reason in `skipped` (and errors.jsonl), checked in this order: the
source's own errors, `--min-score COLUMN=VALUE` (low_score:COLUMN, or missing_score:COLUMN for a sample without that
score), from the image header `--max-pixels` (too_large), `--max-aspect` (extreme_aspect), `--min-side` (too_small),
`--min-pixels` (too_few_pixels), then decoding, and `--dedup` (duplicate_image): of the samples whose decoded pixels are
equal (`pixel_digest`), the one in the earliest input shard, lowest index in it, is kept: the driver writes shards in
input order (Ray Data with `preserve_order`; a shard done early waits), dropping copies of the digests it has kept. A
resumed job first loads the digests of the finished shards (`<name>.hashes.json`), so a copy in a shard an earlier run
finished is the one kept. The driver holds every kept digest (about 250 bytes a sample). Filter settings are part of
the dataset identity.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m data_pipeline.tokenize \
        --source wds --input /data/tars --output /data/tokens --mode t2i --tokenizer ae_d16c32.safetensors \
        --text-tokenizer /models/Qwen3-14B --parallel-num 16
    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "https://s3.example.internal"}}' -- \
        python -m data_pipeline.tokenize --source wds --input s3://bucket/raw --output s3://bucket/tokens ...
(`env_vars` reach the job's driver and every task and actor; credentials are better an instance role, or exported
on each node before `ray start`, than in the job's runtime env, which the dashboard shows.)
Without --address (and no RAY_ADDRESS, as `ray job submit` sets), a local Ray listening on 127.0.0.1 only is started
(data_pipeline/ray_local.py).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import pickle
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from data_pipeline.image_ops import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_PIXELS,
    SkipSample,
    adm_center_crop,
    decode_image,
    nearest_bucket,
    pixel_digest,
    resize_cover_crop,
)
from data_pipeline.ray_local import connect_ray
from data_pipeline.shard_format import (
    ERRORS,
    FORMAT,
    MANIFEST,
    VAL_DIR,
    ShardStats,
    TokenRecord,
    write_tar,
)
from data_pipeline.sources import (
    DEFAULT_MAX_MEMBER_BYTES,
    SOURCES,
    InputShard,
    SourceConfig,
    iter_samples,
    list_shards,
)
from data_pipeline.storage import Output
from models.t2i.model import OFFICIAL_IMAGE_SIZES
from models.tokenizer.io import load_tokenizer
from models.tokenizer.model import images_to_tensor

CONFIG_FILE = "tokenize_config.json"
CHUNK_BYTES = 128 * 2**20  # decoded pixels per chunk handed from stage 1 to stage 2
HASHES = ".hashes.json"  # --dedup: beside each output shard, {key: pixel digest} of its samples
FAULT_MARKER = ".fault-injected"


@dataclass
class TokenizeConfig:
    source: str  # a name registered in data_pipeline.sources.SOURCES (or a "package.module:Class" plugin)
    input: str
    output: str
    tokenizer: str  # image tokenizer weights (ae_*.safetensors / .pt) or a folder holding them
    mode: str = "t2i"  # "t2i": aspect buckets + captions; "imagenet": centre crop + labels
    text_tokenizer: str | None = None  # local Hugging Face tokenizer folder (t2i)
    parallel_num: int = 16  # the model's P: fixes the <|query_k|> tokens added to the text tokenizer
    sizes: list[tuple[int, int]] = field(default_factory=lambda: list(OFFICIAL_IMAGE_SIZES))
    image_size: int = 256
    batch_size: int = 32
    chunk_samples: int = 256
    num_actors: int | None = None
    address: str | None = None
    num_cpus: int | None = None  # local Ray only
    max_pixels: int = DEFAULT_MAX_PIXELS
    val_fraction: float = 0.0  # share of samples held out to <output>/val/ (by `split_point` of the source key)
    # filters: each skips and counts under its own reason; part of the dataset identity when set (`filters`)
    min_side: int = 0  # the decoded image's short side at least this many pixels (too_small); 0: off
    min_pixels: int = 0  # width * height at least this (too_few_pixels); 0: off
    max_aspect: float = DEFAULT_MAX_ASPECT  # long side / short side at most (extreme_aspect)
    min_score: dict[str, float] = field(default_factory=dict)  # score column -> lowest kept value (low_score:COLUMN)
    dedup: bool = False  # one copy of equal decoded pixels (duplicate_image)
    # a limit for pathological samples (skipped and counted; not part of the dataset identity)
    max_member_mb: int = DEFAULT_MAX_MEMBER_BYTES >> 20
    samples_per_shard: int = 1000
    image_column: str = "image"
    caption_column: str = "caption"
    score_columns: tuple[str, ...] = ()  # parquet: numeric columns kept as sample scores (json: every number)
    class_index: str | None = None
    fault_kill_after: int | None = None  # testing: the encoder (a Ray actor; local: the job) dies once after N chunks

    def __post_init__(self) -> None:
        SOURCES.get(self.source)
        if self.mode not in ("t2i", "imagenet"):
            raise ValueError(f"--mode must be t2i or imagenet, got {self.mode!r}")
        if self.mode == "t2i" and not self.text_tokenizer:
            raise ValueError("--mode t2i needs --text-tokenizer (a local Hugging Face tokenizer folder)")
        self.sizes = [tuple(s) for s in self.sizes]
        if self.batch_size < 1 or self.chunk_samples < 1:
            raise ValueError("--batch-size and --chunk-samples must be >= 1")
        for flag, value in (("--num-cpus", self.num_cpus), ("--num-actors", self.num_actors)):
            if value is not None and value < 1:  # a local Ray with 0 CPUs schedules nothing: the job would hang
                raise ValueError(f"{flag} must be >= 1, got {value}")
        root = math.isqrt(self.parallel_num) if self.parallel_num > 0 else 0
        if self.mode == "t2i" and root * root != self.parallel_num:
            raise ValueError(f"--parallel-num must be a square number (1, 4, 16, 64, ...), got {self.parallel_num}")
        if self.mode == "t2i" and (not self.sizes or any(h < 1 or w < 1 for h, w in self.sizes)):
            bad = next((f"{h}x{w}" for h, w in self.sizes if h < 1 or w < 1), "none")
            raise ValueError(f"--size needs positive sides (e.g. 512x512), got {bad}")
        for flag, value in (
            ("--image-size", self.image_size),
            ("--samples-per-shard", self.samples_per_shard),
            ("--max-pixels", self.max_pixels),
            ("--max-member-mb", self.max_member_mb),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if not self.max_aspect >= 1.0:
            raise ValueError(f"--max-aspect must be >= 1, got {self.max_aspect}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        for flag, value in (("--min-side", self.min_side), ("--min-pixels", self.min_pixels)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0 (0: off), got {value}")
        self.min_score = {str(c): float(v) for c, v in sorted(self.min_score.items())}
        for column, value in self.min_score.items():
            if not column or not math.isfinite(value):
                raise ValueError(f"--min-score needs COLUMN=VALUE with a finite VALUE, got {column}={value}")
        missing = sorted(set(self.min_score) - set(self.score_columns))
        if SOURCES.get(self.source).scores_need_columns and missing:
            column = missing[0]
            raise ValueError(f"--min-score {column} needs {column} in --score-columns (the source reads only those)")

    def filters(self) -> dict:
        """The filters that are on, as the dataset identity records them (none: today's identity)."""
        on: dict = {}
        if self.min_side:
            on["min_side"] = self.min_side
        if self.min_pixels:
            on["min_pixels"] = self.min_pixels
        if self.max_aspect != DEFAULT_MAX_ASPECT:
            on["max_aspect"] = self.max_aspect
        if self.min_score:
            on["min_score"] = dict(self.min_score)
        if self.dedup:
            on["dedup"] = True
        return on

    def source_config(self) -> SourceConfig:
        return SourceConfig(
            self.source,
            self.input,
            samples_per_shard=self.samples_per_shard,
            image_column=self.image_column,
            caption_column=self.caption_column,
            score_columns=tuple(self.score_columns),
            class_index=self.class_index,
            max_member_bytes=self.max_member_mb << 20,
        )


# ---------------------------------------------------------------- identity of a tokenized dataset
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@functools.cache
def _text_tokenizer(path: str, parallel_num: int):
    from models.t2i.text_tokenizer import T2ITextTokenizer

    return T2ITextTokenizer.from_folder(path, parallel_num)


def dataset_identity(cfg: TokenizeConfig) -> dict:
    """Everything that changes the output bits or token ids; its hash must match to add shards to a dataset."""
    ae = load_tokenizer(cfg.tokenizer)
    weights = sorted(p for p in Path(cfg.tokenizer).glob("ae*") if p.suffix in (".safetensors", ".pt"))
    weights_file = Path(cfg.tokenizer) if Path(cfg.tokenizer).is_file() else weights[0]
    ident = {
        "format": FORMAT,
        "mode": cfg.mode,
        "image_tokenizer": ae.config.to_ddconfig(),
        "gan_decoder": ae.config.gan_decoder,
        "image_tokenizer_sha256": _file_digest(weights_file),
        "max_pixels": cfg.max_pixels,
    }
    if cfg.mode == "t2i":
        ident["sizes"] = [list(s) for s in cfg.sizes]
        ident["text_tokenizer"] = _text_tokenizer(cfg.text_tokenizer, cfg.parallel_num).fingerprint()
    else:
        ident["image_size"] = cfg.image_size
    if cfg.val_fraction > 0:  # (absent at 0, so datasets without a split keep their identity)
        ident["val_fraction"] = cfg.val_fraction
    ident.update(cfg.filters())  # (likewise: only the filters that are on)
    return ident


def identity_hash(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def check_or_claim_output(out: Output, ident: dict) -> None:
    digest = identity_hash(ident)
    if out.exists(CONFIG_FILE):
        old = json.loads(out.read_bytes(CONFIG_FILE))
        finished = any(n.endswith(".stats.json") for n in out.names() | out.sub(VAL_DIR).names())
        if old["hash"] != digest and finished:
            changed = sorted(k for k in set(old["identity"]) | set(ident) if old["identity"].get(k) != ident.get(k))
            raise SystemExit(
                f"{out} holds shards tokenized with another config (differs in: {', '.join(changed)}); "
                "use a new --output or delete the old shards"
            )
        if old["hash"] == digest:
            return
        print(f"{out} was claimed by another config but holds no finished shard: claiming it for this one")
    out.write_json(CONFIG_FILE, {"hash": digest, "identity": ident})


# ---------------------------------------------------------------- held-out validation split
def split_point(source_key: str) -> float:
    """A sample's stable position in [0, 1): the first 53 bits of sha256 of its source key (folder / imagenet: the
    path below the input root; wds: the member key; parquet: `<file stem>/<row>`), independent of the shard layout."""
    digest = hashlib.sha256(source_key.encode("utf-8", "surrogatepass")).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2**53


def in_val(source_key: str, val_fraction: float) -> bool:
    """Whether a sample (kept or skipped) belongs to the held-out validation dataset."""
    return val_fraction > 0 and split_point(source_key) < val_fraction


# ---------------------------------------------------------------- stage 1: read + decode (Ray tasks)
def check_scores(scores: dict[str, float], min_score: dict[str, float]) -> None:
    """SkipSample unless every `--min-score` column is among the sample's scores and at least its value."""
    for column, lowest in min_score.items():
        value = scores.get(column)
        if value is None:
            raise SkipSample(f"missing_score:{column}", f"no {column} score (has {sorted(scores)})")
        if value < lowest:
            raise SkipSample(f"low_score:{column}", f"{column} {value} < --min-score {lowest}")


def _prepare(raw, cfg: TokenizeConfig) -> dict:
    check_scores(raw.scores, cfg.min_score)
    img = decode_image(raw.image, cfg.max_pixels, cfg.max_aspect, cfg.min_side, cfg.min_pixels)
    digest = pixel_digest(img) if cfg.dedup else None
    if cfg.mode == "t2i":
        height, width = nearest_bucket(img.height, img.width, cfg.sizes)
        pixels = resize_cover_crop(img, height, width)
        tok = _text_tokenizer(cfg.text_tokenizer, cfg.parallel_num)
        text_ids = tok.prompt_ids(raw.caption) if raw.caption else tok.uncond_ids()  # empty: unconditional
    else:
        pixels, text_ids = adm_center_crop(img, cfg.image_size), []
    return {
        "pixels": pixels,
        "caption": raw.caption,
        "label": raw.label,
        "text_ids": text_ids,
        "source_key": raw.key,
        "scores": raw.scores,
        "note": raw.note,
        "digest": digest,
    }


def _error(shard: InputShard, key: str, raw, reason: str, detail: str) -> dict:
    return {"shard": shard.name, "key": key, "source_key": raw.key, "reason": reason, "detail": detail[:300]}


def decode_shard(shard: InputShard, cfg: TokenizeConfig) -> list[dict]:
    """Chunks of one input shard: decoded samples (keyed by their index in the shard) plus skipped ones."""
    start = time.perf_counter()
    samples, errors, notes, val_notes, n = [], [], Counter(), Counter(), 0
    for n, raw in enumerate(iter_samples(shard, cfg.source_config(), need_caption=cfg.mode == "t2i"), start=1):
        key = f"{shard.name}-{n - 1:06d}"
        try:
            if raw.error:
                raise SkipSample(raw.error, raw.detail)
            samples.append({"key": key, **_prepare(raw, cfg)})
            if raw.note:
                notes[raw.note] += 1
                if in_val(raw.key, cfg.val_fraction):
                    val_notes[raw.note] += 1
        except SkipSample as e:
            errors.append(_error(shard, key, raw, e.reason, e.detail))
        except MemoryError:  # one sample never fails its shard
            errors.append(_error(shard, key, raw, "out_of_memory", "MemoryError while decoding or resizing"))
        except Exception as e:  # noqa: BLE001 - counted with its error, never fails the shard
            errors.append(_error(shard, key, raw, "processing_error", f"{type(e).__name__}: {e}"))
    chunks, cur, size = [], [], 0
    for s in samples:
        if cur and (len(cur) >= cfg.chunk_samples or size + s["pixels"].nbytes > CHUNK_BYTES):
            chunks.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += s["pixels"].nbytes
    chunks.append(cur)
    head = {"inputs": n, "errors": errors, "notes": dict(notes), "val_notes": dict(val_notes)}
    head["decode_seconds"] = time.perf_counter() - start
    return [{"samples": c, **(head if i == 0 else {})} for i, c in enumerate(chunks)]


def decode_batch(batch: dict, cfg_json: str) -> dict:
    cfg = TokenizeConfig(**json.loads(cfg_json))
    out = {"shard": [], "chunk": [], "n_chunks": [], "payload": []}
    for item in batch["shard"]:
        shard = InputShard(**json.loads(item))
        chunks = decode_shard(shard, cfg)
        for i, chunk in enumerate(chunks):
            out["shard"].append(shard.name)
            out["chunk"].append(i)
            out["n_chunks"].append(len(chunks))
            out["payload"].append(pickle.dumps(chunk, protocol=5))
    return out


# ---------------------------------------------------------------- stage 2: encode (actor pool)
class ChunkEncoder:
    """Holds the binary tokenizer on its device; encodes same-size images in batches of `batch_size`."""

    def __init__(self, cfg_json: str):
        self.cfg = TokenizeConfig(**json.loads(cfg_json))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.ae = load_tokenizer(self.cfg.tokenizer, device=self.device)
        self.done = 0

    def encode_chunk(self, chunk: dict) -> dict:
        """A decoded chunk with its samples replaced by their records (with --dedup: each one's (digest, note))."""
        samples = chunk.pop("samples")
        start = time.perf_counter()
        chunk["records"] = self.encode(samples)
        chunk["encode_seconds"] = time.perf_counter() - start
        if self.cfg.dedup:
            chunk["dedup"] = [(s["digest"], s["note"]) for s in samples]
        self.done += 1
        self._maybe_die()
        return chunk

    @torch.no_grad()
    def encode(self, samples: list[dict]) -> list[TokenRecord]:
        records: dict[str, TokenRecord] = {}
        by_size: dict[tuple, list[dict]] = {}
        for s in samples:
            by_size.setdefault(s["pixels"].shape, []).append(s)
        for group in by_size.values():
            for i in range(0, len(group), self.cfg.batch_size):
                part = group[i : i + self.cfg.batch_size]
                x = images_to_tensor(torch.from_numpy(np.stack([s["pixels"] for s in part]))).to(self.device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
                    bits = self.ae.encode(x).bits
                for s, grid in zip(part, bits.float().cpu(), strict=True):
                    records[s["key"]] = TokenRecord.from_grid(
                        s["key"],
                        grid,
                        text_ids=s["text_ids"],
                        caption=s["caption"],
                        source_key=s["source_key"],
                        label=s["label"],
                        image_hw=tuple(s["pixels"].shape[:2]),
                        scores=s["scores"],
                    )
        return [records[s["key"]] for s in samples]

    def _maybe_die(self) -> None:
        limit = self.cfg.fault_kill_after
        if limit is None or self.done < limit:
            return
        out = Output(self.cfg.output)
        if not out.exists(FAULT_MARKER):
            out.write_bytes(FAULT_MARKER, b"killed once\n")
            os._exit(1)  # simulate a crashed worker / preempted node before the result is returned

    def __call__(self, batch: dict) -> dict:
        payloads = [pickle.dumps(self.encode_chunk(pickle.loads(blob)), protocol=5) for blob in batch["payload"]]
        return {"shard": batch["shard"], "chunk": batch["chunk"], "n_chunks": batch["n_chunks"], "payload": payloads}


# ---------------------------------------------------------------- driver
def finished_shards(out: Output, val_fraction: float = 0.0) -> set[str]:
    """The input shards whose output shard (and, with a split, val shard) is finished: its tar and its stats, the last
    object written for it. One listing per folder, also on an object store."""

    def done(folder: Output) -> set[str]:
        names = folder.names()
        stems = {n.removesuffix(".stats.json") for n in names if n.endswith(".stats.json")}
        return {stem for stem in stems if f"{stem}.tar" in names}

    sides = [out, out.sub(VAL_DIR)] if val_fraction > 0 else [out]
    return set.intersection(*(done(side) for side in sides))


class Dedup:
    """`--dedup`: the pixel digest of every sample kept so far in the job, with its key. Fed shards in input order, it
    keeps the copy in the earliest input shard (lowest index in it); a resumed job first loads the digests of the
    shards an earlier run finished, whose copies are then the ones kept."""

    def __init__(self) -> None:
        self.kept: dict[str, str] = {}  # digest -> key of the sample kept

    def load(self, out: Output, names: list[str], val_fraction: float) -> None:
        for side in [out, out.sub(VAL_DIR)] if val_fraction > 0 else [out]:
            for blob in side.read_many([f"{n}{HASHES}" for n in names]):
                for key, digest in json.loads(blob).items():
                    self.kept.setdefault(digest, key)

    def claim(self, shard: str, records: list[TokenRecord], info: list[tuple[str, str | None]]):
        """(records kept, their digests by key, [(duplicate_image error, its note)] of the records dropped)."""
        kept, digests, dropped = [], {}, []
        for r, (digest, note) in zip(records, info, strict=True):
            first = self.kept.setdefault(digest, r.key)
            if first == r.key:
                kept.append(r)
                digests[r.key] = digest
                continue
            detail = f"the same pixels as {first}, kept (sha256 {digest[:16]})"
            error = {"shard": shard, "key": r.key, "source_key": r.source_key, "reason": "duplicate_image"}
            dropped.append(({**error, "detail": detail}, note))
        return kept, digests, dropped


def _write_shard(
    out: Output,
    name: str,
    records: list[TokenRecord],
    errors: list[dict],
    notes: dict,
    seconds: float,
    digests: dict[str, str] | None = None,
) -> None:
    """One output shard, its errors (and digests), then its stats (written last: they mark the shard as finished)."""
    stats = ShardStats(name=f"{name}.tar", inputs=len(records) + len(errors), ok=len(records))
    for e in errors:
        stats.skip(e["reason"])
    stats.notes = dict(sorted((+Counter(notes)).items()))
    stats.seconds = seconds
    stats.tokens = sum(r.h * r.w for r in records)
    stats.sizes = dict(Counter(f"{r.image_hw[0]}x{r.image_hw[1]}" for r in records))
    out.write(f"{name}.tar", lambda f: write_tar(f, records))
    out.write_bytes(f"{name}.errors.jsonl", "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
    if digests is not None:
        out.write_json(f"{name}{HASHES}", {r.key: digests[r.key] for r in records})
    out.write_json(f"{name}.stats.json", asdict(stats))


def _finish_shard(
    out: Output, name: str, chunks: dict[int, dict], val_fraction: float = 0.0, dedup: Dedup | None = None
) -> None:
    """Write the output shard of one input shard. With --dedup, duplicates of samples kept before are dropped first.
    With a split its held-out samples (and skipped ones) go to the val shard of the same name, written first, so the
    train shard's stats mark the whole input shard as finished; both sides record the time of the whole input shard."""
    parts = [chunks[i] for i in sorted(chunks)]
    head = parts[0]
    records, errors = [r for p in parts for r in p["records"]], list(head["errors"])
    notes, val_notes = Counter(head["notes"]), Counter(head["val_notes"])
    if len(records) + len(errors) != head["inputs"]:
        got = len(records) + len(errors)
        raise RuntimeError(f"input shard {name}: {head['inputs']} samples read, {got} came back; rerun to redo it")
    seconds = round(head["decode_seconds"] + sum(p["encode_seconds"] for p in parts), 3)
    digests = None
    if dedup is not None:
        records, digests, dropped = dedup.claim(name, records, [x for p in parts for x in p["dedup"]])
        for error, note in dropped:
            if note:  # a note counts kept samples only
                notes[note] -= 1
                val_notes[note] -= in_val(error["source_key"], val_fraction)
        errors = sorted(errors + [e for e, _ in dropped], key=lambda e: e["key"])  # in the order of the input
    if val_fraction > 0:
        val = [r for r in records if in_val(r.source_key, val_fraction)]
        val_errors = [e for e in errors if in_val(e["source_key"], val_fraction)]
        _write_shard(out.sub(VAL_DIR), name, val, val_errors, val_notes, seconds, digests)
        records = [r for r in records if not in_val(r.source_key, val_fraction)]
        errors = [e for e in errors if not in_val(e["source_key"], val_fraction)]
        notes -= val_notes
    _write_shard(out, name, records, errors, notes, seconds, digests)


class OutputWriter:
    """Writes the output shards of the input shards in `todo` as their chunks come back: at once, or with --dedup
    strictly in the order of `todo` (a shard waits for the earlier ones), so which copy of a duplicate is kept does not
    depend on which task finished first."""

    def __init__(self, out: Output, cfg: TokenizeConfig, todo: list[InputShard], dedup: Dedup | None):
        self.out, self.cfg, self.dedup = out, cfg, dedup
        self.order, self.next = [s.name for s in todo], 0
        self.waiting: dict[str, dict[int, dict]] = {}

    def add(self, name: str, chunks: dict[int, dict]) -> int:
        """Hand over the complete chunks of one input shard; returns how many shards were written."""
        if self.dedup is None:
            _finish_shard(self.out, name, chunks, self.cfg.val_fraction)
            return 1
        self.waiting[name] = chunks
        written = 0
        while self.next < len(self.order) and self.order[self.next] in self.waiting:
            first = self.order[self.next]
            _finish_shard(self.out, first, self.waiting.pop(first), self.cfg.val_fraction, self.dedup)
            self.next, written = self.next + 1, written + 1
        return written


def write_manifest(
    out: Output, cfg: TokenizeConfig, shards: list[InputShard], ident: dict, split: str | None = None
) -> dict:
    """The manifest (and errors.jsonl) of the finished shards in `out`. With a split (`"train"` / `"val"`) it records
    the side and `val_fraction`; a val manifest lists only the val shards holding samples (with a small fraction most
    are empty, and the loader gives each slot whole shards), while its counts cover every input shard."""
    stats = [json.loads(blob) for blob in out.read_many([f"{s.name}.stats.json" for s in shards])]
    listed = [st for st in stats if st["ok"]] if split == "val" else stats
    skipped: Counter = Counter()
    notes: Counter = Counter()
    sizes: Counter = Counter()
    for st in stats:
        skipped.update(st["skipped"])
        notes.update(st.get("notes", {}))
        sizes.update(st["sizes"])
    dd = ident["image_tokenizer"]  # the tokenizer's ddconfig, read once by dataset_identity
    manifest = {
        "format": FORMAT,
        "kind": cfg.mode,
        "config_hash": identity_hash(ident),
        "identity": ident,
        "bits_per_token": dd["z_channels"],
        "downsample": 2 ** (len(dd["ch_mult"]) - 1),
        "shards": [{"name": st["name"], "samples": st["ok"], "tokens": st["tokens"]} for st in listed],
        "samples": sum(st["ok"] for st in stats),
        "inputs": sum(st["inputs"] for st in stats),
        "skipped": dict(sorted(skipped.items())),
        "notes": dict(sorted(notes.items())),  # kept samples counted under a reason (empty_caption)
        "size_histogram": dict(sorted(sizes.items())),
    }
    if split is not None:
        manifest.update(split=split, val_fraction=cfg.val_fraction)
    if cfg.mode == "t2i":
        tok = _text_tokenizer(cfg.text_tokenizer, cfg.parallel_num)
        manifest["text_tokens"] = {
            "pad_id": tok.pad_id,
            "vision_start_id": tok.vision_start_id,
            "res_ids": [tok.res_id(k) for k in range(1, tok.num_res_tokens + 1)],
            "query_ids": tok.query_ids(),
            "uncond_ids": tok.uncond_ids(),
            "parallel_num": cfg.parallel_num,
            "vocab_size": len(tok),
        }
    out.write_bytes(ERRORS, b"".join(out.read_many([f"{s.name}.errors.jsonl" for s in shards])))
    out.write_json(MANIFEST, manifest)
    return manifest


def _output_inside_input(inp: str, out: str) -> bool:
    """Whether the output folder is the input folder or inside it (the next run would read its shards as input)."""
    (in_fs, in_root), (out_fs, out_root) = fsspec.core.url_to_fs(inp), fsspec.core.url_to_fs(out)
    if isinstance(in_fs, LocalFileSystem) and isinstance(out_fs, LocalFileSystem):
        i, o = Path(in_root).resolve(), Path(out_root).resolve()
        return i.is_dir() and (o == i or i in o.parents)
    if in_fs.protocol != out_fs.protocol:
        return False
    i, o = in_root.rstrip("/"), out_root.rstrip("/")
    return o == i or o.startswith(f"{i}/")


def check_paths(cfg: TokenizeConfig) -> list[InputShard]:
    """The input shards, or a one-line SystemExit for inputs, outputs and tokenizers that cannot work, before
    anything is created."""
    fs, root = fsspec.core.url_to_fs(cfg.input)
    fs.invalidate_cache()  # listings cached by an earlier job in this process may be stale
    if not fs.exists(root):
        raise SystemExit(f"--input {cfg.input} does not exist")
    out = Output(cfg.output)
    out.refresh()
    if out.is_file():
        raise SystemExit(f"--output {cfg.output} is a file; give a folder (new or holding earlier shards)")
    if _output_inside_input(cfg.input, cfg.output):
        raise SystemExit(
            f"--output {cfg.output} is inside --input {cfg.input}: the next run would read its shards back as input; "
            "choose an output folder outside the input"
        )
    for flag, path in (("--tokenizer", cfg.tokenizer), ("--text-tokenizer", cfg.text_tokenizer)):
        if path is not None and not Path(path).exists():
            raise SystemExit(f"{flag} {path} does not exist")
    try:
        return list_shards(cfg.source_config())
    except (ValueError, FileNotFoundError) as e:
        looks_for = SOURCES.get(cfg.source).looks_for
        raise SystemExit(f"{str(e).splitlines()[0]} (looked for {looks_for}; check --input and --source)") from None


def _claim(out: Output, ident: dict) -> None:
    """`check_or_claim_output`, its first write turned into a one-line error where the output cannot be written."""
    try:
        check_or_claim_output(out, ident)
    except (FileNotFoundError, PermissionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SystemExit(
            f"--output {out} cannot be written ({first}); check that the folder or bucket exists and that the "
            "credentials may write there"
        ) from None


def run_tokenize(cfg: TokenizeConfig, local: bool = False) -> dict:
    """Tokenize every unfinished input shard and (re)write the manifest; returns the manifest.
    `local=True` does the same work in this process without Ray (small data, tests, baselines)."""
    shards = check_paths(cfg)
    out = Output(cfg.output)
    ident = dataset_identity(cfg)
    out.make()
    _claim(out, ident)
    if cfg.val_fraction > 0:
        out.sub(VAL_DIR).make()
    dupes = [n for n, c in Counter(s.name for s in shards).items() if c > 1]
    if dupes:
        raise SystemExit(f"input shards map to the same output names: {dupes[:5]}")
    finished = finished_shards(out, cfg.val_fraction)
    todo = [s for s in shards if s.name not in finished]
    print(f"{len(shards)} input shards, {len(shards) - len(todo)} already done, {len(todo)} to tokenize")
    if todo:
        dedup = None
        if cfg.dedup:
            dedup = Dedup()
            dedup.load(out, [s.name for s in shards if s.name in finished], cfg.val_fraction)
        (_run_local if local else _run_ray)(cfg, todo, OutputWriter(out, cfg, todo, dedup))
    if not cfg.val_fraction:
        manifest = write_manifest(out, cfg, shards, ident)
        skipped = manifest["skipped"] or "none"
        print(f"{manifest['samples']} samples in {len(shards)} shards, skipped {skipped} -> {out}")
        return manifest
    val_out = out.sub(VAL_DIR)
    val = write_manifest(val_out, cfg, shards, ident, split="val")  # first: training looks for it beside
    manifest = write_manifest(out, cfg, shards, ident, split="train")
    skipped = dict(sorted((Counter(manifest["skipped"]) + Counter(val["skipped"])).items()))
    print(
        f"{manifest['samples']} train samples -> {out}, {val['samples']} val samples -> {val_out} "
        f"(--val-fraction {cfg.val_fraction}) from {len(shards)} shards, skipped {skipped or 'none'}"
    )
    return manifest


def _run_local(cfg: TokenizeConfig, todo: list[InputShard], writer: OutputWriter) -> None:
    encoder = ChunkEncoder(json.dumps(asdict(cfg)))
    for shard in tqdm(todo, desc="tokenizing (local)", unit="shard"):
        chunks = {i: encoder.encode_chunk(chunk) for i, chunk in enumerate(decode_shard(shard, cfg))}
        writer.add(shard.name, chunks)


def _run_ray(cfg: TokenizeConfig, todo: list[InputShard], writer: OutputWriter) -> None:
    ray = connect_ray(cfg.address, cfg.num_cpus)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = cfg.dedup  # shards are written in input order: Ray holds what comes early
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = cfg.num_actors or (gpus if gpus else max(1, cpus // 2))
    cfg_json = json.dumps(asdict(cfg))
    ds = ray.data.from_items([{"shard": json.dumps(asdict(s))} for s in todo], override_num_blocks=len(todo))
    # Decode tasks reserve the memory of the decoded pixels they hold; as their resources differ from the encoder
    # actors', Ray Data does not fuse the two stages, so decoding overlaps encoding instead of running inside it.
    ds = ds.map_batches(
        decode_batch, batch_size=1, fn_kwargs={"cfg_json": cfg_json}, num_cpus=1, memory=2 * CHUNK_BYTES
    )
    ds = ds.map_batches(
        ChunkEncoder,
        batch_size=1,
        fn_constructor_kwargs={"cfg_json": cfg_json},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
        num_cpus=0 if gpus else 1,
    )  # (Ray Data restarts dead actors and retries their tasks: max_restarts = max_task_retries = -1)
    pending: dict[str, dict[int, dict]] = {}
    with tqdm(total=len(todo), desc="tokenizing", unit="shard") as bar:
        for row in ds.iter_rows():
            chunks = pending.setdefault(row["shard"], {})
            chunks[int(row["chunk"])] = pickle.loads(row["payload"])  # a retried chunk replaces its duplicate
            if len(chunks) == int(row["n_chunks"]):
                bar.update(writer.add(row["shard"], pending.pop(row["shard"])))
    left = sorted(pending) + sorted(writer.waiting)
    if left:
        raise RuntimeError(f"shards left incomplete by the Ray job: {left[:5]}")


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    if not (h.isdigit() and w.isdigit()):
        raise argparse.ArgumentTypeError(f"size must look like 512x512 (HxW), got {text!r}")
    return int(h), int(w)


def _min_score(text: str) -> tuple[str, float]:
    column, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not column.strip() or not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must look like COLUMN=VALUE (e.g. aesthetic=5.5), got {text!r}")
    return column.strip(), number


def parse_args(argv: list[str] | None = None) -> TokenizeConfig:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.tokenize", description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=SOURCES.names(), required=True)
    p.add_argument("--input", required=True, help="tar/parquet file or folder: a local path or a URL (s3://...)")
    p.add_argument("--output", required=True, help="a local folder or a URL (s3://bucket/prefix)")
    p.add_argument("--tokenizer", required=True, help="image tokenizer: ae_*.safetensors (+ config json) or .pt")
    p.add_argument("--mode", choices=("t2i", "imagenet"), default="t2i")
    p.add_argument("--text-tokenizer", help="local Hugging Face tokenizer folder (t2i)")
    p.add_argument("--parallel-num", type=int, default=16, help="the model's P (sets the query tokens)")
    p.add_argument("--size", type=_size, action="append", dest="sizes", help="T2I bucket HxW (repeatable)")
    p.add_argument("--image-size", type=int, default=256, help="ImageNet crop size")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder forward")
    p.add_argument("--num-actors", type=int, help="encoder actors (default: one per GPU, else CPUs / 2)")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="folder/imagenet sources")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="caption")
    p.add_argument(
        "--score-columns",
        type=lambda v: tuple(c for c in v.split(",") if c),
        default=(),
        help="parquet: comma-separated numeric columns kept as sample scores (for data.subset.score); json "
        "sidecars and webdataset json members keep every top-level number",
    )
    p.add_argument("--class-index", help="ImageNet class index (json or one wnid per line)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="share of the samples held out (by a hash of each source key) as a validation dataset in <output>/val/",
    )
    p.add_argument(
        "--max-aspect", type=float, default=DEFAULT_MAX_ASPECT, help="long side / short side at most (extreme_aspect)"
    )
    p.add_argument("--min-side", type=int, default=0, help="skip images whose short side is below this (too_small)")
    p.add_argument("--min-pixels", type=int, default=0, help="skip images of fewer pixels, w x h (too_few_pixels)")
    p.add_argument(
        "--min-score",
        type=_min_score,
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="skip samples whose score COLUMN is below VALUE (low_score:COLUMN) or absent (missing_score:COLUMN); "
        "repeatable. Parquet: COLUMN must be among --score-columns",
    )
    p.add_argument(
        "--dedup",
        action="store_true",
        help="keep one copy of images whose decoded pixels are equal (the earliest; the others: duplicate_image)",
    )
    p.add_argument("--max-member-mb", type=int, default=DEFAULT_MAX_MEMBER_BYTES >> 20, help="largest image file read")
    p.add_argument("--fault-kill-after", type=int, help=argparse.SUPPRESS)
    a = vars(p.parse_args(argv))
    if a["sizes"] is None:
        a.pop("sizes")
    columns = [c for c, _ in a["min_score"]]
    twice = next((c for c in columns if columns.count(c) > 1), None)
    if twice:
        p.exit(2, f"error: --min-score {twice} is given twice; give each column once\n")
    a["min_score"] = dict(a["min_score"])
    try:
        return TokenizeConfig(**a)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"error: {str(e).splitlines()[0]}\n")


def main(argv: list[str] | None = None) -> None:
    run_tokenize(parse_args(argv))


if __name__ == "__main__":
    # Run through the importable module, so Ray pickles functions by reference to data_pipeline.tokenize
    # rather than to __main__ (which workers cannot import).
    from data_pipeline.tokenize import main as _main

    _main()
