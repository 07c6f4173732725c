"""Padding overhead of fixed-shape micro-batches (the megatron engine pads every packed row to one length); not a test.

Overhead = padded positions / real positions, for rows packed by the training loader's packing (`greedy_rows`, BAGEL
style) and padded to `data.token_budget` rounded up for sequence parallelism, FP8 and FlexAttention
(`models.t2i.megatron.batch`), next to what padding only to the TP multiple (variable lengths) costs.

(a) the tokenized demo data (`tests/helpers/data.py::make_t2i_data`: shapes at 32x32 / 32x64, downsample 2, P=4)
    through `BinaryTokenLoader` at several token budgets;
(b) a synthetic mixed-size set shaped like the 14B data: the official sizes at 16x down (grids 16..128 per side),
    P=16, captions of 16..128 tokens, packed to 37,376 tokens per row, tp=8 with sequence parallelism, FP8, flex.
Run: `python tests/benchmarks/bench_padding.py [--demo-rows 200] [--samples 20000]`.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.data import make_t2i_data  # noqa: E402

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig  # noqa: E402
from data_pipeline.loader.packing import greedy_rows  # noqa: E402
from models.t2i.megatron.batch import fixed_length, sequence_multiple  # noqa: E402
from models.t2i.model import OFFICIAL_IMAGE_SIZES  # noqa: E402
from models.t2i.packing import sample_length  # noqa: E402


def overhead(row_lengths: list[int], fixed: int, multiple: int) -> tuple[float, float]:
    """(fixed-length padding, variable-length padding to `multiple`) as padded positions / real positions."""
    real = sum(row_lengths)
    variable = sum(fixed_length(n, multiple) for n in row_lengths)
    return (len(row_lengths) * fixed - real) / real, (variable - real) / real


def line(name: str, rows: list[int], budget: int, multiple: int) -> str:
    fixed = fixed_length(budget, multiple)
    fix, var = overhead(rows, fixed, multiple)
    fill = sum(rows) / (len(rows) * budget)
    return (
        f"{name:<34} budget {budget:>6} -> fixed {fixed:>6} (multiple {multiple:>3}) | {len(rows):>5} rows, "
        f"fill {fill:7.2%} | overhead fixed {fix:7.3%}  variable {var:7.3%}"
    )


def demo(rows_per_budget: int) -> list[str]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = make_t2i_data(Path(tmp))["tokens"]
        for budget in (600, 1000, 1024, 2048, 4096):
            cfg = LoaderConfig(tokens, kind="t2i", token_budget=budget, num_workers=0)
            batches = itertools.islice(iter(BinaryTokenLoader(cfg, rank=0, world_size=1)), rows_per_budget)
            rows = [int((b.doc_ids >= 0).sum()) for b in batches]
            for label, multiple in (
                ("tp=2 sp, dense", sequence_multiple(2, True)),
                ("flex", sequence_multiple(flex=True)),
            ):
                out.append(line(f"(a) demo shards, {label}", rows, budget, multiple))
    return out


def synthetic(samples: int, budget: int = 37376, parallel_num: int = 16, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    grids = [(h // 16, w // 16) for h, w in OFFICIAL_IMAGE_SIZES]
    assert min(min(g) for g in grids) == 16 and max(max(g) for g in grids) == 128
    lengths = [sample_length(rng.randint(16, 128), *rng.choice(grids)) for _ in range(samples)]
    rows = [sum(row) for row in greedy_rows(lengths, lambda n: n, budget, lookahead=64)]
    multiple = sequence_multiple(tp=8, sequence_parallel=True, fp8=True, flex=True)
    return [line(f"(b) 14B-like 16x, P={parallel_num}, tp=8 sp fp8 flex", rows, budget, multiple)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-rows", type=int, default=200, help="packed rows of the demo data per token budget")
    ap.add_argument("--samples", type=int, default=20000, help="samples of the synthetic 14B-like set")
    args = ap.parse_args()
    print("overhead = padded positions / real positions; 'variable' pads each row only to the multiple")
    for text in [*demo(args.demo_rows), *synthetic(args.samples)]:
        print(text, flush=True)


if __name__ == "__main__":
    main()
