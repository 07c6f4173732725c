"""Cost of checkpoint checksums (training.checkpoint_integrity): sha256 throughput of one file, and of a checkpoint
folder written and verified the way save / load do it (4 hashing threads on one rank); not a test.

Run: `python tests/benchmarks/bench_checksums.py [--mb 512] [--files 4]`. Prints MB/s; the per-rank cost of a
checkpoint is its bytes / world size / this rate (ranks split the files), on top of reading them from disk once
more (the files were just written, so usually from the page cache at save).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from training.checkpoint_integrity import sha256_file, verify_checkpoint, write_manifest  # noqa: E402


def rate(mb: float, fn) -> float:
    start = time.perf_counter()
    fn()
    return mb / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=512, help="total megabytes of checkpoint files")
    p.add_argument("--files", type=int, default=4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        per_file = args.mb // args.files
        for i in range(args.files):
            (folder / f"__0_{i}.distcp").write_bytes(os.urandom(per_file << 20))
        total = per_file * args.files
        sha256_file(folder / "__0_0.distcp")  # warm the page cache
        one = rate(per_file, lambda: sha256_file(folder / "__0_0.distcp"))
        save = rate(total, lambda: write_manifest(folder))
        load = rate(total, lambda: verify_checkpoint(folder))
        sizes = rate(total, lambda: verify_checkpoint(folder, checksums=False))
    print(f"sha256, one file of {per_file} MB:          {one:8.0f} MB/s")
    print(f"manifest at save, {args.files} files, {total} MB:  {save:8.0f} MB/s")
    print(f"verify at load, {args.files} files, {total} MB:    {load:8.0f} MB/s")
    print(f"verify sizes only (checksums=false):  {sizes:8.0f} MB/s")


if __name__ == "__main__":
    main()
