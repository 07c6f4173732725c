"""A real S3 API for the object-storage tests and benchmarks: a `moto` server process on 127.0.0.1 that its user starts
and stops, reached the usual way (AWS_ENDPOINT_URL and credentials in the environment, resolved by s3fs / botocore),
and its request log (`server_requests`: the objects it served or stored, in order).

Tests: `from helpers.moto_s3 import moto, s3  # noqa: F401` (module-scoped fixtures). Scripts: `with moto_server(d)`
and `aws_env(url, d)`."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(server: subprocess.Popen, url: str, timeout: float = 60) -> None:
    """Readiness: poll the server's own API until it answers; fail at the deadline or when the process exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=5):
                return
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"the moto server exited with {server.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"the moto server at {url} did not answer within {timeout} s") from None
            time.sleep(0.1)


@contextlib.contextmanager
def moto_server(home: Path) -> Iterator[tuple[str, Path]]:
    """(endpoint URL, request log) of a moto S3 server process of the caller's own, stopped at the end."""
    url = f"http://127.0.0.1:{free_port()}"
    with open(home / "server.log", "wb") as log:
        args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]]
        server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(server, url)
        yield url, home / "server.log"
    finally:
        server.terminate()
        server.wait(timeout=30)


def aws_env(url: str, home: Path) -> dict[str, str]:
    """The environment that points botocore at the server with dummy credentials, and at no profile, config file or
    instance metadata of the machine's (unset: AWS_PROFILE, AWS_DEFAULT_PROFILE, AWS_SESSION_TOKEN,
    AWS_ENDPOINT_URL_S3; see `UNSET`)."""
    return {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


UNSET = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")


def server_requests(log: Path, method: str, prefix: str) -> list[str]:
    """The objects below `prefix` (bucket/folder) the server logged a `method` request of, in order."""
    lines = log.read_text(errors="replace").splitlines()
    marker = f'"{method} /{prefix}/'
    return [ln.split(marker, 1)[1].split()[0] for ln in lines if marker in ln]


def puts(log: Path, prefix: str) -> list[str]:
    """The objects below `prefix` that the server logged a PUT of, in order."""
    return server_requests(log, "PUT", prefix)


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """(endpoint URL, request log) of a moto S3 server process of this module's own, stopped at the end."""
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="module")
def s3(moto, tmp_path_factory):
    """The S3 filesystem of the moto server, with the AWS environment of this process pointing at it (subprocesses
    started with os.environ inherit it)."""
    import fsspec
    import s3fs

    url, _ = moto
    home = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        for var in UNSET:
            mp.delenv(var, raising=False)
        for var, value in aws_env(url, home).items():
            mp.setenv(var, value)
        s3fs.S3FileSystem.clear_instance_cache()
        yield fsspec.filesystem("s3")
        s3fs.S3FileSystem.clear_instance_cache()
