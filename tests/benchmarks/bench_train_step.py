"""Training step time, printed side by side as ratios; not a test.

1. Pre-tokenized shards vs encoding the raw images online every step (same tiny T2I model, same batches).
2. The DeepSpeed engine (ZeRO-0, 1 process, gloo) vs a bare PyTorch loop (model + AdamW) on the same batches.
Run: `python tests/benchmarks/bench_train_step.py [--steps 20]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.data import make_t2i_data  # noqa: E402

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig  # noqa: E402
from data_pipeline.shard_format import load_manifest  # noqa: E402
from models.t2i.model import TextToImageBitDance, get_t2i_config  # noqa: E402
from models.tokenizer.io import load_tokenizer  # noqa: E402


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        data = make_t2i_data(root, samples=64)
        manifest = load_manifest(data["tokens"])
        cfg = get_t2i_config("tiny-4x", attention="dense", image_sizes=((32, 32), (32, 64)))
        cfg = replace(cfg, llm=replace(cfg.llm, vocab_size=manifest["text_tokens"]["vocab_size"]))
        torch.manual_seed(0)
        model = TextToImageBitDance(cfg).train()
        loader = BinaryTokenLoader(LoaderConfig(data["tokens"], token_budget=2048, num_workers=0), rank=0, world_size=1)
        batches = [b for _, b in zip(range(args.steps + 1), loader, strict=False)]
        ae = load_tokenizer(data["ae"])
        shapes = [torch.rand(3, 32, 32) * 2 - 1, torch.rand(3, 32, 64) * 2 - 1]  # the dataset's two image sizes
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        it = iter(batches)

        def step_pretokenized():
            batch = next(it)
            opt.zero_grad()
            model(batch).loss.backward()
            opt.step()

        pre = timed(step_pretokenized, args.steps)
        it2 = iter(batches)

        def step_online():
            batch = next(it2)
            with torch.no_grad():  # encode every sample's image, as online tokenization must
                for i in range(batch.num_samples):
                    ae.encode(shapes[i % 2][None])
            opt.zero_grad()
            model(batch).loss.backward()
            opt.step()

        online = timed(step_online, args.steps)
        print(
            f"step time: pre-tokenized {pre * 1e3:.1f} ms, online encoding {online * 1e3:.1f} ms "
            f"-> online is {online / pre:.2f}x slower (tiny tokenizer; d16c32 costs far more)"
        )

        from training.config import load_config
        from training.engines.deepspeed import DeepSpeedEngine, init_distributed
        from training.optim import build_optimizer

        os.environ.setdefault("MASTER_PORT", "29533")
        init_distributed()
        tcfg = load_config(None, ["data.micro_batch=1", "data.global_batch=1", "engine.zero_stage=0"])
        torch.manual_seed(0)
        m2 = TextToImageBitDance(cfg).train()
        engine = DeepSpeedEngine(m2, build_optimizer(m2, tcfg.optim), tcfg, 1)
        it3 = iter(batches)

        def step_engine():
            out = engine(next(it3))
            engine.backward(out.loss)
            engine.step()

        ds = timed(step_engine, args.steps)
        torch.manual_seed(0)
        m3 = TextToImageBitDance(cfg).train()
        opt3 = build_optimizer(m3, tcfg.optim)
        it4 = iter(batches)

        def step_bare():
            opt3.zero_grad()
            m3(next(it4)).loss.backward()
            torch.nn.utils.clip_grad_norm_(m3.parameters(), 1.0)
            opt3.step()

        bare = timed(step_bare, args.steps)
        print(
            f"step time: DeepSpeed engine {ds * 1e3:.1f} ms, bare PyTorch {bare * 1e3:.1f} ms "
            f"-> engine overhead {100 * (ds / bare - 1):+.1f}%"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
