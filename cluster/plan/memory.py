"""Memory and layout planner for the megatron text-to-image model: per-stage GPU memory and estimated step time of
every TP/PP/VPP/recompute layout a cluster allows, and the `torchrun` command of the fastest layout that fits.

    python -m cluster.plan --model 14B-16x --gpus 64 --gpu-mem 141 --token-budget 37376 [--gpus-per-node 8]
        [--micro-batches N] [--top K] [--markdown]
    python -m cluster.plan --report cluster/PLAN_14B.md     # the 14B tables: 8 x H200 and H100 nodes

Layouts: tp inside a node dividing the GPUs per node, pp dividing the layers, vpp with pp >= 2 and pp * vpp dividing
the layers, sequence parallelism whenever tp > 1, recompute none / selective / full; each checked by the model's own
`validate_parallel` (heads, KV heads, MLP width, vocabulary padded to tp) and the loop's `grad_accumulation`
(data.global_batch over dp = gpus / (tp * pp), the interleaved schedule's micro-batch rule).

What one GPU (a TP rank of pipeline stage r under `training.engines.megatron.MegatronEngine`) holds, per component:

- weights: its parameters, counted exactly on the meta device (layers split over TP as
  `models.t2i.megatron.mapping.tp_split` says; embedding and projector with the first model chunk, final norm, LM head
  and the replicated diffusion head with the last) in megatron's DDP buffer (64-element aligned parameters, padded to
  lcm(dp, 128)); grads: that buffer in fp32 (the engine's `grad_reduce_in_fp32`); optim: Adam's two fp32 moments
  and, for bf16 weights, the fp32 main weights, sharded over dp (distributed optimizer); EMA: fp32, dp-sharded.
- activations: what the ops save for backward, per backbone layer and micro-batch (`layer_activation_bytes`: the
  norm / residual part divided by tp under sequence parallelism, the heads / MLP part by tp; only the layer input
  under full recompute), times the micro-batches in flight (1F1B: pp - r on stage r; interleaved:
  2 (pp - r - 1) + (vpp - 1) pp + 1 chunk micro-batches), plus the embedding on the first stage.
- head (last stage): final norm, LM head and diffusion head (`head_activation_bytes`), the head run on 1/tp of the
  image patches per rank; its blocks keep only their inputs under full recompute.
- working: the worst moment beyond what the forward saved (`working_bytes`): a layer's backward (rematerialised under
  recompute), the end of the head's forward, or the head's backward.
- overhead: `FIXED_OVERHEAD_GIB` for what no formula sees (CUDA context, NCCL and cuBLAS buffers, fragmentation).

The formulas are one set of functions for the tiny CPU model and the 14B one; tests/test_plan.py checks their total
against the measured peak of real megatron steps on CPU (tp=1, tp=2 with sequence parallelism, pp=2 1F1B; no / full
recompute; fp32 and bf16): within 15% (measured errors -12% .. +12%, most under 4%). GPU kernels may save less
(fused RMSNorm), which only makes the plan conservative.

Step time: model FLOPs of `training.flops` (`t2i_batch_flops`: backbone, attention pairs, LM head, diffusion head)
at `ASSUMED_MFU`, recompute's extra forward, tensor-parallel collectives over NVLink, pipeline sends, the
data-parallel gradient reduce-scatter and weight all-gather (not overlapped by the engine), on the slowest stage,
stretched by the pipeline bubble (pp - 1) / (vpp * m) for m micro-batches per step.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from models.t2i.megatron.batch import fixed_length, pad_to_length, sequence_multiple
from models.t2i.megatron.config import MegatronParallelConfig, validate_parallel
from models.t2i.megatron.mapping import reference_to_megatron, tp_split
from models.t2i.model import T2IConfig, TextToImageBitDance, get_t2i_config
from models.t2i.packing import PackedT2IBatch, T2ISample, pack_rows, sample_length
from training.config import TrainConfig, grad_accumulation, load_config
from training.flops import t2i_batch_flops, t2i_linear_params

GiB = 1024**3
FIXED_OVERHEAD_GIB = 8.0  # CUDA context (~0.6), NCCL communicators and NVLS buffers, cuBLAS, fragmentation
ASSUMED_MFU = 0.45  # matmul/attention efficiency of the compute itself; communication and bubble are added on top
PEAK_TFLOPS = 989.0  # dense BF16 peak of an H100 / H200 SXM
NVLINK_GBS = 300.0  # effective per-GPU bandwidth of a tensor-parallel collective inside a node (GB/s)
NETWORK_GBS = 40.0  # effective per-GPU bandwidth between nodes (one 400 Gb/s NIC per GPU)
GRAD_BYTES = 4  # the engine's DDP reduces gradients in fp32 (grad_reduce_in_fp32=True)
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
STATS_BYTES = 4  # norm statistics, attention log-sum-exp: fp32
CAPTION_TOKENS = 128  # planning rows: the upper end of the captions' 16-128 tokens
PLAN_IMAGE = (1024, 1024)  # planning rows: filled with the largest official images (4096 tokens at 16x down)
CONFIGS = {"14B-16x": "training/configs/t2i_14b_16x.yaml", "14B-64x": "training/configs/t2i_14b_64x.yaml"}
REPO = Path(__file__).resolve().parents[1]


# ---- what is planned ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One megatron layout: TP x PP (x virtual PP) per model replica, sequence parallelism, full recompute."""

    tp: int
    pp: int
    vpp: int | None = None
    recompute: str | None = None  # None, "selective" (core attention) or "full" (whole layers, head blocks too)
    sp: bool = False

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    def label(self) -> str:
        vpp = f" vpp{self.vpp}" if self.vpp else ""
        return f"tp{self.tp}{' sp' if self.sp else ''} pp{self.pp}{vpp}{f' {self.recompute}' if self.recompute else ''}"


@dataclass(frozen=True)
class Behaviour:
    """How the model runs, as far as memory is concerned: the attention backend (`flex` on GPU; `segments` / `dense`
    materialise boolean masks that SDPA turns into float masks per layer), whether each TP rank runs the diffusion
    head on 1/TP of the patches, whether the head's blocks are recomputed (None: with the backbone), and the width
    of weights and activations."""

    attention: str = "flex"
    head_split: bool = True
    head_recompute: bool | None = None  # None: with full recompute (the engine's `recompute_head`)
    param_bytes: int = 2  # 2: bf16 weights and activations, 4: fp32

    @property
    def main_bytes(self) -> int:
        """fp32 main weights the distributed optimizer keeps for 16-bit weights."""
        return 0 if self.param_bytes == 4 else 4


@dataclass(frozen=True)
class Workload:
    """One micro-batch as the model sees it: rows x length positions (padding included) and what runs on them."""

    rows: int
    length: int
    text: int  # labelled text positions (LM head inputs)
    image_in: int  # image input tokens (projector)
    targets: int  # diffusion targets (head tokens, P per patch)
    segment_sq: int  # sum over runs of one document id (padding included) of run length^2: segments-backend masks
    flops: int  # model FLOPs of forward + backward (training.flops)
    backbone_flops: int  # of which the backbone layers (dense + attention)
    attention_flops: int  # of which the backbone's attention (query-key pairs)

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    def mask_elems(self, attention: str) -> int:
        """Boolean mask entries the attention backend builds per stage (flex: its BlockMask, negligible)."""
        if attention == "dense":
            return self.rows * self.length**2
        return self.segment_sq if attention == "segments" else 0

    @staticmethod
    def of_batch(cfg: T2IConfig, batch: PackedT2IBatch) -> Workload:
        flops = t2i_batch_flops(cfg, batch)
        m = cfg.llm
        attention = 12 * m.num_hidden_layers * m.num_attention_heads * m.head_dim * flops["pairs"]
        backbone = 6 * t2i_linear_params(cfg)["backbone"] * flops["positions"] + attention
        doc = batch.doc_ids
        segment_sq = 0
        for row in doc:
            bounds = [0, *(torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist(), row.numel()]
            segment_sq += sum((e - s) ** 2 for s, e in zip(bounds[:-1], bounds[1:], strict=True))
        return Workload(
            rows=doc.shape[0],
            length=doc.shape[1],
            text=flops["text"],
            image_in=flops["image_in"],
            targets=batch.target_index.numel(),
            segment_sq=segment_sq,
            flops=flops["total"],
            backbone_flops=backbone,
            attention_flops=attention,
        )


class _PlanIds:
    """Token ids for synthetic planning rows (values are irrelevant to memory and FLOPs)."""

    pad_id = 0

    def __init__(self, parallel_num: int):
        self.parallel_num = parallel_num

    def image_prefix_ids(self, h: int, w: int) -> list[int]:
        return [1, 2, 3] + [4] * (self.parallel_num - 1)


def planning_workload(
    cfg: T2IConfig, length: int, rows: int = 1, caption: int = CAPTION_TOKENS, image: tuple[int, int] = PLAN_IMAGE
) -> Workload:
    """Rows of `length` positions packed like the loader packs them: `image`-sized samples with `caption`-token
    captions while they fit, the rest with the largest official size that fits, then padding."""
    sizes = sorted(cfg.image_sizes, key=lambda hw: -math.prod(cfg.grid(*hw)))
    C, P = cfg.latent_dim, cfg.parallel_num

    def sample(hw):
        gh, gw = cfg.grid(*hw)
        return T2ISample(list(range(100, 100 + caption)), torch.ones(C, gh, gw))

    packed = []
    for _ in range(rows):
        row, left = [], length
        for hw in [image, *sizes]:
            need = sample_length(caption, *cfg.grid(*hw))
            while need <= left:
                row.append(sample(hw))
                left -= need
        if not row:
            raise ValueError(
                f"a {length}-position row holds no {caption}-token caption with an image; raise the budget"
            )
        packed.append(row)
    batch = pack_rows(packed, _PlanIds(P), P)
    return Workload.of_batch(cfg, pad_to_length(batch, length, 0))


# ---- weights, gradients, optimizer, EMA -----------------------------------------------------------------------------


_NUMELS: dict[str, list[tuple[str, int]]] = {}


def param_numels(cfg: T2IConfig) -> list[tuple[str, int]]:
    """(megatron name, numel at TP=1) of every parameter of the full model, counted on the meta device."""
    key = repr((cfg.llm, cfg.head))
    if key not in _NUMELS:
        with torch.device("meta"):
            model = TextToImageBitDance(cfg)
        state = dict(model.state_dict())
        _NUMELS[key] = [(k, v.numel()) for k, v in reference_to_megatron(state, cfg.llm).items()]
    return _NUMELS[key]


def chunk_of(key: str, layers: int, chunks: int) -> int:
    """Global model chunk (0 .. pp * vpp - 1) holding a megatron parameter: layers in order, the embedding and
    projector with the first chunk, the final norm, LM head and diffusion head with the last."""
    if key.startswith("decoder.layers."):
        return int(key.split(".")[2]) // (layers // chunks)
    if key.startswith(("word_embeddings.", "projector.")):
        return 0
    return chunks - 1


def stage_params(numels: list[tuple[str, int]], layers: int, lay: Layout) -> list[list[list[int]]]:
    """[stage][chunk] -> numels of the parameters one TP rank holds (tensor-parallel weights divided by tp)."""
    chunks = lay.pp * lay.chunks
    out = [[[] for _ in range(lay.chunks)] for _ in range(lay.pp)]
    for key, n in numels:
        g = chunk_of(key, layers, chunks)
        axis, _ = tp_split(key)
        out[g % lay.pp][g // lay.pp].append(n // lay.tp if axis is not None else n)
    return out


def buffer_numel(numels: list[int], dp: int) -> int:
    """Elements of megatron's DDP buffer for these parameters (distributed optimizer: each parameter starts at a
    multiple of 64 elements, the buffer ends at a multiple of lcm(dp, 128))."""
    end = 0
    for n in reversed(numels):
        end = -(-end // 64) * 64 + n
    unit = math.lcm(dp, 128)
    return -(-end // unit) * unit


# ---- activations ----------------------------------------------------------------------------------------------------


def norm_bytes(width: int) -> int:
    """Per position, what torch's RMSNorm saves: its input (or the input's fp32 upcast), the fp32 normalised values
    before the weight, the fp32 reciprocal RMS."""
    return 8 * width + STATS_BYTES


def layer_activation_bytes(cfg: T2IConfig, work: Workload, lay: Layout, how: Behaviour) -> float:
    """Bytes one backbone layer saves for backward per micro-batch (megatron local spec, block-causal attention).

    Sequence-split part (n / tp under sequence parallelism): the two RMSNorms, the inputs of linear_qkv and linear_fc1
    (megatron keeps the un-gathered input). TP-split part (n positions, 1/tp of the heads and MLP channels): the QKV
    output (kept by the V view), the QK-norms (fp32 copy and normalised values), the rotated Q and K, linear_proj's
    input, the attention kernel's own (`core_attention_bytes`), SwiGLU's fc1 output, silu(gate), up + 0 and their
    product (5 x ffn). Per position: RoPE's cos/sin for Q and K.
    """
    m, a, t = cfg.llm, how.param_bytes, lay.tp
    D, F, hd = m.hidden_size, m.intermediate_size, m.head_dim
    Q, K = m.num_attention_heads * hd, m.num_key_value_heads * hd
    n = work.tokens
    seq = n / (t if lay.sp else 1) * (2 * norm_bytes(D) + 2 * a * D)
    upcast_k = 4 * K if a < 4 else 0  # fp32 K needs no upcast copy: the norm saves the QKV view itself
    heads = (
        a * (Q + 2 * K)
        + 8 * Q
        + 4 * K
        + upcast_k
        + STATS_BYTES * (m.num_attention_heads + m.num_key_value_heads)
        + a * (Q + K)
        + a * Q
        + 5 * a * F
    )
    core = 0 if lay.recompute == "selective" else core_attention_bytes(cfg, work, lay, how)
    return seq + n / t * heads + n * 4 * hd * a + core


def core_attention_bytes(cfg: T2IConfig, work: Workload, lay: Layout, how: Behaviour) -> float:
    """What the attention kernel saves beyond its inputs (and what selective recompute, megatron's `core_attn`,
    drops): its log-sum-exp, its output unless it already is linear_proj's input (FlexAttention's and the per-document
    outputs are copied into linear_proj's layout; dense SDPA's is in it), and with a materialised boolean mask SDPA's
    float copy of the mask."""
    m, a = cfg.llm, how.param_bytes
    out = 0 if how.attention == "dense" else a * m.head_dim
    return work.tokens / lay.tp * m.num_attention_heads * (out + STATS_BYTES) + a * work.mask_elems(how.attention)


def layer_input_bytes(cfg: T2IConfig, work: Workload, lay: Layout, how: Behaviour) -> float:
    """Bytes a fully recomputed layer keeps: its input (megatron's checkpoint saves the hidden states)."""
    return work.tokens / (lay.tp if lay.sp else 1) * how.param_bytes * cfg.llm.hidden_size


def embedding_activation_bytes(cfg: T2IConfig, work: Workload, how: Behaviour) -> float:
    """First stage: the projector's input bits, fc1 output, GELU output and index_copy's source per image input."""
    a = how.param_bytes
    return work.image_in * a * (3 * cfg.llm.hidden_size + cfg.latent_dim)


def lm_head_activation_bytes(cfg: T2IConfig, work: Workload, lay: Layout, how: Behaviour) -> float:
    """Last stage: the final norm, the LM head's input rows and the fp32 vocab-parallel softmax of labelled text."""
    D, V = cfg.llm.hidden_size, cfg.llm.vocab_size
    final = work.tokens / (lay.tp if lay.sp else 1) * norm_bytes(D)
    return final + work.text * (how.param_bytes * D + 4 * V / lay.tp)


def head_tokens(cfg: T2IConfig, work: Workload, lay: Layout, how: Behaviour) -> float:
    """Tokens the diffusion head runs on per TP rank (every draw of `diff_batch_mul`)."""
    return cfg.head.diff_batch_mul * work.targets / (lay.tp if how.head_split else 1)


def head_block_bytes(cfg: T2IConfig, how: Behaviour) -> float:
    """Per token, what one adaLN block of the head saves: 20 x width (norm outputs and their (1 + scale), the
    modulated attention input, QKV, attention output, its projection, the MLP input, fc1 output, silu, product,
    fc2 output, the residuals) plus the LayerNorm statistics and the attention log-sum-exp."""
    h = cfg.head
    return 20 * how.param_bytes * h.ch_latent + 4 * STATS_BYTES + STATS_BYTES * (h.ch_latent // h.head_dim)


def head_activation_bytes(cfg: T2IConfig, work: Workload, lay: Layout, how: Behaviour) -> float:
    """Last stage: the diffusion head per token: its condition (cond_embed input), silu input and output, the adaLN
    modulations (6 x width per adaLN layer, kept by every block they modulate), the blocks (only their inputs when
    recomputed), the final layer (norm, modulation, linear input) and the bits-sized tensors of the loss; per patch
    the timestep MLP."""
    h, a = cfg.head, how.param_bytes
    W = h.ch_latent
    recompute = lay.recompute == "full" if how.head_recompute is None else how.head_recompute
    block = a * W if recompute else head_block_bytes(cfg, how)
    per_token = (
        a * h.ch_cond
        + 2 * a * W
        + 6 * a * W * h.depth_adanln
        + h.depth_latent * block
        + 4 * a * W
        + 2 * STATS_BYTES
        + h.ch_target * (a + 3 * 4)
    )
    n = head_tokens(cfg, work, lay, how)
    return n * per_token + n / cfg.parallel_num * a * (256 + 2 * W)


HEAD_TAIL_WIDTHS = 5  # head-width temporaries per head token alive at the end of the head's forward (measured)
HEAD_GRAD_WIDTHS = 4  # head-width gradients per head token alive in the head's backward (measured)


def layer_grad_bytes(cfg: T2IConfig, work: Workload, lay: Layout, how: Behaviour) -> float:
    """Gradients alive inside one backbone layer's backward beyond its activations (measured): of its output and
    input, and one MLP-wide gradient."""
    m, a = cfg.llm, how.param_bytes
    n = work.tokens
    return 2 * n / (lay.tp if lay.sp else 1) * a * m.hidden_size + n / lay.tp * a * m.intermediate_size


def working_bytes(cfg: T2IConfig, work: Workload, lay: Layout, how: Behaviour, last: bool) -> float:
    """Memory beyond what the forward saved, at the worst moment of a step (the largest of these phases):

    - a backbone layer's backward: its gradients (and with pipelining the activation / gradient in transit), plus
      its rematerialised activations under full recompute (its attention under selective); on the last stage the
      head's activations are freed by then;
    - last stage, end of the forward: the gathered hidden states, the conditions of all targets (before each TP
      rank takes its share), the head's temporaries;
    - last stage, the head's backward: its gradients, plus one rematerialised block when the blocks recompute."""
    h, a = cfg.head, how.param_bytes
    layer = layer_grad_bytes(cfg, work, lay, how)
    if lay.pp > 1:  # the pipeline's gradient being received and the activation being sent
        layer += 2 * layer_input_bytes(cfg, work, lay, how)
    if lay.recompute == "full":
        layer += layer_activation_bytes(cfg, work, lay, how)
    elif lay.recompute == "selective":
        layer += core_attention_bytes(cfg, work, lay, how)
    if not last:
        return layer
    tokens = head_tokens(cfg, work, lay, how)
    recompute = lay.recompute == "full" if how.head_recompute is None else how.head_recompute
    layer -= head_activation_bytes(cfg, work, lay, how)
    tail = a * cfg.llm.hidden_size * (work.tokens + work.targets) + HEAD_TAIL_WIDTHS * a * h.ch_latent * tokens
    head = tokens * ((head_block_bytes(cfg, how) if recompute else 0) + HEAD_GRAD_WIDTHS * a * h.ch_latent)
    return max(layer, tail, head)


def in_flight(lay: Layout, stage: int, micro_batches: int) -> int:
    """Chunk micro-batches whose activations stage `stage` holds at once (megatron's warmup count + 1)."""
    if lay.pp == 1:
        return 1
    if lay.vpp is None:
        return min(lay.pp - stage, micro_batches)
    warmup = 2 * (lay.pp - stage - 1) + (lay.vpp - 1) * lay.pp
    return min(warmup + 1, micro_batches * lay.vpp)


# ---- one layout -----------------------------------------------------------------------------------------------------


@dataclass
class StageMemory:
    """Bytes one GPU of a pipeline stage holds at its peak, by component."""

    stage: int
    weights: float
    grads: float
    optimizer: float
    ema: float
    activations: float  # backbone layers in flight, embedding, RoPE, masks
    head: float  # final norm, LM head and diffusion head (last stage)
    working: float
    overhead: float

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer + self.ema

    @property
    def total(self) -> float:
        return self.static + self.activations + self.head + self.working + self.overhead


def stage_memory(
    cfg: T2IConfig,
    lay: Layout,
    dp: int,
    work: Workload,
    micro_batches: int,
    how: Behaviour,
    overhead: float = FIXED_OVERHEAD_GIB * GiB,
) -> list[StageMemory]:
    """Per pipeline stage, the memory of one of its GPUs (every TP rank holds the same)."""
    m = cfg.llm
    params = stage_params(param_numels(cfg), m.num_hidden_layers, lay)
    per_layer = (layer_input_bytes if lay.recompute == "full" else layer_activation_bytes)(cfg, work, lay, how)
    layers_per_chunk = m.num_hidden_layers // (lay.pp * lay.chunks)
    rope_and_mask = work.tokens * 4 * m.head_dim + work.mask_elems(how.attention)
    out = []
    for r, chunks in enumerate(params):
        padded = sum(buffer_numel(c, dp) for c in chunks)
        real = sum(sum(c) for c in chunks)
        flying = in_flight(lay, r, micro_batches)
        acts = flying * (layers_per_chunk * per_layer + rope_and_mask)
        if lay.sp:  # megatron's global all-gather buffer for the sequence-parallel linear inputs, kept between steps
            acts += work.tokens * how.param_bytes * m.hidden_size
        if lay.pp > 1 and (r > 0 or lay.vpp) and how.param_bytes < 4 and lay.recompute != "full":
            acts += flying * layer_input_bytes(cfg, work, lay, how)  # received inputs (the first norm saves an upcast)
        if r == 0:
            acts += min(flying, micro_batches) * embedding_activation_bytes(cfg, work, how)
        last = r == lay.pp - 1
        head = 0.0
        if last:
            head = lm_head_activation_bytes(cfg, work, lay, how) + head_activation_bytes(cfg, work, lay, how)
        out.append(
            StageMemory(
                stage=r,
                weights=padded * how.param_bytes,
                grads=padded * GRAD_BYTES,
                optimizer=real / dp * (ADAM_BYTES + how.main_bytes),
                ema=real / dp * 4,
                activations=acts,
                head=head,
                working=working_bytes(cfg, work, lay, how, last),
                overhead=overhead,
            )
        )
    return out


@dataclass
class Cluster:
    gpus: int
    gpu_mem_gib: float
    gpus_per_node: int = 8
    peak_tflops: float = PEAK_TFLOPS
    mfu: float = ASSUMED_MFU

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.gpus_per_node)


@dataclass
class Plan:
    """One layout's verdict: memory per stage, step-time estimate, or why it cannot run."""

    layout: Layout
    dp: int
    micro_batches: int
    stages: list[StageMemory] = field(default_factory=list)
    step_s: float = 0.0
    bubble: float = 0.0
    mfu: float = 0.0
    error: str = ""

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    def fits(self, gpu_mem_gib: float) -> bool:
        return not self.error and self.peak.total <= gpu_mem_gib * GiB


def step_time(
    cfg: T2IConfig, lay: Layout, dp: int, m: int, work: Workload, stages: list[StageMemory], cl: Cluster, a: int
) -> tuple[float, float]:
    """(seconds per optimizer step, bubble fraction) of the slowest stage's pipeline."""
    L, D = cfg.llm.num_hidden_layers, cfg.llm.hidden_size
    rate = cl.peak_tflops * 1e12 * cl.mfu
    ends = work.flops - work.backbone_flops  # LM head, projector, diffusion head: the last stage
    layers = L // lay.pp
    per_layer = work.backbone_flops / L  # recompute adds a forward: a third of forward + backward
    if lay.recompute == "full":
        per_layer, ends = per_layer * 4 / 3, ends * 4 / 3
    elif lay.recompute == "selective":
        per_layer += work.attention_flops / L / 3
    slowest = 0.0
    for r in range(lay.pp):
        flops = layers * per_layer + (ends if r == lay.pp - 1 else 0)
        compute = flops / lay.tp / rate
        tp_comm = 0.0
        if lay.tp > 1:  # per layer: all-gather + reduce-scatter around attention and MLP, forward and backward
            volume = work.tokens * D * a * (lay.tp - 1) / lay.tp
            collectives = 10 + (4 if lay.recompute == "full" else 0)
            tp_comm = layers * collectives * volume / (NVLINK_GBS * 1e9)
        p2p = 0.0
        if lay.pp > 1:
            inside = lay.tp * dp * lay.pp <= cl.gpus_per_node
            sent = 2 * work.tokens / (lay.tp if lay.sp else 1) * D * a * lay.chunks
            p2p = sent / ((NVLINK_GBS if inside else NETWORK_GBS) * 1e9)
        slowest = max(slowest, compute + tp_comm + p2p)
    bubble = (lay.pp - 1) / (lay.chunks * m)
    dp_comm = 0.0
    if dp > 1:
        inside = lay.tp * dp <= cl.gpus_per_node
        bw = (NVLINK_GBS if inside else NETWORK_GBS) * 1e9
        biggest = max(s.weights / a for s in stages)  # parameters of the heaviest stage
        dp_comm = biggest * (GRAD_BYTES + a) * (dp - 1) / dp / bw  # gradient reduce-scatter + weight all-gather
    return slowest * m * (1 + bubble) + dp_comm, bubble


def plan_layout(
    cfg: T2IConfig, lay: Layout, cl: Cluster, train: TrainConfig, micro_batches: int | None, how: Behaviour
) -> Plan:
    """Check `lay` against the model and the training config, then size it."""
    dp = cl.gpus // (lay.tp * lay.pp) if cl.gpus % (lay.tp * lay.pp) == 0 else 0
    plan = Plan(lay, dp, micro_batches or 0)
    padded = replace(cfg, llm=replace(cfg.llm, vocab_size=-(-cfg.llm.vocab_size // lay.tp) * lay.tp))
    par = MegatronParallelConfig(
        tp=lay.tp,
        pp=lay.pp,
        virtual_pp=lay.vpp,
        sequence_parallel=lay.sp,
        transformer_impl=train.parallel.transformer_impl,
        fp8=train.parallel.fp8,
        fp8_recipe=train.parallel.fp8_recipe,
        bf16_layers_at_start=train.parallel.bf16_layers_at_start,
        bf16_layers_at_end=train.parallel.bf16_layers_at_end,
        recompute=lay.recompute,
    )
    try:
        if not dp:
            raise ValueError(f"tp * pp = {lay.tp * lay.pp} does not divide {cl.gpus} GPUs")
        if lay.tp > cl.gpus_per_node:
            raise ValueError(f"tp={lay.tp} spans nodes of {cl.gpus_per_node} GPUs")
        validate_parallel(padded, par)
        if micro_batches is None:  # the training loop's own check of global batch vs dp and the interleaved schedule
            layout = replace(train.parallel, tp=lay.tp, pp=lay.pp, virtual_pp=lay.vpp, sequence_parallel=lay.sp)
            run = replace(train, parallel=layout, engine=replace(train.engine, kind="megatron"))
            plan.micro_batches = grad_accumulation(run, cl.gpus)
        elif lay.vpp and micro_batches % lay.pp:
            raise ValueError(f"interleaving needs micro-batches ({micro_batches}) to be a multiple of pp={lay.pp}")
    except ValueError as e:
        plan.error = str(e)
        return plan
    multiple = sequence_multiple(lay.tp, lay.sp, par.fp8 is not None, how.attention == "flex")  # as the engine pads
    length = fixed_length(train.data.token_budget, multiple)
    work = _workload(padded, length, train.data.micro_batch)
    plan.stages = stage_memory(padded, lay, dp, work, plan.micro_batches, how)
    plan.step_s, plan.bubble = step_time(padded, lay, dp, plan.micro_batches, work, plan.stages, cl, how.param_bytes)
    flops_step = work.flops * plan.micro_batches * dp
    plan.mfu = flops_step / plan.step_s / (cl.peak_tflops * 1e12 * cl.gpus)
    return plan


_WORKLOADS: dict[tuple, Workload] = {}


def _workload(cfg: T2IConfig, length: int, rows: int) -> Workload:
    key = (repr((cfg.llm, cfg.head, cfg.image_sizes)), length, rows)
    if key not in _WORKLOADS:
        _WORKLOADS[key] = planning_workload(cfg, length, rows)
    return _WORKLOADS[key]


def layouts(cfg: T2IConfig, cl: Cluster) -> list[Layout]:
    """Every TP (inside a node) x PP (even split of the layers) x VPP x recompute candidate; sequence parallelism
    whenever tp > 1 (it only saves memory)."""
    L = cfg.llm.num_hidden_layers
    out = []
    for tp in (t for t in range(1, cl.gpus_per_node + 1) if cl.gpus_per_node % t == 0):
        for pp in (p for p in range(1, L + 1) if L % p == 0 and cl.gpus % (tp * p) == 0):
            vpps = [None] + ([v for v in range(2, L // pp + 1) if L % (pp * v) == 0] if pp > 1 else [])
            for vpp in vpps:
                for recompute in (None, "selective", "full"):
                    out.append(Layout(tp, pp, vpp, recompute, sp=tp > 1))
    return out


def plan_all(
    name: str, cl: Cluster, train: TrainConfig, micro_batches: int | None = None
) -> tuple[list[Plan], Workload]:
    """Every candidate layout, feasible ones first (fastest first), then those that do not fit, then errors."""
    cfg = get_t2i_config(name)
    attention = "flex" if train.model.attention == "auto" else train.model.attention  # auto: flex on GPU
    how = Behaviour(attention=attention, param_bytes=2 if train.engine.precision in ("bf16", "fp8", "auto") else 4)
    plans = [plan_layout(cfg, lay, cl, train, micro_batches, how) for lay in layouts(cfg, cl)]
    fits = sorted((p for p in plans if p.fits(cl.gpu_mem_gib)), key=lambda p: (p.step_s, p.peak.total))
    over = sorted((p for p in plans if not p.error and not p.fits(cl.gpu_mem_gib)), key=lambda p: p.peak.total)
    bad = [p for p in plans if p.error]
    length = fixed_length(train.data.token_budget, sequence_multiple(1, False, False, attention == "flex"))
    return fits + over + bad, _workload(cfg, length, train.data.micro_batch)


# ---- output ---------------------------------------------------------------------------------------------------------


def torchrun_command(config: str, lay: Layout, cl: Cluster) -> str:
    """The multi-node launch of `training.train` with this layout (run on every node; $HEAD is node 0)."""
    parts = [
        f"torchrun --nnodes {cl.nodes} --nproc-per-node {min(cl.gpus, cl.gpus_per_node)}",
        "--rdzv-backend c10d --rdzv-endpoint $HEAD:29500",
        f"-m training.train --config {config} engine.kind=megatron",
        f"parallel.tp={lay.tp} parallel.pp={lay.pp} parallel.virtual_pp={lay.vpp or 'null'}",
        f"parallel.sequence_parallel={str(lay.sp).lower()} parallel.recompute={lay.recompute or 'null'}",
    ]
    if lay.recompute is None:  # the YAMLs turn model.activation_checkpointing on, which means full recompute
        parts[-1] += " model.activation_checkpointing=false"
    return " \\\n    ".join(parts)


COLUMNS = (
    "layout",
    "dp",
    "m",
    "weights",
    "grads",
    "optim",
    "EMA",
    "activations",
    "head",
    "working",
    "peak (stage)",
    "first / last",
    "step s",
    "bubble",
    "MFU",
)


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def row(p: Plan) -> list[str]:
    """A table row: the fullest stage's components, its total and index, the first and last stages' totals."""
    pk = p.peak
    return [
        p.layout.label(),
        str(p.dp),
        str(p.micro_batches),
        _gib(pk.weights),
        _gib(pk.grads),
        _gib(pk.optimizer),
        _gib(pk.ema),
        _gib(pk.activations),
        _gib(pk.head),
        _gib(pk.working),
        f"{_gib(pk.total)} ({pk.stage})",
        f"{_gib(p.stages[0].total)} / {_gib(p.stages[-1].total)}",
        f"{p.step_s:.1f}",
        f"{p.bubble:.0%}",
        f"{p.mfu:.0%}",
    ]


def render(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
        return "\n".join([head, *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def report(
    name: str, cl: Cluster, config: str, train: TrainConfig, micro_batches: int | None, top: int, md: bool
) -> tuple[str, Plan | None]:
    """The table of the `top` fastest fitting layouts (or the smallest that do not fit) and the best one's command;
    and the best plan (None when nothing fits)."""
    plans, work = plan_all(name, cl, train, micro_batches)
    fitting = [p for p in plans if p.fits(cl.gpu_mem_gib)]
    sized = [p for p in plans if not p.error]
    title = (
        f"{name} on {cl.gpus} GPUs ({cl.nodes} node(s) x {min(cl.gpus, cl.gpus_per_node)}) of {cl.gpu_mem_gib:g} GiB, "
        f"token budget {train.data.token_budget} x micro-batch {train.data.micro_batch}, global batch "
        f"{train.data.global_batch if micro_batches is None else 'm x dp'}"
    )
    lines = [f"**{title}**" if md else title, ""]
    lines.append(
        f"Planning row: {work.length} positions, {work.targets} image targets, {work.text} labelled text tokens; "
        f"{len(fitting)} of {len(sized)} sized layouts fit ({len(plans) - len(sized)} refused by the config checks). "
        "Memory in GiB per GPU; peak = the fullest pipeline stage; fixed overhead "
        f"{FIXED_OVERHEAD_GIB:g} GiB included; step time at {cl.mfu:.0%} MFU of {cl.peak_tflops:g} TFLOP/s."
    )
    reasons: dict[str, int] = {}
    for p in plans:
        if p.error:
            reasons[p.error] = reasons.get(p.error, 0) + 1
    if reasons:
        lines.append("")
        lines.append("Refused: " + "; ".join(f"{n} x `{e}`" if md else f"{n} x {e}" for e, n in reasons.items()))
    lines.append("")
    shown = fitting[:top] if fitting else sorted(sized, key=lambda p: p.peak.total)[:top]
    if not fitting:
        lines.append("No layout fits; the smallest:" if sized else "No layout passes the config checks.")
        lines.append("")
    lines.append(render([row(p) for p in shown], md))
    if fitting:
        best = fitting[0]
        cmd = torchrun_command(config, best.layout, cl)
        lines += ["", f"Best: {best.layout.label()} (dp={best.dp}, {best.micro_batches} micro-batches per step)", ""]
        lines += ["```bash", cmd, "```"] if md else [cmd]
    return "\n".join(lines), fitting[0] if fitting else None


def _train_config(name: str, config: str | None, token_budget: int | None) -> tuple[str, TrainConfig]:
    path = config or CONFIGS.get(name)
    if path is None:
        raise ValueError(f"no training config known for {name!r}; pass --config")
    overrides = [f"model.name={name}"] + ([f"data.token_budget={token_budget}"] if token_budget else [])
    full = path if Path(path).is_absolute() else str(REPO / path)
    return path, load_config(full, overrides)


REPORT_CASES = (
    ("8 x H200 (one node)", 8, 141.0),
    ("16 x H100 (2 nodes)", 16, 80.0),
    ("32 x H100 (4 nodes)", 32, 80.0),
    ("64 x H100 (8 nodes)", 64, 80.0),
    ("64 x H200 (8 nodes)", 64, 141.0),
)


def full_report(top: int = 5) -> str:
    """cluster/PLAN_14B.md: both 14B models on the clusters of `REPORT_CASES`."""
    out = [
        "# 14B layout plan",
        "",
        "Generated by `python -m cluster.plan --report cluster/PLAN_14B.md`; the memory model and its assumptions are",
        "in `cluster/plan.py`, its formulas are checked against the measured peaks of real megatron steps on CPU in",
        "`tests/test_plan.py` (within 15%). Each model's own YAML (global batch 64 packed rows of 37,376 positions,",
        "micro-batch 1, bf16, flex attention) on nodes of 8 GPUs; a layout fits when its fullest stage, fixed",
        f"overhead ({FIXED_OVERHEAD_GIB:g} GiB) included, fits the GPU; the fastest that fits is listed first.",
        "",
        "Columns (GiB per GPU): `weights`, `grads` (fp32), `optim` (Adam moments + fp32 main weights, dp-sharded),",
        "`EMA` (fp32, dp-sharded), `activations` (backbone layers of the micro-batches in flight, embedding),",
        "`head` (final norm, LM head, diffusion head on 1/tp of the patches), `working` (backward working memory)",
        "of the fullest stage; `peak (stage)` its total and index; `first / last` the first and last stages' totals;",
        "`m` micro-batches per step per pipeline; `step s` estimated seconds per optimizer step at",
        f"{ASSUMED_MFU:.0%} compute efficiency plus communication and bubble; `MFU` the model FLOPs utilisation that",
        "implies.",
        "",
    ]
    summary = [
        "| model | cluster | best layout | dp x m | peak GiB (stage) | step s | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    sections = []
    for name in ("14B-16x", "14B-64x"):
        sections += [f"## {name}", ""]
        config, train = _train_config(name, None, None)
        for label, gpus, mem in REPORT_CASES:
            cl = Cluster(gpus, mem)
            text, best = report(name, cl, config, train, None, top, True)
            sections += [f"### {label}", "", text, ""]
            if best is None:
                summary.append(f"| {name} | {label} | none fits | | | | |")
            else:
                summary.append(
                    f"| {name} | {label} | {best.layout.label()} | {best.dp} x {best.micro_batches} | "
                    f"{_gib(best.peak.total)} ({best.peak.stage}) | {best.step_s:.1f} | {best.mfu:.0%} |"
                )
    return "\n".join([*out, "## Summary", "", *summary, "", *sections])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="14B-16x", help="T2I config name (14B-16x, 14B-64x)")
    ap.add_argument("--config", help="training YAML (default: the model's t2i_14b_*.yaml)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-mem", type=float, default=141.0, help="GiB per GPU (H200: 141, H100: 80)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--token-budget", type=int, help="positions per packed row (default: the YAML's)")
    ap.add_argument("--micro-batches", type=int, help="micro-batches per step per pipeline (default: from the YAML)")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--mfu", type=float, default=ASSUMED_MFU)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--report", help="write the 14B tables (both models, H200 and H100 clusters) to this file")
    args = ap.parse_args(argv)
    try:
        if args.report:
            Path(args.report).write_text(full_report() + "\n")
            print(f"wrote {args.report}")
            return 0
        if args.gpus < 1 or args.gpus_per_node < 1 or args.gpu_mem <= 0:
            raise ValueError("--gpus, --gpus-per-node and --gpu-mem must be positive")
        if args.gpus > args.gpus_per_node and args.gpus % args.gpus_per_node:
            raise ValueError(f"--gpus {args.gpus} is not whole nodes of {args.gpus_per_node}; use a multiple")
        config, train = _train_config(args.model, args.config, args.token_budget)
        cl = Cluster(args.gpus, args.gpu_mem, args.gpus_per_node, mfu=args.mfu)
        print(report(args.model, cl, config, train, args.micro_batches, args.top, args.markdown)[0])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
