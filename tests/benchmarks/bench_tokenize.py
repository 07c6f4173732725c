"""Tokenization and loading throughput, printed side by side as ratios; not a test.

1. images/s of the Ray tokenize job (local Ray, 1 encoder actor) vs the same work in one bare process
   (`run_tokenize(local=True)`: read, decode, resize, encode with the same tokenizer and batch size, write).
   Target: Ray overhead <= 15%, measured in steady state (after the first shard) and reported end to end too.
   Then both again with the filters on (FILTER_FLAGS: they keep most of the shapes data; `--min-score` on the
   `min_object_area` score the shapes json carries), same input: images read/s and kept/s, on vs off, as ratios
   (--min-score drops samples before decoding, so more are read a second; kept/s shows the filters' cost). The
   filtered runs come second (warm Ray workers, a warm page cache): the steady-state ratios are the fairer ones.
2. samples/s of the training loader vs the samples/s a tiny T2I model consumes in training (fwd + bwd + AdamW).
Run: `python tests/benchmarks/bench_tokenize.py [--samples 3200 --per-shard 200]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig
from data_pipeline.shapes import write_shapes_dataset
from data_pipeline.shard_format import load_manifest
from data_pipeline.tokenize import TokenizeConfig, run_tokenize
from models.t2i.model import TextToImageBitDance, get_t2i_config
from models.t2i.text_tokenizer import build_chat_tokenizer
from models.tokenizer.io import save_tokenizer
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config

FILTER_FLAGS = "--min-side 8 --min-pixels 64 --max-aspect 4 --min-score min_object_area=0.016 --dedup"
FILTERS = dict(min_side=8, min_pixels=64, max_aspect=4.0, min_score={"min_object_area": 0.016}, dedup=True)


def steady_rate(out: Path, count: str = "ok") -> float:
    """images/s (`count`: "ok" kept, "inputs" read) between the first and the last finished shard (stats files are
    written as shards finish)."""
    stats = sorted(out.glob("*.stats.json"), key=lambda p: p.stat().st_mtime)
    samples = [json.loads(p.read_text())[count] for p in stats]
    return sum(samples[1:]) / (stats[-1].stat().st_mtime - stats[0].stat().st_mtime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3200)
    ap.add_argument("--per-shard", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the Ray actor runs with one thread too
    root = Path(tempfile.mkdtemp(prefix="bench_tok_"))
    try:
        sizes = [(64, 64), (32, 128), (128, 32), (48, 80)]
        write_shapes_dataset(root / "raw", args.samples, sizes=sizes, samples_per_shard=args.per_shard)
        ae_cfg = get_tokenizer_config("tiny")
        save_tokenizer(BinaryAutoencoder(ae_cfg), ae_cfg, root / "ae", name="tiny")
        text = build_chat_tokenizer(
            ["a red circle to the left of a blue square", "two green triangles"], root / "text", vocab_size=400
        )
        cfg = TokenizeConfig(
            source="wds",
            input=str(root / "raw"),
            output=str(root / "bare"),
            tokenizer=str(root / "ae"),
            text_tokenizer=str(text),
            parallel_num=4,
            sizes=sizes,
            batch_size=args.batch_size,
            num_actors=1,
            num_cpus=2,
        )

        start = time.perf_counter()
        n_bare = run_tokenize(cfg, local=True)["samples"]
        bare = n_bare / (time.perf_counter() - start)
        start = time.perf_counter()
        filtered = run_tokenize(replace(cfg, output=str(root / "bare_filtered"), **FILTERS), local=True)
        bare_f = filtered["inputs"] / (time.perf_counter() - start)

        import ray

        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        ray_cfg = replace(cfg, output=str(root / "ray"))
        start = time.perf_counter()
        manifest = run_tokenize(ray_cfg)
        ray_rate = manifest["samples"] / (time.perf_counter() - start)
        start = time.perf_counter()
        ray_filtered = run_tokenize(replace(ray_cfg, output=str(root / "ray_filtered"), **FILTERS))
        ray_f = ray_filtered["inputs"] / (time.perf_counter() - start)
        ray.shutdown()
        bare_s, ray_s = steady_rate(root / "bare"), steady_rate(root / "ray")
        print(
            f"\ntokenize, end to end: bare loop {bare:.1f} images/s ({n_bare} images), Ray job {ray_rate:.1f} "
            f"images/s (incl. actor start-up), ratio {bare / ray_rate:.2f}"
        )
        print(
            f"tokenize, steady state (after the first shard): bare loop {bare_s:.1f} images/s, Ray job "
            f"{ray_s:.1f} images/s, Ray overhead {100 * (bare_s / ray_s - 1):+.1f}% (target <= 15%)"
        )
        assert not manifest["skipped"] and manifest["inputs"] == filtered["inputs"]  # off: images read = kept
        assert filtered["skipped"] == ray_filtered["skipped"] and filtered["samples"] == ray_filtered["samples"]
        print(
            f"tokenize with filters {FILTER_FLAGS}: kept {filtered['samples']} of {filtered['inputs']} images "
            f"(skipped {filtered['skipped'] or 'none'}); images/s, filters on vs off (ratio on/off):"
        )
        kept = filtered["samples"] / filtered["inputs"]
        for name, on, off, out, off_s in (
            ("bare loop", bare_f, bare, root / "bare_filtered", bare_s),
            ("Ray job  ", ray_f, ray_rate, root / "ray_filtered", ray_s),
        ):
            read_s, kept_s = steady_rate(out, "inputs"), steady_rate(out)
            print(
                f"  {name} read: end to end {on:.1f} vs {off:.1f} ({on / off:.2f}), steady state {read_s:.1f} vs "
                f"{off_s:.1f} ({read_s / off_s:.2f}); kept: end to end {on * kept:.1f} vs {off:.1f} "
                f"({on * kept / off:.2f}), steady state {kept_s:.1f} vs {off_s:.1f} ({kept_s / off_s:.2f})"
            )

        tiny = get_t2i_config("tiny-4x", attention="dense")
        vocab = load_manifest(root / "ray")["text_tokens"]["vocab_size"]
        model = TextToImageBitDance(replace(tiny, llm=replace(tiny.llm, vocab_size=vocab))).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loader_cfg = LoaderConfig(root / "ray", kind="t2i", token_budget=8192, num_workers=1)
        batches = []
        loader = BinaryTokenLoader(loader_cfg, rank=0, world_size=1)
        start = time.perf_counter()
        for batch in loader:
            batches.append(batch)
            if len(batches) == args.train_steps:
                break
        load_s = time.perf_counter() - start
        samples = sum(b.num_samples for b in batches)
        start = time.perf_counter()
        for batch in batches:
            opt.zero_grad()
            model(batch).loss.backward()
            opt.step()
        train_s = time.perf_counter() - start
        print(
            f"loader: {samples / load_s:.1f} samples/s (1 worker, incl. start-up); tiny T2I training consumes "
            f"{samples / train_s:.1f} samples/s -> loader is {train_s / load_s:.1f}x faster than needed; "
            f"row fill {loader.stats()['fill_ratio']:.3f}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
