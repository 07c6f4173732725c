"""`python -m data_pipeline.tokenize`: the Ray Data job that turns image(-text) data into binary-token shards.

Stage 1 (Ray tasks, CPU) reads one input shard, decodes every sample inside the UDF (bad samples are counted
and skipped with a reason, never crash the job), resizes to the nearest aspect bucket (T2I) or ADM centre
crop (ImageNet), tokenizes the caption, and emits the shard as chunks. Stage 2 (an actor pool, one GPU per
actor when the cluster has GPUs) encodes the chunks in batches with the binary tokenizer. The driver writes
one output shard per input shard, atomically, with its stats and errors, then `manifest.json` and
`errors.jsonl`. Finished shards are skipped on re-runs; a different tokenizer or resolution config is refused.
With `--val-fraction F` the samples whose source key hashes below F (`split_point`) are held out: each input shard's
go to the shard of the same name in `<output>/val/`, a complete dataset of the same format with its own manifest.
The hash sees only the source's own key, so re-runs, other shard layouts and other actor counts hold out the same
samples; the fraction is part of the dataset identity.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m data_pipeline.tokenize \
        --source wds --input /data/tars --output /data/tokens --mode t2i --tokenizer ae_d16c32.safetensors \
        --text-tokenizer /models/Qwen3-14B --parallel-num 16
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
from tqdm import tqdm

from data_pipeline.image_ops import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_PIXELS,
    SkipSample,
    adm_center_crop,
    decode_image,
    nearest_bucket,
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
    write_json_atomic,
    write_shard_atomic,
)
from data_pipeline.sources import (
    DEFAULT_MAX_MEMBER_BYTES,
    SOURCES,
    InputShard,
    SourceConfig,
    iter_samples,
    list_shards,
)
from models.t2i.model import OFFICIAL_IMAGE_SIZES
from models.tokenizer.io import load_tokenizer
from models.tokenizer.model import images_to_tensor

CONFIG_FILE = "tokenize_config.json"
CHUNK_BYTES = 128 * 2**20  # decoded pixels per chunk handed from stage 1 to stage 2


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
    # limits for pathological samples (skipped and counted; not part of the dataset identity)
    max_aspect: float = DEFAULT_MAX_ASPECT
    max_member_mb: int = DEFAULT_MAX_MEMBER_BYTES >> 20
    samples_per_shard: int = 1000
    image_column: str = "image"
    caption_column: str = "caption"
    score_columns: tuple[str, ...] = ()  # parquet: numeric columns kept as sample scores (json: every number)
    class_index: str | None = None
    fault_kill_after: int | None = None  # testing: an encoder actor dies once after this many chunks

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
    return ident


def identity_hash(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def check_or_claim_output(out: Path, ident: dict) -> None:
    path = out / CONFIG_FILE
    digest = identity_hash(ident)
    if path.is_file():
        old = json.loads(path.read_text())
        finished = any(out.glob("*.stats.json")) or any((out / VAL_DIR).glob("*.stats.json"))
        if old["hash"] != digest and finished:
            changed = sorted(k for k in set(old["identity"]) | set(ident) if old["identity"].get(k) != ident.get(k))
            raise SystemExit(
                f"{out} holds shards tokenized with another config (differs in: {', '.join(changed)}); "
                "use a new --output or delete the old shards"
            )
        if old["hash"] == digest:
            return
        print(f"{out} was claimed by another config but holds no finished shard: claiming it for this one")
    write_json_atomic(path, {"hash": digest, "identity": ident})


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
def _prepare(raw, cfg: TokenizeConfig) -> dict:
    img = decode_image(raw.image, cfg.max_pixels, cfg.max_aspect)
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
        marker = Path(self.cfg.output) / ".fault-injected"
        if not marker.exists():
            marker.write_text("killed once\n")
            os._exit(1)  # simulate a crashed worker / preempted node before the result is returned

    def __call__(self, batch: dict) -> dict:
        payloads = []
        for blob in batch["payload"]:
            chunk = pickle.loads(blob)
            start = time.perf_counter()
            chunk["records"] = self.encode(chunk.pop("samples"))
            chunk["encode_seconds"] = time.perf_counter() - start
            self.done += 1
            self._maybe_die()
            payloads.append(pickle.dumps(chunk, protocol=5))
        return {"shard": batch["shard"], "chunk": batch["chunk"], "n_chunks": batch["n_chunks"], "payload": payloads}


# ---------------------------------------------------------------- driver
def _shard_done(out: Path, name: str, val_fraction: float = 0.0) -> bool:
    """Whether the output shard of an input shard (and, with a split, its val shard) is finished."""
    dirs = [out / VAL_DIR, out] if val_fraction > 0 else [out]
    return all((d / f"{name}.tar").is_file() and (d / f"{name}.stats.json").is_file() for d in dirs)


def _write_shard(
    out: Path, name: str, records: list[TokenRecord], errors: list[dict], notes: dict, seconds: float
) -> None:
    """One output shard, its errors, then its stats (written last: they mark the shard as finished)."""
    stats = ShardStats(name=f"{name}.tar", inputs=len(records) + len(errors), ok=len(records))
    for e in errors:
        stats.skip(e["reason"])
    stats.notes = dict(sorted(notes.items()))
    stats.seconds = seconds
    stats.tokens = sum(r.h * r.w for r in records)
    stats.sizes = dict(Counter(f"{r.image_hw[0]}x{r.image_hw[1]}" for r in records))
    write_shard_atomic(out / f"{name}.tar", records)
    tmp = out / f".{name}.errors.jsonl.tmp"
    tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in errors))
    os.replace(tmp, out / f"{name}.errors.jsonl")
    write_json_atomic(out / f"{name}.stats.json", asdict(stats))


def _finish_shard(out: Path, name: str, chunks: dict[int, dict], val_fraction: float = 0.0) -> None:
    """Write the output shard of one input shard. With a split its held-out samples (and skipped ones) go to the val
    shard of the same name, written first, so the train shard's stats mark the whole input shard as finished; both
    sides record the time of the whole input shard."""
    parts = [chunks[i] for i in sorted(chunks)]
    head = parts[0]
    records, errors, notes = [r for p in parts for r in p["records"]], head["errors"], Counter(head["notes"])
    if len(records) + len(errors) != head["inputs"]:
        got = len(records) + len(errors)
        raise RuntimeError(f"input shard {name}: {head['inputs']} samples read, {got} came back; rerun to redo it")
    seconds = round(head["decode_seconds"] + sum(p["encode_seconds"] for p in parts), 3)
    if val_fraction > 0:
        val = [r for r in records if in_val(r.source_key, val_fraction)]
        val_errors = [e for e in errors if in_val(e["source_key"], val_fraction)]
        _write_shard(out / VAL_DIR, name, val, val_errors, head["val_notes"], seconds)
        records = [r for r in records if not in_val(r.source_key, val_fraction)]
        errors = [e for e in errors if not in_val(e["source_key"], val_fraction)]
        notes -= Counter(head["val_notes"])
    _write_shard(out, name, records, errors, notes, seconds)


def write_manifest(
    out: Path, cfg: TokenizeConfig, shards: list[InputShard], ident: dict, split: str | None = None
) -> dict:
    """The manifest (and errors.jsonl) of the finished shards in `out`. With a split (`"train"` / `"val"`) it records
    the side and `val_fraction`; a val manifest lists only the val shards holding samples (with a small fraction most
    are empty, and the loader gives each slot whole shards), while its counts cover every input shard."""
    stats = [json.loads((out / f"{s.name}.stats.json").read_text()) for s in shards]
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
    errors = "".join((out / f"{s.name}.errors.jsonl").read_text() for s in shards)
    (out / f".{ERRORS}.tmp").write_text(errors)
    os.replace(out / f".{ERRORS}.tmp", out / ERRORS)
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def check_paths(cfg: TokenizeConfig) -> list[InputShard]:
    """The input shards, or a one-line SystemExit for inputs, outputs and tokenizers that cannot work, before
    anything is created."""
    fs, root = fsspec.core.url_to_fs(cfg.input)
    if not fs.exists(root):
        raise SystemExit(f"--input {cfg.input} does not exist")
    inp, out = Path(cfg.input).resolve(), Path(cfg.output).resolve()  # (a URL is never a local folder: no overlap)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--output {cfg.output} is a file; give a folder (new or holding earlier shards)")
    if inp.is_dir() and (out == inp or inp in out.parents):
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


def run_tokenize(cfg: TokenizeConfig, local: bool = False) -> dict:
    """Tokenize every unfinished input shard and (re)write the manifest; returns the manifest.
    `local=True` does the same work in this process without Ray (small data, tests, baselines)."""
    shards = check_paths(cfg)
    out = Path(cfg.output)
    ident = dataset_identity(cfg)
    out.mkdir(parents=True, exist_ok=True)
    check_or_claim_output(out, ident)
    if cfg.val_fraction > 0:
        (out / VAL_DIR).mkdir(exist_ok=True)
    dupes = [n for n, c in Counter(s.name for s in shards).items() if c > 1]
    if dupes:
        raise SystemExit(f"input shards map to the same output names: {dupes[:5]}")
    todo = [s for s in shards if not _shard_done(out, s.name, cfg.val_fraction)]
    print(f"{len(shards)} input shards, {len(shards) - len(todo)} already done, {len(todo)} to tokenize")
    if todo:
        (_run_local if local else _run_ray)(cfg, todo, out)
    if not cfg.val_fraction:
        manifest = write_manifest(out, cfg, shards, ident)
        skipped = manifest["skipped"] or "none"
        print(f"{manifest['samples']} samples in {len(shards)} shards, skipped {skipped} -> {out}")
        return manifest
    val = write_manifest(out / VAL_DIR, cfg, shards, ident, split="val")  # first: training looks for it beside
    manifest = write_manifest(out, cfg, shards, ident, split="train")
    skipped = dict(sorted((Counter(manifest["skipped"]) + Counter(val["skipped"])).items()))
    print(
        f"{manifest['samples']} train samples -> {out}, {val['samples']} val samples -> {out / VAL_DIR} "
        f"(--val-fraction {cfg.val_fraction}) from {len(shards)} shards, skipped {skipped or 'none'}"
    )
    return manifest


def _run_local(cfg: TokenizeConfig, todo: list[InputShard], out: Path) -> None:
    encoder = ChunkEncoder(json.dumps(asdict(cfg)))
    for shard in tqdm(todo, desc="tokenizing (local)", unit="shard"):
        chunks = {}
        for i, chunk in enumerate(decode_shard(shard, cfg)):
            start = time.perf_counter()
            chunk["records"] = encoder.encode(chunk.pop("samples"))
            chunk["encode_seconds"] = time.perf_counter() - start
            chunks[i] = chunk
        _finish_shard(out, shard.name, chunks, cfg.val_fraction)


def _run_ray(cfg: TokenizeConfig, todo: list[InputShard], out: Path) -> None:
    ray = connect_ray(cfg.address, cfg.num_cpus)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
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
                _finish_shard(out, row["shard"], pending.pop(row["shard"]), cfg.val_fraction)
                bar.update(1)
    if pending:
        raise RuntimeError(f"shards left incomplete by the Ray job: {sorted(pending)[:5]}")


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    if not (h.isdigit() and w.isdigit()):
        raise argparse.ArgumentTypeError(f"size must look like 512x512 (HxW), got {text!r}")
    return int(h), int(w)


def parse_args(argv: list[str] | None = None) -> TokenizeConfig:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.tokenize", description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=SOURCES.names(), required=True)
    p.add_argument("--input", required=True, help="tar/parquet file or folder")
    p.add_argument("--output", required=True)
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
    p.add_argument("--max-aspect", type=float, default=DEFAULT_MAX_ASPECT, help="long side / short side at most")
    p.add_argument("--max-member-mb", type=int, default=DEFAULT_MAX_MEMBER_BYTES >> 20, help="largest image file read")
    p.add_argument("--fault-kill-after", type=int, help=argparse.SUPPRESS)
    a = vars(p.parse_args(argv))
    if a["sizes"] is None:
        a.pop("sizes")
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
