"""The planner's memory model: what one GPU (a TP rank of pipeline stage r under
`training.engines.megatron.MegatronEngine`) holds at its peak under a parallel layout, per component.

- weights: its parameters, counted exactly on the meta device (layers split over TP as
  `models.t2i.megatron.mapping.tp_split` says and over the stages as the layout's even split or `pp_layers` says;
  embedding and projector with the first model chunk, final norm, LM head and the replicated diffusion head with the
  last) in megatron's DDP buffer (64-element aligned parameters, padded to lcm(dp, 128)); grads: that buffer in fp32
  (the engine's `grad_reduce_in_fp32`); optim: Adam's two fp32 moments and, for bf16 weights, the fp32 main weights,
  sharded over dp (distributed optimizer); EMA: fp32, dp-sharded.
- activations: what the ops save for backward, per backbone layer and micro-batch (`layer_activation_bytes`: the
  norm / residual part divided by tp under sequence parallelism, the heads / MLP part by tp; only the layer input
  under full recompute), times the stage's layers and the micro-batches in flight (1F1B: pp - r on stage r;
  interleaved: 2 (pp - r - 1) + (vpp - 1) pp + 1 chunk micro-batches), plus the embedding on the first stage.
- head (last stage): final norm, LM head and diffusion head (`head_activation_bytes`), the head run on 1/tp of the
  image patches per rank; its blocks keep only their inputs under full recompute.
- working: the worst moment beyond what the forward saved (`working_bytes`): a layer's backward (rematerialised under
  recompute), the end of the head's forward, or the head's backward.
- overhead: `FIXED_OVERHEAD_GIB` for what no formula sees (CUDA context, NCCL and cuBLAS buffers, fragmentation).

A layout is a `models.t2i.megatron.config.ParallelSettings` (tp, pp, pp_layers, virtual_pp, sequence_parallel,
recompute), the engine's own. The formulas are one set of functions for the tiny CPU model and the 14B one;
tests/cluster/test_plan.py checks their total against the measured peak of real megatron steps on CPU (tp=1, tp=2 with
sequence parallelism, pp=2 1F1B; no / full recompute; fp32 and bf16): within 15% (measured errors -12% .. +12%, most
under 4%). GPU kernels may save less (fused RMSNorm), which only makes the plan conservative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.t2i.flops import t2i_batch_flops, t2i_linear_params
from models.t2i.megatron.batch import pad_to_length
from models.t2i.megatron.config import ParallelSettings, stage_layer_counts
from models.t2i.megatron.mapping import reference_to_megatron, tp_split
from models.t2i.model import T2IConfig, TextToImageBitDance
from models.t2i.packing import PackedT2IBatch, SyntheticPrefixIds, T2ISample, pack_rows, sample_length

GiB = 1024**3
FIXED_OVERHEAD_GIB = 8.0  # CUDA context (~0.6), NCCL communicators and NVLS buffers, cuBLAS, fragmentation
GRAD_BYTES = 4  # the engine's DDP reduces gradients in fp32 (grad_reduce_in_fp32=True)
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
STATS_BYTES = 4  # norm statistics, attention log-sum-exp: fp32
CAPTION_TOKENS = 128  # planning rows: the upper end of the captions' 16-128 tokens
PLAN_IMAGE = (1024, 1024)  # planning rows: filled with the largest official images (4096 tokens at 16x down)


# ---- what runs ------------------------------------------------------------------------------------------------------


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
    flops: int  # model FLOPs of forward + backward (models.t2i.flops)
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


def planning_workload(
    cfg: T2IConfig, length: int, rows: int = 1, caption: int = CAPTION_TOKENS, image: tuple[int, int] = PLAN_IMAGE
) -> Workload:
    """The workload of `planning_batch`'s rows."""
    return Workload.of_batch(cfg, planning_batch(cfg, length, rows, caption, image))


def planning_batch(
    cfg: T2IConfig, length: int, rows: int = 1, caption: int = CAPTION_TOKENS, image: tuple[int, int] = PLAN_IMAGE
) -> PackedT2IBatch:
    """Rows of `length` positions packed like the loader packs them: `image`-sized samples with `caption`-token
    captions while they fit, the rest with the largest official size that fits, then padding (synthetic ids and
    all-ones bits: values are irrelevant to memory and FLOPs)."""
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
    return pad_to_length(pack_rows(packed, SyntheticPrefixIds(P), P), length, 0)


# ---- the layout's shape ---------------------------------------------------------------------------------------------


def model_chunks(par: ParallelSettings) -> int:
    """Model chunks per pipeline stage (virtual pipeline parallelism)."""
    return par.virtual_pp or 1


def sequence_split(par: ParallelSettings) -> int:
    """How many ways the norm / residual activations are split along the sequence (tp under sequence parallelism)."""
    return par.tp if par.sequence_parallel else 1


def chunk_layers(num_layers: int, par: ParallelSettings) -> list[int]:
    """Layers of each global model chunk (0 .. pp * vpp - 1, chunk g on stage g % pp), in layer order: `pp_layers`
    or megatron's even split."""
    if par.pp_layers is not None:
        return list(par.pp_layers)
    chunks = par.pp * model_chunks(par)
    return [num_layers // chunks] * chunks


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


def stage_params(numels: list[tuple[str, int]], num_layers: int, par: ParallelSettings) -> list[list[list[int]]]:
    """[stage][chunk] -> numels of the parameters one TP rank holds (tensor-parallel weights divided by tp): layers in
    order over the global chunks, the embedding and projector with the first chunk, the final norm, LM head and
    diffusion head with the last."""
    sizes = chunk_layers(num_layers, par)
    chunk_of_layer = [g for g, n in enumerate(sizes) for _ in range(n)]
    out = [[[] for _ in range(model_chunks(par))] for _ in range(par.pp)]
    for key, n in numels:
        if key.startswith("decoder.layers."):
            g = chunk_of_layer[int(key.split(".")[2])]
        else:
            g = 0 if key.startswith(("word_embeddings.", "projector.")) else len(sizes) - 1
        axis, _ = tp_split(key)
        out[g % par.pp][g // par.pp].append(n // par.tp if axis is not None else n)
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


def layer_activation_bytes(cfg: T2IConfig, work: Workload, par: ParallelSettings, how: Behaviour) -> float:
    """Bytes one backbone layer saves for backward per micro-batch (megatron local spec, block-causal attention).

    Sequence-split part (n / tp under sequence parallelism): the two RMSNorms, the inputs of linear_qkv and linear_fc1
    (megatron keeps the un-gathered input). TP-split part (n positions, 1/tp of the heads and MLP channels): the QKV
    output (kept by the V view), the QK-norms (fp32 copy and normalised values), the rotated Q and K, linear_proj's
    input, the attention kernel's own (`core_attention_bytes`), SwiGLU's fc1 output, silu(gate), up + 0 and their
    product (5 x ffn). Per position: RoPE's cos/sin for Q and K.
    """
    m, a, t = cfg.llm, how.param_bytes, par.tp
    D, F, hd = m.hidden_size, m.intermediate_size, m.head_dim
    Q, K = m.num_attention_heads * hd, m.num_key_value_heads * hd
    n = work.tokens
    seq = n / sequence_split(par) * (2 * norm_bytes(D) + 2 * a * D)
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
    core = 0 if par.recompute == "selective" else core_attention_bytes(cfg, work, par, how)
    return seq + n / t * heads + n * 4 * hd * a + core


def core_attention_bytes(cfg: T2IConfig, work: Workload, par: ParallelSettings, how: Behaviour) -> float:
    """What the attention kernel saves beyond its inputs (and what selective recompute, megatron's `core_attn`,
    drops): its log-sum-exp, its output unless it already is linear_proj's input (FlexAttention's and the per-document
    outputs are copied into linear_proj's layout; dense SDPA's is in it), and with a materialised boolean mask SDPA's
    float copy of the mask."""
    m, a = cfg.llm, how.param_bytes
    out = 0 if how.attention == "dense" else a * m.head_dim
    return work.tokens / par.tp * m.num_attention_heads * (out + STATS_BYTES) + a * work.mask_elems(how.attention)


def layer_input_bytes(cfg: T2IConfig, work: Workload, par: ParallelSettings, how: Behaviour) -> float:
    """Bytes a fully recomputed layer keeps: its input (megatron's checkpoint saves the hidden states)."""
    return work.tokens / sequence_split(par) * how.param_bytes * cfg.llm.hidden_size


def embedding_activation_bytes(cfg: T2IConfig, work: Workload, how: Behaviour) -> float:
    """First stage: the projector's input bits, fc1 output, GELU output and index_copy's source per image input."""
    a = how.param_bytes
    return work.image_in * a * (3 * cfg.llm.hidden_size + cfg.latent_dim)


def lm_head_activation_bytes(cfg: T2IConfig, work: Workload, par: ParallelSettings, how: Behaviour) -> float:
    """Last stage: the final norm, the LM head's input rows and the fp32 vocab-parallel softmax of labelled text."""
    D, V = cfg.llm.hidden_size, cfg.llm.vocab_size
    final = work.tokens / sequence_split(par) * norm_bytes(D)
    return final + work.text * (how.param_bytes * D + 4 * V / par.tp)


def head_tokens(cfg: T2IConfig, work: Workload, par: ParallelSettings, how: Behaviour) -> float:
    """Tokens the diffusion head runs on per TP rank (every draw of `diff_batch_mul`)."""
    return cfg.head.diff_batch_mul * work.targets / (par.tp if how.head_split else 1)


def head_recomputed(par: ParallelSettings, how: Behaviour) -> bool:
    """Whether the head's blocks keep only their inputs: `how.head_recompute`, else with full recompute."""
    return par.recompute == "full" if how.head_recompute is None else how.head_recompute


def head_block_bytes(cfg: T2IConfig, how: Behaviour) -> float:
    """Per token, what one adaLN block of the head saves: 20 x width (norm outputs and their (1 + scale), the
    modulated attention input, QKV, attention output, its projection, the MLP input, fc1 output, silu, product,
    fc2 output, the residuals) plus the LayerNorm statistics and the attention log-sum-exp."""
    h = cfg.head
    return 20 * how.param_bytes * h.ch_latent + 4 * STATS_BYTES + STATS_BYTES * (h.ch_latent // h.head_dim)


def head_activation_bytes(cfg: T2IConfig, work: Workload, par: ParallelSettings, how: Behaviour) -> float:
    """Last stage: the diffusion head per token: its condition (cond_embed input), silu input and output, the adaLN
    modulations (6 x width per adaLN layer, kept by every block they modulate), the blocks (only their inputs when
    recomputed), the final layer (norm, modulation, linear input) and the bits-sized tensors of the loss; per patch
    the timestep MLP."""
    h, a = cfg.head, how.param_bytes
    W = h.ch_latent
    block = a * W if head_recomputed(par, how) else head_block_bytes(cfg, how)
    per_token = (
        a * h.ch_cond
        + 2 * a * W
        + 6 * a * W * h.depth_adanln
        + h.depth_latent * block
        + 4 * a * W
        + 2 * STATS_BYTES
        + h.ch_target * (a + 3 * 4)
    )
    n = head_tokens(cfg, work, par, how)
    return n * per_token + n / cfg.parallel_num * a * (256 + 2 * W)


HEAD_TAIL_WIDTHS = 5  # head-width temporaries per head token alive at the end of the head's forward (measured)
HEAD_GRAD_WIDTHS = 4  # head-width gradients per head token alive in the head's backward (measured)


def layer_grad_bytes(cfg: T2IConfig, work: Workload, par: ParallelSettings, how: Behaviour) -> float:
    """Gradients alive inside one backbone layer's backward beyond its activations (measured): of its output and
    input, and one MLP-wide gradient."""
    m, a = cfg.llm, how.param_bytes
    n = work.tokens
    return 2 * n / sequence_split(par) * a * m.hidden_size + n / par.tp * a * m.intermediate_size


def working_bytes(cfg: T2IConfig, work: Workload, par: ParallelSettings, how: Behaviour, last: bool) -> float:
    """Memory beyond what the forward saved, at the worst moment of a step (the largest of these phases):

    - a backbone layer's backward: its gradients (and with pipelining the activation / gradient in transit), plus
      its rematerialised activations under full recompute (its attention under selective); on the last stage the
      head's activations are freed by then;
    - last stage, end of the forward: the gathered hidden states, the conditions of all targets (before each TP
      rank takes its share), the head's temporaries;
    - last stage, the head's backward: its gradients, plus one rematerialised block when the blocks recompute."""
    h, a = cfg.head, how.param_bytes
    layer = layer_grad_bytes(cfg, work, par, how)
    if par.pp > 1:  # the pipeline's gradient being received and the activation being sent
        layer += 2 * layer_input_bytes(cfg, work, par, how)
    if par.recompute == "full":
        layer += layer_activation_bytes(cfg, work, par, how)
    elif par.recompute == "selective":
        layer += core_attention_bytes(cfg, work, par, how)
    if not last:
        return layer
    tokens = head_tokens(cfg, work, par, how)
    layer -= head_activation_bytes(cfg, work, par, how)
    tail = a * cfg.llm.hidden_size * (work.tokens + work.targets) + HEAD_TAIL_WIDTHS * a * h.ch_latent * tokens
    block = head_block_bytes(cfg, how) if head_recomputed(par, how) else 0
    head = tokens * (block + HEAD_GRAD_WIDTHS * a * h.ch_latent)
    return max(layer, tail, head)


def in_flight(par: ParallelSettings, stage: int, micro_batches: int) -> int:
    """Chunk micro-batches whose activations stage `stage` holds at once (megatron's warmup count + 1)."""
    if par.pp == 1:
        return 1
    if par.virtual_pp is None:
        return min(par.pp - stage, micro_batches)
    warmup = 2 * (par.pp - stage - 1) + (par.virtual_pp - 1) * par.pp
    return min(warmup + 1, micro_batches * par.virtual_pp)


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
    par: ParallelSettings,
    dp: int,
    work: Workload,
    micro_batches: int,
    how: Behaviour,
    overhead: float = FIXED_OVERHEAD_GIB * GiB,
) -> list[StageMemory]:
    """Per pipeline stage, the memory of one of its GPUs (every TP rank holds the same)."""
    m = cfg.llm
    params = stage_params(param_numels(cfg), m.num_hidden_layers, par)
    per_layer = (layer_input_bytes if par.recompute == "full" else layer_activation_bytes)(cfg, work, par, how)
    stage_layers = stage_layer_counts(m.num_hidden_layers, par)
    rope_and_mask = work.tokens * 4 * m.head_dim + work.mask_elems(how.attention)
    out = []
    for r, chunks in enumerate(params):
        padded = sum(buffer_numel(c, dp) for c in chunks)
        real = sum(sum(c) for c in chunks)
        flying = in_flight(par, r, micro_batches)
        acts = flying * (stage_layers[r] // model_chunks(par) * per_layer + rope_and_mask)
        if par.sequence_parallel:  # megatron's all-gather buffer of the sequence-parallel linear inputs, kept
            acts += work.tokens * how.param_bytes * m.hidden_size
        if par.pp > 1 and (r > 0 or par.virtual_pp) and how.param_bytes < 4 and par.recompute != "full":
            acts += flying * layer_input_bytes(cfg, work, par, how)  # received inputs (the first norm saves an upcast)
        if r == 0:
            acts += min(flying, micro_batches) * embedding_activation_bytes(cfg, work, how)
        last = r == par.pp - 1
        head = 0.0
        if last:
            head = lm_head_activation_bytes(cfg, work, par, how) + head_activation_bytes(cfg, work, par, how)
        out.append(
            StageMemory(
                stage=r,
                weights=padded * how.param_bytes,
                grads=padded * GRAD_BYTES,
                optimizer=real / dp * (ADAM_BYTES + how.main_bytes),
                ema=real / dp * 4,
                activations=acts,
                head=head,
                working=working_bytes(cfg, work, par, how, last),
                overhead=overhead,
            )
        )
    return out
