"""One-GPU check of the megatron T2I training path: BF16 throughput and MFU of a ~1B config, FlexAttention vs dense
SDPA on the block-causal mask, and megatron's no-pipelining schedule against hand-summed gradients.

    python -m cluster.gpu_check --out DIR [--steps N] [--quick]

Sections (each records its figures or its error and the run goes on): `env`, `schedule` (fp32 tiny model: grads
accumulated by `forward_backward_no_pipelining` over several micro-batches == the sum of the per-micro-batch
grads; pipeline parallelism itself needs more than one rank), `attention` (BlockMask vs boolean-mask SDPA at the
model's attention shape: fwd and fwd+bwd time, speedup, output and input-grad differences; an fp32 equality check
at a smaller size), `train` (megatron DDP + optimizer, `get_forward_backward_func()`, several micro-batches of
synthetic packed rows: tokens/s, MFU, peak memory) and `fp8` (Transformer Engine spec, BF16 and FP8 hybrid
tensorwise; skipped when Transformer Engine does not import). DIR/gpu_check.json is rewritten after every section.

Model FLOPs of a batch: 6 x (matmul weights a token passes through) per token — backbone layers on every position,
projector on image inputs, LM head on labelled text, diffusion head on targets — plus attention over the pairs the
block-causal mask allows (4 x heads x head_dim per pair forward, 8 x backward); embeddings and norms are not counted.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import platform
import socket
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch

from models.t2i.megatron.batch import pad_packed_batch
from models.t2i.model import T2IConfig, get_t2i_config, t2i_head_config
from models.t2i.packing import IGNORE_INDEX, PackedT2IBatch, T2ISample, pack_rows, sample_length
from models.t2i.qwen3 import get_qwen3_config

H200_BF16_PEAK_TFLOPS = 989.0  # dense BF16 tensor-core peak of an H100/H200 SXM (no sparsity)
FIRST_TEXT_ID = 100  # synthetic text ids are drawn from [FIRST_TEXT_ID, vocab); special ids sit below


def check_config(quick: bool = False) -> T2IConfig:
    """~1.0B T2I model: Qwen3-style backbone (2048 wide, 16 layers, 16 heads / 8 KV groups of 128, SwiGLU 6144,
    vocab 32768), a 1024-wide 6-block diffusion head, P=16, 32-bit tokens, official image sizes at 16x down."""
    llm = get_qwen3_config(
        "14B",
        vocab_size=32768,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=4 if quick else 16,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
    )
    head = replace(t2i_head_config(llm.hidden_size, 32, 16), ch_latent=1024)
    return T2IConfig(llm=llm, head=head)


class PrefixIds:
    """Image-prefix ids (vision_start, res_h, res_w, P - 1 queries) for packing without a trained text tokenizer."""

    pad_id = 0

    def __init__(self, parallel_num: int):
        self.parallel_num = parallel_num

    def image_prefix_ids(self, grid_h: int, grid_w: int) -> list[int]:
        return [1, 2, 3] + [4 + i for i in range(self.parallel_num - 1)]


def synthetic_batch(cfg: T2IConfig, seq_len: int, rows: int = 1, seed: int = 0) -> PackedT2IBatch:
    """`rows` rows of exactly `seq_len` positions, each packed with random captions (16-128 ids, 10% without text
    loss) and random ±1 images of the config's sizes up to seq_len / 3 tokens, built by `pack_rows`."""
    g = torch.Generator().manual_seed(seed)
    grids = sorted({cfg.grid(h, w) for h, w in cfg.image_sizes}, key=lambda s: s[0] * s[1])
    grids = [s for s in grids if s[0] * s[1] <= seq_len // 3] or grids[:1]

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (), generator=g))

    packed = []
    for _ in range(rows):
        row, used = [], 0
        while True:
            n_text = randint(16, 129)
            fits = [s for s in grids if used + sample_length(n_text, *s) <= seq_len]
            if not fits:  # shorten the caption to fit the smallest image into what is left, if that can be done
                n_text = min(n_text, seq_len - used - sample_length(0, *grids[0]))
                fits = grids[:1] if n_text >= 16 else []
            if not fits:
                break
            h, w = fits[randint(0, len(fits))]
            ids = torch.randint(FIRST_TEXT_ID, cfg.llm.vocab_size, (n_text,), generator=g).tolist()
            bits = torch.randint(0, 2, (cfg.latent_dim, h, w), generator=g).float() * 2 - 1
            row.append(T2ISample(ids, bits, text_loss=randint(0, 10) > 0))
            used += sample_length(n_text, h, w)
        if not row:
            raise ValueError(f"seq_len {seq_len} holds no sample of the smallest image size {grids[0]}")
        packed.append(row)
    tokens = PrefixIds(cfg.parallel_num)
    return pad_packed_batch(pack_rows(packed, tokens, cfg.parallel_num), seq_len, tokens.pad_id)


def mask_pairs(doc_ids: torch.Tensor, block_ids: torch.Tensor, chunk: int = 1024) -> int:
    """(query, key) pairs the block-causal mask allows: same document, key block <= query block (as
    `models.core.attention.dense_block_causal_mask`), counted over query chunks to bound memory."""
    total = 0
    for s in range(0, doc_ids.shape[1], chunk):
        dq, bq = doc_ids[:, s : s + chunk, None], block_ids[:, s : s + chunk, None]
        total += int(((dq == doc_ids[:, None, :]) & (block_ids[:, None, :] <= bq)).sum())
    return total


def linear_params(cfg: T2IConfig) -> dict[str, int]:
    """Matmul weights each token passes through, per component: `backbone` (all layers, every position),
    `lm_head` (labelled text), `projector` (image inputs), `head_token` (diffusion targets), `head_patch` (the
    head's timestep MLP, once per patch)."""
    m, h = cfg.llm, cfg.head
    d, q, kv = m.hidden_size, m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    layer = d * q + 2 * d * kv + q * d + 3 * d * m.intermediate_size
    w, hidden = h.ch_latent, int(h.ch_latent * 1.5)
    mlp = 3 * w * hidden if h.use_swiglu else 2 * w * hidden
    head_token = (
        h.ch_target * w
        + h.ch_cond * w
        + h.depth_adanln * 6 * w * w
        + h.depth_latent * (4 * w * w + mlp)
        + 2 * w * w
        + w * h.ch_target
    )
    return dict(
        backbone=m.num_hidden_layers * layer,
        lm_head=d * m.vocab_size,
        projector=cfg.latent_dim * d + d * d,
        head_token=head_token,
        head_patch=256 * w + w * w,
    )


def batch_flops(cfg: T2IConfig, batch: PackedT2IBatch, pairs: int | None = None) -> dict[str, int]:
    """Model FLOPs of one forward+backward over `batch`: `dense` (6 x weights x tokens), `attention` (12 x width x
    allowed pairs, backbone and head), `total`, and the token counts they use."""
    m, h, P = cfg.llm, cfg.head, cfg.parallel_num
    pairs = mask_pairs(batch.doc_ids, batch.block_ids) if pairs is None else pairs
    n = dict(
        positions=batch.input_ids.numel(),
        text=int((batch.text_labels != IGNORE_INDEX).sum()),
        image_in=batch.image_in_index.numel(),
        targets=batch.target_index.numel() * h.diff_batch_mul,
    )
    lp = linear_params(cfg)
    dense = 6 * (
        lp["backbone"] * n["positions"]
        + lp["lm_head"] * n["text"]
        + lp["projector"] * n["image_in"]
        + lp["head_token"] * n["targets"]
        + lp["head_patch"] * n["targets"] // P
    )
    attention = (
        12 * m.num_hidden_layers * m.num_attention_heads * m.head_dim * pairs
        + 12 * h.depth_latent * h.ch_latent * n["targets"] * P
    )
    return dict(dense=dense, attention=attention, total=dense + attention, pairs=pairs, **n)


# ---------------------------------------------------------------------------------------------------- CUDA helpers


def sync() -> None:
    torch.cuda.synchronize()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_megatron() -> None:
    """NCCL world of one rank, megatron's model-parallel groups (TP=PP=1) and its CUDA RNG tracker."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)


def build_model(cfg: T2IConfig, par):
    from megatron.core.enums import ModelType

    from models.t2i.megatron.model import MegatronT2IBitDance

    model = MegatronT2IBitDance(cfg, par).cuda()
    model.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
    return model


def gib(nbytes: int) -> float:
    return round(nbytes / 2**30, 2)


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def fb_name(fb) -> str:
    return getattr(fb, "__name__", repr(fb))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# -------------------------------------------------------------------------------------------------------- sections


def env_section() -> dict:
    def version(dist_name: str) -> str | None:
        try:
            return importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return None

    from models.t2i.megatron.config import transformer_engine_available

    props = torch.cuda.get_device_properties(0)
    return dict(
        gpu=props.name,
        capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        gpu_memory_gib=gib(props.total_memory),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        megatron_core=version("megatron-core"),
        triton=version("triton"),
        python=platform.python_version(),
        transformer_engine=transformer_engine_available(),
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
    )


def schedule_section(micro: int = 3) -> dict:
    """fp32 tiny model (dense attention, eval so no bit flips, fixed head draws): grads of
    `forward_backward_no_pipelining` over `micro` micro-batches vs the sum of loss/micro backwards by hand."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from models.t2i.megatron.config import MegatronParallelConfig

    cfg = replace(get_t2i_config("tiny-16x"), attention="dense")
    torch.manual_seed(0)
    model = build_model(cfg, MegatronParallelConfig(params_dtype=torch.float32)).eval()
    with torch.no_grad():  # the head is zero-initialised; give it weights so its conditions get gradients
        for p in model.vision_head.parameters():
            p.normal_(0, 0.05)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    P, C = cfg.parallel_num, cfg.latent_dim
    micro_batches = []
    for i in range(micro):
        b = synthetic_batch(cfg, 512, rows=2, seed=100 + i).to("cuda")
        n = b.target_bits.shape[0] // P
        micro_batches.append((b, torch.rand(n, device="cuda"), torch.randn(n, P, C, device="cuda")))

    ddp.zero_grad_buffer()
    hand_losses = []
    for b, t, z in micro_batches:
        out = ddp(b, t, z)
        (out.loss / micro).backward()
        hand_losses.append(out.loss.item())
    finalize_model_grads([ddp])
    hand = {k: p.main_grad.clone() for k, p in model.named_parameters()}

    def forward_step(data_iterator, model):
        b, t, z = next(data_iterator)
        out = model(b, t, z)
        return out, lambda o: (o.loss, {"loss": o.loss.detach().clone()})  # the schedule divides o.loss in place

    model.config.no_sync_func, model.config.finalize_model_grads_func = ddp.no_sync, finalize_model_grads
    ddp.zero_grad_buffer()
    data = iter(micro_batches)
    fb = get_forward_backward_func()
    store = fb(
        forward_step_func=forward_step,
        data_iterator=data,
        model=[ddp],
        num_microbatches=micro,
        seq_length=512,
        micro_batch_size=2,
    )
    sched = {k: p.main_grad for k, p in model.named_parameters()}
    rel = {k: ((sched[k] - g).norm() / g.norm().clamp_min(1e-30)).item() for k, g in hand.items()}
    worst = max(rel, key=rel.get)
    loss_diff = max(abs(s["loss"].item() - h) / abs(h) for s, h in zip(store, hand_losses, strict=True))
    nonzero = sum(g.abs().sum().item() > 0 for g in hand.values())
    ok = rel[worst] <= 1e-5 and loss_diff <= 1e-5 and next(data, None) is None and nonzero == len(hand)
    return dict(
        schedule=fb_name(fb),
        micro_batches=micro,
        params=len(hand),
        params_with_grad=nonzero,
        worst_grad_rel_err=rel[worst],
        worst_param=worst,
        max_loss_rel_diff=loss_diff,
        tolerance="grad and loss rel err <= 1e-5 (fp32)",
        pipeline_parallel="not run: needs more than one rank",
        ok=ok,
    )


def time_ms(fn, iters: int, warmup: int = 2) -> float:
    """Median CUDA-event time of `fn()` in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        sync()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _qkv(batch: int, seq: int, heads: int, kv_heads: int, dim: int, dtype, seed: int):
    """Leaves in megatron's [s, b, heads, d] layout and the [b, heads, s, d] views the core attention passes on."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    leaves = [
        torch.randn(seq, batch, n, dim, device="cuda", dtype=dtype, generator=g).requires_grad_()
        for n in (heads, kv_heads, kv_heads)
    ]
    return leaves, [t.permute(1, 2, 0, 3) for t in leaves]


def _fwd_bwd(leaves, views, mask, grad_out):
    from models.core.attention import attend

    for t in leaves:
        t.grad = None
    out = attend(*views, mask)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def attention_section(cfg: T2IConfig, seq: int, iters: int, fp32_seq: int) -> dict:
    """FlexAttention BlockMask vs dense boolean-mask SDPA through `models.core.attention.attend` (the model's GQA shape,
    bf16) on one synthetic packed row; equality vs each other and an fp32 dense reference; fp32 flex == dense."""
    from models.core.attention import attend, build_mask

    m = cfg.llm
    heads, kv_heads, dim = m.num_attention_heads, m.num_key_value_heads, m.head_dim
    batch = synthetic_batch(cfg, seq, rows=1, seed=7).to("cuda")
    doc, blk = batch.doc_ids, batch.block_ids
    pairs = mask_pairs(doc, blk)
    res = dict(
        shape=dict(
            seq=seq,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=dim,
            dtype="bf16",
            P=cfg.parallel_num,
            docs=batch.num_samples,
        ),
        mask_density=pairs / seq**2,
    )
    build_mask(doc, blk, "flex")  # compiles create_block_mask
    res["dense_mask_build_ms"] = time_ms(lambda: build_mask(doc, blk, "dense"), 5, 1)
    res["block_mask_build_ms"] = time_ms(lambda: build_mask(doc, blk, "flex"), 5, 1)
    masks = dict(flex=build_mask(doc, blk, "flex"), dense=build_mask(doc, blk, "dense"))
    leaves, views = _qkv(1, seq, heads, kv_heads, dim, torch.bfloat16, seed=1)
    grad_out = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16)
    results = {name: _fwd_bwd(leaves, views, mask, grad_out) for name, mask in masks.items()}  # also compiles
    # also dense SDPA with K/V expanded to every head (no GQA), which admits the memory-efficient kernel
    mha = [leaves[0].detach().requires_grad_()] + [
        t.detach().repeat_interleave(heads // kv_heads, dim=2).requires_grad_() for t in leaves[1:]
    ]
    variants = dict(
        flex=(leaves, views, masks["flex"]),
        dense=(leaves, views, masks["dense"]),
        dense_mha=(mha, [t.permute(1, 2, 0, 3) for t in mha], masks["dense"]),
    )
    fwd_flops, fwd_bwd_flops = 4 * heads * dim * pairs, 12 * heads * dim * pairs
    for name, (ls, vs, mask) in variants.items():
        fwd = time_ms(lambda vs=vs, mask=mask: attend(*vs, mask), iters)
        both = time_ms(lambda ls=ls, vs=vs, mask=mask: _fwd_bwd(ls, vs, mask, grad_out), iters)
        res[name] = dict(
            fwd_ms=fwd,
            fwd_bwd_ms=both,
            useful_tflops_fwd_bwd=fwd_bwd_flops / both / 1e9,
            useful_tflops_fwd=fwd_flops / fwd / 1e9,
        )
    for base in ("dense", "dense_mha"):
        suffix = "" if base == "dense" else "_vs_dense_mha"
        res["speedup_fwd" + suffix] = res[base]["fwd_ms"] / res["flex"]["fwd_ms"]
        res["speedup_fwd_bwd" + suffix] = res[base]["fwd_bwd_ms"] / res["flex"]["fwd_bwd_ms"]
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = _fwd_bwd(ref_leaves, [t.permute(1, 2, 0, 3) for t in ref_leaves], masks["dense"], grad_out.float())
    names = ("out", "dq", "dk", "dv")
    flat = {k: [v[0], *v[1]] for k, v in results.items()} | {"fp32_ref": [ref[0], *ref[1]]}
    eq, ok = {}, True
    for i, name in enumerate(names):
        scale = flat["fp32_ref"][i].abs().max().item()
        diff = max_abs(flat["flex"][i], flat["dense"][i])
        eq[name] = dict(
            flex_vs_dense=diff,
            flex_vs_fp32=max_abs(flat["flex"][i], flat["fp32_ref"][i]),
            dense_vs_fp32=max_abs(flat["dense"][i], flat["fp32_ref"][i]),
            ref_max_abs=scale,
        )
        ok &= diff <= 2e-2 * scale
    flex_err, dense_err = (max(eq[n][f"{k}_vs_fp32"] / eq[n]["ref_max_abs"] for n in names) for k in ("flex", "dense"))
    res["bf16_equality"] = dict(
        eq,
        tolerance="max|flex - dense| <= 2e-2 * max|fp32 ref| per tensor",
        ok=ok,
        flex_worst_rel_err_vs_fp32=flex_err,
        dense_worst_rel_err_vs_fp32=dense_err,
    )
    res["fp32_equality"] = _fp32_equality(cfg, fp32_seq)
    return res


def _fp32_equality(cfg: T2IConfig, seq: int) -> dict:
    from models.core.attention import build_mask

    batch = synthetic_batch(cfg, seq, rows=2, seed=8).to("cuda")
    leaves, views = _qkv(2, seq, 4, 2, 64, torch.float32, seed=2)
    grad_out = torch.randn(2, 4, seq, 64, device="cuda")
    got = {
        b: _fwd_bwd(leaves, views, build_mask(batch.doc_ids, batch.block_ids, b), grad_out) for b in ("flex", "dense")
    }
    eq, ok = {}, True
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        a, b = ([r[0], *r[1]][i] for r in got.values())
        scale = b.abs().max().item()
        eq[name] = dict(max_abs_diff=max_abs(a, b), ref_max_abs=scale)
        ok &= eq[name]["max_abs_diff"] <= 1e-4 * scale
    return dict(
        shape=dict(batch=2, seq=seq, heads=4, kv_heads=2, head_dim=64),
        **eq,
        tolerance="max|flex - dense| <= 1e-4 * max|dense| per tensor",
        ok=ok,
    )


def param_counts(model) -> dict[str, int]:
    """Parameters of the megatron model by top-level module, and their total."""
    names = dict(
        decoder="backbone",
        word_embeddings="embedding",
        output_layer="lm_head",
        vision_head="diffusion_head",
        projector="projector",
    )
    counts = dict.fromkeys(["total", *names.values()], 0)
    for name, p in model.named_parameters():
        counts["total"] += p.numel()
        top = name.split(".")[0]
        if top in names:
            counts[names[top]] += p.numel()
    return counts


def train_section(cfg: T2IConfig, par, seq: int, steps: int, micro: int, peak_tflops: float) -> dict:
    """BF16 training steps: megatron DDP (fp32 grad buffers) + `get_megatron_optimizer` (distributed Adam; plain
    torch AdamW on the bf16 weights if that fails), `get_forward_backward_func()` over `micro` micro-batches of one
    `seq`-position row. Step 0 (compilation) is not timed."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    release()
    torch.manual_seed(0)
    model = build_model(cfg, par).train()
    counts = param_counts(model)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    ddp = DistributedDataParallel(model.config, ddp_cfg, model)
    res = dict(
        transformer_impl=par.transformer_impl,
        fp8=par.fp8,
        fp8_recipe=par.fp8_recipe if par.fp8 else None,
        params=counts,
        seq_len=seq,
        micro_batch_rows=1,
        micro_batches=micro,
    )
    try:
        opt_cfg = OptimizerConfig(
            optimizer="adam",
            lr=1e-4,
            weight_decay=0.1,
            adam_beta2=0.95,
            clip_grad=1.0,
            bf16=True,
            params_dtype=torch.bfloat16,
            use_distributed_optimizer=True,
        )
        opt = get_megatron_optimizer(opt_cfg, [ddp])
        inner = ", ".join(type(o).__name__ for o in getattr(opt, "chained_optimizers", [opt]))
        res["optimizer"] = f"megatron {type(opt).__name__}[{inner}] (get_megatron_optimizer, distributed, Adam)"
        model.config.grad_scale_func = opt.scale_loss
    except Exception as e:
        opt = None
        torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
        res["optimizer"] = f"torch AdamW on bf16 weights (get_megatron_optimizer failed: {e!r})"[:400]
    model.config.no_sync_func, model.config.finalize_model_grads_func = ddp.no_sync, finalize_model_grads
    micro_batches = [synthetic_batch(cfg, seq, rows=1, seed=i).to("cuda") for i in range(micro)]
    flops = [batch_flops(cfg, b) for b in micro_batches]
    step_flops = sum(f["total"] for f in flops)
    res["flops_per_step"] = dict(
        total=step_flops,
        dense=sum(f["dense"] for f in flops),
        attention=sum(f["attention"] for f in flops),
        mask_density=sum(f["pairs"] for f in flops) / (micro * seq**2),
        padding_fraction=sum(int((b.doc_ids < 0).sum()) for b in micro_batches) / (micro * seq),
    )

    def forward_step(data_iterator, model):
        out = model(next(data_iterator))
        return out, lambda o: (o.loss, {"loss": o.loss.detach().clone()})  # the schedule divides o.loss in place

    fb = get_forward_backward_func()
    res["schedule"] = fb_name(fb)
    log = []
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        if opt is not None:
            opt.zero_grad()
        store = fb(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[ddp],
            num_microbatches=micro,
            seq_length=seq,
            micro_batch_size=1,
        )
        if opt is not None:
            _, grad_norm, _ = opt.step()
        else:
            for p in model.parameters():
                p.grad = p.main_grad.to(p.dtype)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
            torch_opt.step()
            torch_opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        loss = sum(s["loss"].item() for s in store) / micro
        log.append(dict(step=step, seconds=round(dt, 3), loss=round(loss, 4), grad_norm=float(grad_norm)))
        print(
            f"  [{res['transformer_impl']}{'/fp8' if par.fp8 else ''}] step {step}: {dt:.2f}s loss {loss:.4f} "
            f"grad_norm {float(grad_norm):.3f}",
            flush=True,
        )
    res["steps"] = log
    timed = log[1:] or log
    seconds = sum(s["seconds"] for s in timed)
    res["tokens_per_s"] = len(timed) * micro * seq / seconds
    res["achieved_tflops"] = len(timed) * step_flops / seconds / 1e12
    res["peak_tflops_used"] = peak_tflops
    res["mfu"] = res["achieved_tflops"] / peak_tflops
    res["mfu_6n_only"] = len(timed) * res["flops_per_step"]["dense"] / seconds / 1e12 / peak_tflops
    res["peak_memory_gib"] = gib(torch.cuda.max_memory_allocated())
    res["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
    res["finite"] = all(torch.isfinite(torch.tensor([s["loss"], s["grad_norm"]])).all().item() for s in log)
    for name in ("no_sync_func", "finalize_model_grads_func", "grad_scale_func"):
        setattr(model.config, name, None)
    return res


def fp8_section(cfg: T2IConfig, seq: int, steps: int, micro: int, peak_tflops: float) -> dict:
    from models.t2i.megatron.config import MegatronParallelConfig, transformer_engine_available

    if not transformer_engine_available():
        return dict(skipped="transformer_engine not installed")
    out = {}
    te = MegatronParallelConfig(transformer_impl="te")
    for name, par in (("te_bf16", te), ("te_fp8_hybrid_tensorwise", replace(te, fp8="hybrid"))):
        try:
            out[name] = train_section(cfg, par, seq, steps, micro, peak_tflops)
        except Exception as e:
            out[name] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
        release()
    return out


# ------------------------------------------------------------------------------------------------------------ main


def table(report: dict) -> str:
    """Compact summary of the key figures; sections that failed show their error."""
    lines = [f"{'section':<11} result"]

    def row(section: str, text: str) -> None:
        lines.append(f"{section:<11} {text}")

    for name, sec in report["sections"].items():
        if "error" in sec:
            row(name, "ERROR " + sec["error"][:200])
        elif name == "env":
            row(
                name,
                f"{sec['gpu']} cc{sec['capability']} torch {sec['torch']} cuda {sec['cuda']} "
                f"megatron-core {sec['megatron_core']} TE {sec['transformer_engine']}",
            )
        elif name == "config":
            row(name, sec["summary"])
        elif name == "schedule":
            row(
                name,
                f"{sec['schedule']} x{sec['micro_batches']}: worst grad rel err {sec['worst_grad_rel_err']:.1e}"
                f", loss rel diff {sec['max_loss_rel_diff']:.1e} -> {'OK' if sec['ok'] else 'FAIL'}",
            )
        elif name == "attention":
            f, d = sec["flex"], sec["dense"]
            row(
                name,
                f"flex fwd {f['fwd_ms']:.2f} / fwd+bwd {f['fwd_bwd_ms']:.2f} ms; dense {d['fwd_ms']:.2f} / "
                f"{d['fwd_bwd_ms']:.2f} ms; speedup {sec['speedup_fwd']:.1f}x / {sec['speedup_fwd_bwd']:.1f}x; "
                f"density {sec['mask_density']:.3f}",
            )
            row(
                "",
                f"dense without GQA (K/V expanded) {sec['dense_mha']['fwd_ms']:.2f} / "
                f"{sec['dense_mha']['fwd_bwd_ms']:.2f} ms; speedup {sec['speedup_fwd_vs_dense_mha']:.1f}x / "
                f"{sec['speedup_fwd_bwd_vs_dense_mha']:.1f}x",
            )
            eq = sec["bf16_equality"]
            row(
                "",
                "bf16 max|flex-dense| "
                + " ".join(f"{k} {eq[k]['flex_vs_dense']:.1e}" for k in ("out", "dq", "dk", "dv"))
                + f" -> {'OK' if eq['ok'] else 'FAIL'}",
            )
            e32 = sec["fp32_equality"]
            row(
                "",
                "fp32 max|flex-dense| "
                + " ".join(f"{k} {e32[k]['max_abs_diff']:.1e}" for k in ("out", "dq", "dk", "dv"))
                + f" -> {'OK' if e32['ok'] else 'FAIL'}",
            )
        elif name in ("train", "fp8"):
            runs = {name: sec} if name == "train" else {k: v for k, v in sec.items() if isinstance(v, dict)}
            if "skipped" in sec:
                lines.append("FP8: skipped (transformer_engine not installed)")
                continue
            for label, r in runs.items():
                if "error" in r:
                    row(label, "ERROR " + r["error"][:200])
                    continue
                mfu, mfu6 = 100 * r["mfu"], 100 * r["mfu_6n_only"]
                row(
                    label,
                    f"{r['tokens_per_s']:,.0f} tok/s, {r['achieved_tflops']:.0f} TFLOP/s, MFU {mfu:.1f}% "
                    f"(6N only {mfu6:.1f}%) of {r['peak_tflops_used']:.0f} TFLOP/s peak, peak mem "
                    f"{r['peak_memory_gib']} GiB, finite {r['finite']}",
                )
                row("", f"optimizer: {r['optimizer'][:100]}; schedule {r['schedule']}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cluster.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    p.add_argument("--steps", type=int, default=None, help="training steps, the first untimed (default 5; quick 3)")
    p.add_argument("--quick", action="store_true", help="4 layers, 4096-position rows, 2 micro-batches")
    p.add_argument("--seq-len", type=int, default=None, help="positions per packed row (default 8192; quick 4096)")
    p.add_argument("--micro-batches", type=int, default=None, help="micro-batches per step (default 4; quick 2)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=H200_BF16_PEAK_TFLOPS,
        help=f"dense BF16 peak for MFU (default {H200_BF16_PEAK_TFLOPS}, H100/H200 SXM)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: cluster.gpu_check needs a CUDA GPU (torch.cuda.is_available() is False)")
    args.out.mkdir(parents=True, exist_ok=True)
    seq = args.seq_len or (4096 if args.quick else 8192)
    micro = args.micro_batches or (2 if args.quick else 4)
    steps = args.steps or (3 if args.quick else 5)
    report = dict(args=dict(steps=steps, quick=args.quick, seq_len=seq, micro_batches=micro), sections={})
    path = args.out / "gpu_check.json"
    cfg = check_config(args.quick)

    def run(name: str, fn) -> None:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            report["sections"][name] = fn()
        except Exception as e:
            report["sections"][name] = dict(
                error=f"{type(e).__name__}: {e}"[:1000], traceback=traceback.format_exc()[-3000:]
            )
            print(report["sections"][name]["traceback"], file=sys.stderr, flush=True)
        report["sections"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(report, indent=1, default=str))
        release()

    def config() -> dict:
        lp = linear_params(cfg)
        m, h = cfg.llm, cfg.head
        summary = (
            f"Qwen3-style {m.num_hidden_layers}L d{m.hidden_size} {m.num_attention_heads}h/"
            f"{m.num_key_value_heads}kv x{m.head_dim} ffn{m.intermediate_size} vocab{m.vocab_size}; head "
            f"w{h.ch_latent} x{h.depth_latent} blocks; P={cfg.parallel_num}, {cfg.latent_dim}-bit tokens; "
            f"backbone matmul params {lp['backbone'] / 1e6:.0f}M"
        )
        return dict(
            summary=summary,
            llm=asdict(m),
            head=asdict(h),
            parallel_num=cfg.parallel_num,
            latent_dim=cfg.latent_dim,
            attention=cfg.attention,
            linear_params=lp,
        )

    run("env", env_section)
    run("config", config)
    try:
        init_megatron()
    except Exception as e:
        report["megatron_init_error"] = f"{type(e).__name__}: {e}"
    run("schedule", schedule_section)
    run("attention", lambda: attention_section(cfg, seq, iters=10, fp32_seq=1024 if args.quick else 2048))
    from models.t2i.megatron.config import MegatronParallelConfig

    run("train", lambda: train_section(cfg, MegatronParallelConfig(), seq, steps, micro, args.peak_tflops))
    run("fp8", lambda: fp8_section(cfg, seq, max(2, steps - 2), micro, args.peak_tflops))
    failed = [name for name, sec in report["sections"].items() if "error" in sec or sec.get("ok") is False]
    failed += [
        f"{name}.{k}"
        for name, sec in report["sections"].items()
        for k, v in sec.items()
        if isinstance(v, dict) and ("error" in v or v.get("ok") is False)
    ]
    report["failed"] = failed
    path.write_text(json.dumps(report, indent=1, default=str))
    try:
        print(table(report), flush=True)
    except Exception as e:  # the figures are in the json either way
        print(f"(summary table failed: {type(e).__name__}: {e})", flush=True)
    print(f"GPU CHECK {'FAILED: ' + ', '.join(failed) if failed else 'OK'}; wrote {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
