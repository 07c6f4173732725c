"""Peak memory and time per image of the low-memory inference modes (`models.core.low_memory`: bf16, int8, layer
offload) against fp32, on a small text-to-image model sampled on CPU; printed side by side as ratios; not a test.

How it measures: each run is a fresh subprocess (glibc told to return every block over 64 KiB to the OS with
MALLOC_MMAP_THRESHOLD_, so freed tensors leave the resident set). Per mode it warms the mode's kernels on the tiny
model, takes the resident set size (RSS, /proc) as the baseline, builds the model in fp32, applies the mode, resets the
kernel's peak-RSS mark (/proc/self/clear_refs) and samples one image with CFG; "peak" is the peak RSS (VmHWM) minus
the baseline: weights + KV cache + activations + whatever the kernels allocate, all torch tensors included. The
estimate is `cluster.plan.inference.sampling_memory` for the same model (without the image tokenizer, which is not
loaded here). Offload on a CPU-only machine keeps its "device" in the same RAM, so its RSS cannot drop; its device
figure is the offloader's own count: the weights left resident plus the most layer copies alive at once.
`measure()` is what tests/models/test_low_memory.py and other benchmarks call.

Run: `python tests/benchmarks/bench_inference_memory.py [--size bench|small] [--steps 4] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CAPTIONS = ["a red circle left of a blue square", "two green triangles", "a yellow star above a cat"]
HEIGHT, WIDTH = 32, 64  # the tiny configs' largest size: 16 x 32 tokens at the tiny tokenizer's 2x down
P = 16
# Qwen3 shapes of the measured models (the tiny configs' head, 256 wide); fp32 weights: small ~170 MB, bench ~420 MB
SIZES = {
    "small": dict(hidden_size=768, intermediate_size=2304, num_hidden_layers=6, num_attention_heads=12),
    "bench": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=16),
}
MiB = 1024**2


def model_config(size: str, vocab_size: int):
    from models.t2i.model import get_t2i_config

    cfg = get_t2i_config(f"tiny-{P}x")
    if size == "tiny":
        return replace(cfg, llm=replace(cfg.llm, vocab_size=vocab_size))
    llm = replace(cfg.llm, vocab_size=vocab_size, num_key_value_heads=4, head_dim=64, **SIZES[size])
    head = replace(cfg.head, ch_cond=llm.hidden_size, ch_latent=256, head_dim=64)
    return replace(cfg, llm=llm, head=head)


def build_model(cfg, seed: int = 0):
    """A model with random weights (seeded; the zero-initialised head given weights so the conditions matter)."""
    from models.t2i.model import TextToImageBitDance

    torch.manual_seed(seed)
    model = TextToImageBitDance(cfg).eval()
    with torch.no_grad():
        for p in model.vision_head.parameters():
            p.normal_(0, 0.05)
    return model


def sample(model, tok, steps: int, size: tuple[int, int] = (HEIGHT, WIDTH), seed: int = 0) -> torch.Tensor:
    """One image of the first caption with CFG 4 and `steps` head steps."""
    from models.core.sampling import SamplingConfig
    from models.t2i.sampler import sample_t2i

    g = torch.Generator().manual_seed(seed)
    return sample_t2i(model, tok, CAPTIONS[:1], *size, SamplingConfig(steps, 4.0), g)


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _child(tok_dir: str, size: str, runs: list[tuple[str, bool]], steps: int, image: tuple[int, int]) -> list[dict]:
    from cluster.plan.inference import sampling_memory
    from models.core.low_memory import apply_inference_memory
    from models.t2i.text_tokenizer import T2ITextTokenizer

    tok = T2ITextTokenizer.from_folder(tok_dir, P)
    cfg = model_config(size, len(tok))
    prompt_tokens = len(tok.prompt_ids(CAPTIONS[0]))
    out, reference = [], None
    for mode, offload in runs:
        warm = build_model(model_config("tiny", len(tok)))
        apply_inference_memory(warm, mode, offload)
        sample(warm, tok, 1, image)
        del warm
        gc.collect()
        base = _rss_kib("VmRSS")
        model = build_model(cfg)
        info = apply_inference_memory(model, mode, offload)
        gc.collect()
        weights = _rss_kib("VmRSS") - base
        Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark starts again from here
        start = time.perf_counter()
        bits = sample(model, tok, steps, image)
        seconds = time.perf_counter() - start
        peak = _rss_kib("VmHWM") - base
        reference = bits if reference is None else reference
        est = sampling_memory(cfg, mode, offload, *image, prompt_tokens)
        est_total = est["total"] - est["tokenizer"]
        device = info.device_bytes + (info.offload.peak_bytes if info.offload else 0)
        out.append(
            dict(
                mode=mode,
                offload=offload,
                weights_mib=weights / 1024,
                peak_mib=peak / 1024,
                estimate_mib=est_total / MiB,
                estimate_weights_mib=est["weights"] / MiB,
                device_mib=device / MiB,
                seconds=seconds,
                differing_bits=(bits != reference).float().mean().item(),
            )
        )
        del model, info, bits
        gc.collect()
    return out


def measure(
    tok_dir: str | Path,
    size: str = "small",
    runs=(("fp32", False),),
    steps: int = 2,
    threads: int = 1,
    image: tuple[int, int] = (HEIGHT, WIDTH),
) -> list[dict]:
    """One record per (mode, offload) of `runs`, measured in order in one fresh subprocess (the first is the reference
    for `differing_bits`), sampling one `image` (HxW): weights_mib / peak_mib (RSS over the baseline after applying
    the mode / at the sampling peak), estimate_mib / estimate_weights_mib (the planner's total / weights on the device),
    device_mib (the weights a GPU would hold: resident + the most layer copies at once), seconds, differing_bits."""
    spec = dict(tok_dir=str(tok_dir), size=size, runs=[list(r) for r in runs], steps=steps, image=list(image))
    return run_child(__file__, spec, threads)


def run_child(script: str, spec: dict, threads: int) -> dict:
    """`script --child <spec as JSON>` in a fresh process (`threads` OpenMP threads, small allocations kept off mmap so
    RSS follows what is freed): the JSON object its last output line prints."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, script, "--child", json.dumps(spec)], env=env, capture_output=True, text=True, cwd=REPO
    )
    if done.returncode:
        raise RuntimeError(f"measuring subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="bench")
    ap.add_argument("--steps", type=int, default=2, help="head sampling steps per AR step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        runs = [tuple(r) for r in spec["runs"]]
        print(json.dumps(_child(spec["tok_dir"], spec["size"], runs, spec["steps"], tuple(spec["image"]))))
        return
    from models.t2i.text_tokenizer import build_chat_tokenizer

    runs = [("fp32", False), ("bf16", False), ("int8", False), ("fp32", True), ("bf16", True), ("int8", True)]
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = build_chat_tokenizer(CAPTIONS * 3, Path(tmp), vocab_size=300)
        recs = measure(tok_dir, args.size, runs, args.steps, args.threads)
    w = recs[0]["weights_mib"]
    ref, ref_t, ref_dev = recs[0]["peak_mib"], recs[0]["seconds"], recs[0]["device_mib"]
    print(
        f"{args.size} model, fp32 weights {w:.0f} MiB; 1 image {HEIGHT}x{WIDTH} ({HEIGHT * WIDTH // 4 // P} AR steps "
        f"of P={P}), CFG 4, {args.steps} head steps, {args.threads} threads, CPU; MiB"
    )
    head = f"{'mode':>5} {'offload':>7} {'peak RSS':>9} {'vs fp32':>8} {'estimate':>9} {'est.err':>8} "
    print(head + f"{'on device':>10} {'vs fp32':>8} {'s/image':>8} {'vs fp32':>8} {'bits differing':>15}")
    for r in recs:
        err = "n/a" if r["offload"] else f"{(r['estimate_mib'] - r['peak_mib']) / r['peak_mib']:+.1%}"
        print(
            f"{r['mode']:>5} {'yes' if r['offload'] else 'no':>7} {r['peak_mib']:>9.1f} {r['peak_mib'] / ref:>7.2f}x "
            f"{r['estimate_mib']:>9.1f} {err:>8} {r['device_mib']:>10.1f} {r['device_mib'] / ref_dev:>7.2f}x "
            f"{r['seconds']:>8.2f} {r['seconds'] / ref_t:>7.2f}x {r['differing_bits']:>14.2%}"
        )
    print(
        "peak RSS: measured over the baseline; estimate: cluster.plan.inference (device memory: with offload it leaves "
        "out the host copies, so no error is given); on device: the weights a GPU would hold (exact count: resident "
        "plus the most layer copies at once); on this CPU-only machine offload cannot lower the RSS (one RAM)"
    )


if __name__ == "__main__":
    main()
