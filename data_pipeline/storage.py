"""Where a tokenized dataset lives: `Output`, a folder given as a local path or as a URL of any filesystem fsspec knows
(s3://, gs://, ...), and the atomic writes the tokenize job makes there.

Local: a file is written to a temporary name beside it, fsynced, then renamed over its name. An object store has no
rename: each object is written whole in one put of its complete bytes (`pipe_file`; S3 shows an object only once its
upload completed, a multipart one included), so a reader sees the old object, no object, or the whole new one. The
order of the puts carries the rest: a shard's `.stats.json`, its finished marker, is the last object written for it.
Credentials and the endpoint are the filesystem's own (for S3, botocore's: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem


def json_bytes(obj) -> bytes:
    """The bytes of a json file the job writes (indented, sorted keys, a final newline)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


class Output:
    """A folder of the tokenized dataset: `url` as given (a local path or an fsspec URL)."""

    def __init__(self, url: str | os.PathLike):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)

    def __str__(self) -> str:
        return self.url

    def sub(self, name: str) -> Output:
        """The folder `name` inside this one."""
        return Output(posixpath.join(self.url, name))

    def path(self, name: str) -> str:
        """The path of the file `name` in this folder, in the folder's filesystem."""
        return posixpath.join(self.root, name)

    def make(self) -> None:
        """Create the folder (local); an object store has no folders, its first put makes the prefix."""
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def is_file(self) -> bool:
        return self.fs.isfile(self.root)

    def refresh(self) -> None:
        """Forget cached listings (s3fs caches them per process): what other processes wrote becomes visible."""
        self.fs.invalidate_cache()

    def names(self) -> set[str]:
        """The names of the files directly in this folder (none if it does not exist)."""
        if self.local:
            root = Path(self.root)
            return {p.name for p in root.iterdir() if p.is_file()} if root.is_dir() else set()
        return {posixpath.basename(p) for p in self.fs.find(self.root, maxdepth=1)}

    def exists(self, name: str) -> bool:
        return self.fs.isfile(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def read_many(self, names: list[str]) -> list[bytes]:
        """The bytes of several files in this folder, in order (fetched concurrently where the filesystem can)."""
        if self.local or not names:
            return [self.read_bytes(n) for n in names]
        got = self.fs.cat([self.path(n) for n in names], on_error="raise")
        return [got[self.path(n)] for n in names]

    def write(self, name: str, fill: Callable[[BinaryIO], None]) -> None:
        """Write the file `name` atomically with what `fill` writes to the file object it is given."""
        if self.local:
            path = Path(self.root) / name
            tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return
        buf = io.BytesIO()
        fill(buf)
        self.fs.pipe_file(self.path(name), buf.getvalue())  # the whole object in one put

    def write_bytes(self, name: str, data: bytes) -> None:
        self.write(name, lambda f: f.write(data))

    def write_json(self, name: str, obj) -> None:
        self.write_bytes(name, json_bytes(obj))
