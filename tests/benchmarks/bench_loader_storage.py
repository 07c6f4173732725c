"""Training-loader throughput reading a tokenized dataset from S3 (a moto server process this script starts and stops,
on this machine) next to reading its local copy; not a test.

One rank, `BinaryTokenLoader` as training builds it (T2I packed rows, the default DataLoader worker); after a warm-up
of W batches, the time of the next N batches (about two epochs by default), local and S3 alternately R times. The S3
cache is bounded at a quarter of the dataset, so every shard is downloaded again each epoch while training reads: the
steady state of a node that streams its data, with the next shards fetched ahead in the background. Prints batches/s
and samples/s of both (mean over the repeats), their ratio (goal >= 0.8x), and what the cache did.
Run: `python tests/benchmarks/bench_loader_storage.py [--batches 1500] [--warmup 40] [--repeats 2]`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_pipeline"))
from helpers.moto_s3 import UNSET, aws_env, moto_server  # noqa: E402
from test_loader import make_dataset  # noqa: E402

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig  # noqa: E402

BUCKET = "bench-tokens"
GRIDS = [(16, 16), (16, 32), (32, 16), (24, 24)]  # tokens of 256..576 per image: shards of about 1 MB


def throughput(cfg: LoaderConfig, warmup: int, batches: int) -> tuple[float, float, dict]:
    """(batches/s, samples/s, loader stats) over `batches` batches after `warmup`."""
    loader = BinaryTokenLoader(cfg, 0, 1)
    it = iter(loader)
    for _ in itertools.islice(it, warmup):
        pass
    samples = loader.stats()["samples_seen"]
    start = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    seconds = time.perf_counter() - start
    stats = loader.stats()
    return batches / seconds, (stats["samples_seen"] - samples) / seconds, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=1500)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=400)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_dataset(root / "tokens", "t2i", args.shards, args.per_shard, grids=GRIDS)
        size = sum(f.stat().st_size for f in data.glob("*.tar"))
        with moto_server(root) as (url, _log):
            for var in UNSET:
                os.environ.pop(var, None)
            os.environ.update(aws_env(url, root))
            import fsspec

            fs = fsspec.filesystem("s3")
            fs.mkdir(BUCKET)
            fs.put(f"{data}/", f"{BUCKET}/tokens/", recursive=True)
            common = dict(kind="t2i", seed=0, token_budget=4096, num_workers=args.num_workers, rows_per_batch=1)
            cache = dict(cache_dir=str(root / "cache"), cache_gb=size / 4 / 1e9, prefetch_shards=2)
            runs: dict[str, list] = {"local": [], "s3": []}
            for _ in range(args.repeats):  # alternately, so that neither side gets the quieter moments
                runs["local"].append(throughput(LoaderConfig(data, **common), args.warmup, args.batches))
                remote = LoaderConfig(f"s3://{BUCKET}/tokens", **common, **cache)
                runs["s3"].append(throughput(remote, args.warmup, args.batches))
    print(
        f"{args.shards} shards x {args.per_shard} samples ({size / 1e6:.1f} MB), T2I rows of 4096 tokens, 1 rank, "
        f"{args.num_workers} DataLoader worker(s); {args.batches} batches after {args.warmup}; S3: moto on 127.0.0.1, "
        f"cache bounded at {size / 4 / 1e6:.1f} MB (a quarter of the data), 2 shards prefetched"
    )
    print(f"{'':>8} {'batches/s':>10} {'samples/s':>10}   (each repeat's batches/s)")
    mean = {}
    for name, got in runs.items():
        mean[name] = sum(r[0] for r in got) / len(got)
        each = ", ".join(f"{r[0]:.1f}" for r in got)
        print(f"{name:>8} {mean[name]:10.1f} {sum(r[1] for r in got) / len(got):10.1f}   ({each})")
    print(f"ratio s3 / local: {mean['s3'] / mean['local']:.2f}x (goal >= 0.8x)")
    keys = ("shards_fetched", "shard_cache_hits", "shards_evicted", "bytes_fetched", "fetch_wait_ms")
    print("s3 cache, last repeat (warm-up included): " + ", ".join(f"{k}={runs['s3'][-1][2][k]}" for k in keys))


if __name__ == "__main__":
    main()
