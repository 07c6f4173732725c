"""Where the loader's bytes come from: `ShardStore`, one tokenized dataset given as a local folder (read in place, as
before) or as an fsspec URL (s3://, gs://, ...: read through the filesystem's own client and credentials; for S3
botocore's AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles).

A URL's folder is listed once (shard sizes and etags); its shards are downloaded whole into `ShardCache`, a node-local
folder bounded in bytes (`data.cache_gb`) that a node's processes share: a download goes to a temporary name and is
renamed into place once complete and of the listed size, so no reader sees a partial shard; before each download the
least recently used whole shards are evicted until the new one fits (never one this process is about to read). A
cached shard is named by its object's size and etag, so a replaced object is fetched again. A background thread per
store fetches the next shards of the slot's order (`data.prefetch_shards`) while the current one is read. What the
store did is counted (`CacheCounts`: downloads, cache hits, evictions, bytes, time waiting) for the loader's stats."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import queue
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from data_pipeline.loader.settings import LoaderError, LoaderSettings
from data_pipeline.shard_format import FORMAT, MANIFEST, load_manifest

log = logging.getLogger(__name__)

PART = ".part-"  # infix of a download in progress
STALE_PART_S = 600.0  # a download file untouched this long belongs to a dead process: removed by the next eviction
FETCH_TRIES = 3


def default_cache_dir() -> str:
    """<system temp dir (TMPDIR)>/bitdance-shards-<uid>: node-local on clusters, one per user."""
    return str(Path(tempfile.gettempdir()) / f"bitdance-shards-{getattr(os, 'getuid', lambda: 0)()}")


@dataclass
class CacheCounts:
    """What a process's stores did since the counts were last taken."""

    shards_fetched: int = 0  # whole shards downloaded (ahead of use or on demand)
    shard_cache_hits: int = 0  # shards opened from the cache without a download
    shards_evicted: int = 0
    bytes_fetched: int = 0
    fetch_wait_ms: int = 0  # time readers waited for a download

    def take(self) -> dict[str, int]:
        out = asdict(self)
        for k in out:
            setattr(self, k, 0)
        return out


class ShardCache:
    """One cache folder per process (`ShardCache.of`), shared by every store that uses it; the bound covers the whole
    folder (every dataset's shards and downloads in progress, this process's and the others')."""

    _instances: dict[tuple[int, str, int], ShardCache] = {}

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        self.lock = threading.Lock()
        self.pinned: Counter[str] = Counter()  # paths this process reads or prefetches: never evicted by it
        self.counts = CacheCounts()
        self.warned = False

    @classmethod
    def of(cls, root: str | os.PathLike, max_bytes: int) -> ShardCache:
        key = (os.getpid(), str(root), max_bytes)  # a forked worker gets its own lock, pins and counts
        if key not in cls._instances:
            cls._instances[key] = cls(Path(root), max_bytes)
        return cls._instances[key]

    def pin(self, path: Path) -> None:
        with self.lock:
            self.pinned[str(path)] += 1

    def unpin(self, path: Path) -> None:
        with self.lock:
            self.pinned[str(path)] -= 1
            if self.pinned[str(path)] <= 0:
                del self.pinned[str(path)]

    def used(self) -> int:
        """Bytes in the folder now (whole shards and downloads in progress)."""
        shards, partial = self._entries(time.time())
        return partial + sum(size for _, size, _ in shards)

    def count(self, **deltas: int) -> None:
        with self.lock:
            for k, v in deltas.items():
                setattr(self.counts, k, getattr(self.counts, k) + v)

    def take(self) -> dict[str, int]:
        with self.lock:
            return self.counts.take()

    def _entries(self, now: float) -> tuple[list[tuple[float, int, Path]], int]:
        """(whole shards as (last use, bytes, path), bytes of downloads in progress); stale downloads removed."""
        shards, partial = [], 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = Path(folder) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                if PART not in name:
                    shards.append((st.st_mtime, st.st_size, path))
                elif now - st.st_mtime > STALE_PART_S:
                    path.unlink(missing_ok=True)
                else:
                    partial += st.st_size
        return shards, partial

    def make_room(self, incoming: int) -> None:
        """Evict least recently used whole shards (not pinned here) until the folder and `incoming` bytes fit."""
        with self.lock:
            shards, partial = self._entries(time.time())
            total = partial + sum(size for _, size, _ in shards)
            for _, size, path in sorted(shards):
                if total + incoming <= self.max_bytes:
                    return
                if str(path) in self.pinned:
                    continue
                try:
                    path.unlink()
                except FileNotFoundError:  # another process evicted it first
                    pass
                else:
                    self.counts.shards_evicted += 1  # (under the lock already)
                total -= size
            if total + incoming > self.max_bytes and not self.warned:
                self.warned = True
                log.warning(
                    "data.cache_gb=%.3g cannot hold the shards this process reads and prefetches at once (%d bytes "
                    "needed, warned once); raise data.cache_gb or lower data.prefetch_shards",
                    self.max_bytes / 1e9,
                    total + incoming,
                )


class Fetcher:
    """One daemon thread running a store's downloads in order (a process that ends does not wait for one)."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="shard-prefetch", daemon=True).start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self.queue.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self.queue.get()
            if not future.set_running_or_notify_cancel():  # cancelled while waiting: no longer needed
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # the reader that waits for it sees it (and fetches again)
                future.set_exception(e)


class ShardStore:
    """One dataset's manifest and shards; `open(name)` gives a readable binary file of a whole shard."""

    def __init__(self, url: str | os.PathLike, settings: LoaderSettings | None = None):
        """`settings` (the loader's data.* settings) give the cache folder, its bound and the prefetch depth; without
        them the store reads the manifest and the listing only."""
        self.url = str(url)
        fs, self.root = fsspec.core.url_to_fs(self.url)
        self.remote = not isinstance(fs, LocalFileSystem)
        self.folder = Path(self.url if "://" not in self.url else self.root)  # a local dataset's folder
        self.settings = settings
        self.cache_dir = (settings.cache_dir if settings else None) or default_cache_dir()
        self.prefetch_n = settings.prefetch_shards if settings else 0
        self._listing: dict[str, tuple[int, str]] | None = None  # name -> (bytes, etag) of a URL's objects
        self._pid = -1  # the process the filesystem, thread and pending fetches below belong to
        self._fs: fsspec.AbstractFileSystem | None = None
        self._fetcher: Fetcher | None = None
        self._pending: dict[str, Future] = {}

    def __getstate__(self) -> dict:  # (to spawned DataLoader workers: without the process's own parts)
        return {**self.__dict__, "_pid": -1, "_fs": None, "_fetcher": None, "_pending": {}}

    def _own(self) -> None:
        """A process's own filesystem client (fsspec's async clients are not fork-safe), thread and fetches."""
        if self._pid != os.getpid():
            self._pid, self._pending, self._fetcher = os.getpid(), {}, None
            self._fs = fsspec.core.url_to_fs(self.url)[0]

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        self._own()
        return self._fs

    def describe(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}" if self.remote else str(self.folder / name)

    # ---- the folder ----

    def manifest(self) -> dict:
        if not self.remote:
            return load_manifest(self.folder)
        path = posixpath.join(self.root, MANIFEST)
        try:
            manifest = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.url} has no {MANIFEST}; run `python -m data_pipeline.tokenize` first"
            ) from None
        except Exception as e:  # credentials, endpoint, bucket: the filesystem's own one-line reason
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoaderError(
                f"cannot read {self.url}/{MANIFEST} ({reason}); check the URL and the filesystem's credentials "
                "(s3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
            ) from None
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{self.url}/{MANIFEST} has format {manifest.get('format')!r}, this code reads {FORMAT!r}")
        return manifest

    def listing(self) -> dict[str, tuple[int, str]]:
        """(bytes, etag) of every object in a URL's folder, listed once."""
        if self._listing is None:
            found = {}
            for info in self.fs.ls(self.root, detail=True):
                if info.get("type", "file") == "file":
                    tag = next(
                        (str(info[k]) for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified") if k in info), ""
                    )
                    found[posixpath.basename(info["name"])] = (int(info["size"]), tag)
            self._listing = found
        return self._listing

    def missing(self, names: list[str]) -> list[str]:
        if not self.remote:
            return [n for n in names if not (self.folder / n).is_file()]
        listed = self.listing()
        return [n for n in names if n not in listed]

    # ---- reading ----

    def open(self, name: str) -> BinaryIO:
        if not self.remote:
            return open(self.folder / name, "rb")
        self._own()
        cache, path = self._cache(), self._cached_path(name)
        cache.pin(path)
        try:
            pending = self._pending.pop(name, None)
            if pending is not None:
                start = time.perf_counter()
                try:
                    pending.result()
                except Exception:  # fetched again below, where the error is raised if it persists
                    pass
                finally:
                    cache.unpin(path)  # the prefetch's pin
                cache.count(fetch_wait_ms=int(1000 * (time.perf_counter() - start)))
            for attempt in range(FETCH_TRIES):
                try:
                    f = open(path, "rb")  # an open file survives its eviction by another process
                except FileNotFoundError:
                    if attempt == FETCH_TRIES - 1:
                        raise
                    start = time.perf_counter()
                    self._fetch(name, path)
                    cache.count(fetch_wait_ms=int(1000 * (time.perf_counter() - start)))
                    continue
                os.utime(path)  # its last use, for the LRU order
                cache.count(shard_cache_hits=int(attempt == 0 and pending is None))
                return f
            raise AssertionError("unreachable")
        finally:
            cache.unpin(path)

    def prefetch(self, names: list[str]) -> None:
        """`names`: the shard about to be opened, then the slot's next ones. It and the next `prefetch_shards` are
        fetched in the background (pinned until opened); pending fetches of other shards are no longer waited for."""
        if not self.remote or self.prefetch_n <= 0:
            return
        self._own()
        cache, window = self._cache(), list(dict.fromkeys(names))[: 1 + self.prefetch_n]
        for name in [n for n in self._pending if n not in window]:
            self._pending.pop(name).cancel()  # (a download already running completes)
            cache.unpin(self._cached_path(name))
        for name in window:
            path = self._cached_path(name)
            if name in self._pending or path.is_file():
                continue
            cache.pin(path)
            self._pending[name] = self._thread().submit(self._fetch, name, path)

    def take_counts(self) -> dict[str, int]:
        """This process's cache counts since the last take (every store of the cache folder together)."""
        return self._cache().take() if self.remote else {}

    # ---- the cache ----

    def _cache(self) -> ShardCache:
        if self.settings is None:
            raise LoaderError(f"the store of {self.url} was made for its manifest only; pass the loader settings")
        return ShardCache.of(self.cache_dir, int(self.settings.cache_gb * 1e9))

    def _thread(self) -> Fetcher:
        self._own()
        if self._fetcher is None:
            self._fetcher = Fetcher()
        return self._fetcher

    def _cached_path(self, name: str) -> Path:
        size, tag = self.listing()[name]
        folder = hashlib.sha256(self.url.rstrip("/").encode()).hexdigest()[:16]
        version = hashlib.sha256(f"{size}:{tag}".encode()).hexdigest()[:12]
        return Path(self.cache_dir) / folder / f"{version}-{name}"

    def _fetch(self, name: str, path: Path) -> None:
        """Download shard `name` whole to `path`: to a temporary name, checked against the listed size, renamed."""
        if path.is_file():
            return
        size, _ = self.listing()[name]
        cache = self._cache()
        cache.make_room(size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{PART}{os.getpid()}-{threading.get_ident()}")
        try:
            self.fs.get_file(posixpath.join(self.root, name), str(tmp))
            got = tmp.stat().st_size
            if got != size:
                raise LoaderError(
                    f"{self.describe(name)} downloaded as {got} bytes but was listed with {size}: it was replaced "
                    "while training; restart the run once the dataset is complete"
                )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        cache.count(shards_fetched=1, bytes_fetched=size)
