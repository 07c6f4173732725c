"""`MegatronT2IBitDance`: the text-to-image model of `models.t2i.model` on megatron-core, one pipeline stage of it.

Built on megatron's `TransformerBlock` (not GPTModel) so the stage ends can hold what a language model does not:

- first stage (`pre_process`): `VocabParallelEmbedding` for text ids, then the image-token embeddings
  (projector(bits) + 2D sin-cos) index-copied into their positions by the reference's own
  `scatter_image_embeddings`, then (sequence parallel) scattered along the sequence;
- last stage (`post_process`): the final norm (inside the block), the hidden states gathered back to the full
  sequence, the LM head as a vocab-sharded `ColumnParallelLinear` on the labelled positions only with
  `vocab_parallel_cross_entropy`, and the diffusion head on the head conditions (hidden + 2D sin-cos); the head
  conditions, the vision loss and the weighted loss are the reference's functions (`models.t2i.model`).

Design:

- Checkpoints: the inherited `sharded_state_dict()` is the dist_checkpointing layout. `TransformerBlock` keys its
  layers by global index (layer offset of this stage and virtual chunk), the vocab-parallel embedding, the LM head
  and the column/row-parallel layer weights carry their TP axis, and every plain torch submodule (projector,
  diffusion head, norms) is a replicated tensor whose main replica is TP rank 0 / DP rank 0.
- Mask: every stage builds `block_causal_mask` from the batch it reads (doc/block ids stacked into one tensor, its
  kernel mask built once per forward and shared by the layers) and passes it as `attention_mask`; the schedule
  gives every stage the batch, so no mask crosses the pipeline.
- RoPE: megatron's `RotaryEmbedding` (base 1e6) owns the inverse frequencies; its forward only makes positions
  0..s-1, so angles for the packed per-token `position_ids` are formed here and passed as `rotary_pos_emb`
  [s, b, 1, d]; megatron applies them rotate-half (non-interleaved) like HF Qwen3 / models/t2i/qwen3.py.
- Diffusion head: replicated on every TP rank of the last stage (not sharded: a second TP implementation of
  models/core/diffusion_head.py would be needed), but its work is split: each TP rank runs it on a contiguous
  1/tp share of the micro-batch's image patches (whole patches of P tokens, `torch.tensor_split` counts), so the
  head's activations per rank (tens of GiB per micro-batch at 14B) drop ~1/tp. Three TP collectives keep loss and
  gradients those of the whole batch: the per-rank vision loss sums are all-reduced
  (`reduce_from_tensor_model_parallel_region`, backward identity), so every rank holds the full loss; the head
  conditions pass `copy_to_tensor_model_parallel_region` (forward identity, backward all-reduce), so the partial
  condition gradients of the ranks are summed before they enter the backbone; and the head's parameter gradients,
  partial per rank, are summed over TP by the engine after the backward (megatron's `finalize_model_grads` sums only
  sequence-parallel norm grads; training/engines/megatron.py wraps it). With sequence parallelism the hidden states
  are gathered with `tensor_parallel_output_grad=False` (backward: split, no reduction): the gradient arriving
  there is complete on every rank (the LM head's input all-reduce plus the conditions' all-reduce).
  Random draws: the head's times and noises are drawn for all patches on every TP rank, in the order
  `BinaryDiffusionHead.loss` draws them, from the default generator (seeded alike on the TP ranks of a
  data-parallel replica, as megatron's `model_parallel_cuda_manual_seed` does), and each rank keeps its share: the
  draws are a few MB (C numbers per token) next to the head's activations, keep the default generators of the TP
  ranks in step (the first stage's bit flips need that) and make results independent of tp; tp=1 computes exactly
  what the unsplit head did. The projector on the first stage is replicated and runs on every rank. With FP8 the
  head and projector stay BF16 (FP8 autocast wraps only the backbone layers).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from models.core.diffusion_head import BinaryDiffusionHead
from models.t2i.megatron.attention import block_causal_mask
from models.t2i.megatron.config import MegatronParallelConfig, transformer_config
from models.t2i.megatron.spec import block_spec
from models.t2i.model import (
    T2IConfig,
    T2ILoss,
    VisionProjector,
    check_batch,
    combine_losses,
    head_conditions,
    scatter_image_embeddings,
    vision_loss_sum,
)
from models.t2i.packing import IGNORE_INDEX, PackedT2IBatch


class MegatronT2IBitDance(MegatronModule):
    def __init__(
        self,
        cfg: T2IConfig,
        par: MegatronParallelConfig,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ):
        """One model chunk: `pre_process` / `post_process` mark the first / last chunk of the whole pipeline,
        `vp_stage` is the chunk's index on its pipeline rank under interleaving (None without)."""
        config = transformer_config(cfg, par)
        super().__init__(config=config)
        self.cfg, self.par, self.vp_stage = cfg, par, vp_stage
        self.pre_process, self.post_process = pre_process, post_process
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.share_embeddings_and_output_weights = False  # read by megatron's finalize_model_grads
        m = cfg.llm
        self.rotary_pos_emb = RotaryEmbedding(
            m.head_dim, rotary_percent=1.0, rotary_base=m.rope_theta, use_cpu_initialization=True
        )
        self.decoder = TransformerBlock(
            config,
            block_spec(config, par, vp_stage, cfg.attention),
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        tp_group, init = parallel_state.get_tensor_model_parallel_group(), config.init_method
        if pre_process:
            self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
                m.vocab_size, m.hidden_size, init_method=init, config=config, tp_group=tp_group
            )
            self.projector = VisionProjector(cfg.latent_dim, m.hidden_size).to(config.params_dtype)
        if post_process:
            head_config = copy.copy(config)  # the LM head sees the gathered sequence: no sequence parallelism
            head_config.sequence_parallel = False
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                m.hidden_size, m.vocab_size, config=head_config, init_method=init, bias=False, tp_group=tp_group
            )
            self.vision_head = BinaryDiffusionHead(cfg.head).to(config.params_dtype)
            self.head_tp_group = tp_group  # the head's patches are split over it (see `vision_loss`)

    def set_input_tensor(self, input_tensor) -> None:
        """The previous stage's output (pipeline schedules pass a one-element list)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def rotary_freqs(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Angles [s, b, 1, head_dim] for packed positions [b, s]: pos * inv_freq, both halves alike."""
        inv_freq = self.rotary_pos_emb.inv_freq.to(position_ids.device)
        angles = position_ids.t().float()[..., None] * inv_freq
        return torch.cat([angles, angles], dim=-1)[:, :, None, :]

    def embed(self, batch: PackedT2IBatch) -> torch.Tensor:
        """First-stage input [s(/tp), b, D]: text embeddings with image-token embeddings copied in."""
        embeds = self.word_embeddings(batch.input_ids)  # [b, s, D], full on every TP rank
        flip_p = self.cfg.flip_p_max if self.training else 0.0
        hidden = scatter_image_embeddings(embeds, batch, self.projector, flip_p).transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        return hidden

    def forward(
        self, batch: PackedT2IBatch, head_t: torch.Tensor | None = None, head_noise: torch.Tensor | None = None
    ) -> torch.Tensor | T2ILoss:
        """Hidden states [s(/tp), b, D] for the next stage, or on the last stage the loss terms of the reference
        `TextToImageBitDance.forward` (`head_t` / `head_noise` fix the diffusion draws, for tests)."""
        length = batch.input_ids.shape[1]
        if self.config.sequence_parallel and length % self.par.tp:
            raise ValueError(
                f"sequence parallelism needs the packed length {length} to be a multiple of "
                f"tp={self.par.tp}; pad it with models.t2i.megatron.batch.pad_packed_batch"
            )
        mask = block_causal_mask(batch.doc_ids, batch.block_ids, self.cfg.attention)  # a tensor: recompute saves it
        hidden = self.embed(batch) if self.pre_process else None
        hidden = self.decoder(
            hidden_states=hidden, attention_mask=mask, rotary_pos_emb=self.rotary_freqs(batch.position_ids)
        )
        if not self.post_process:
            return hidden
        return self.loss(hidden, batch, head_t, head_noise)

    def loss(self, hidden: torch.Tensor, batch: PackedT2IBatch, head_t, head_noise) -> T2ILoss:
        check_batch(batch, self.cfg)
        if self.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        flat = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])  # [b * s, D], rows in the batch's flat order
        labels = batch.text_labels.reshape(-1)
        labelled = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        logits, _ = self.output_layer(flat[labelled][:, None])  # [n, 1, vocab / tp]
        text_sum = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels[labelled][:, None]).sum()
        vision_sum = self.vision_loss(flat, batch, head_t, head_noise)
        return combine_losses(text_sum, labelled.numel(), vision_sum, batch.target_bits.shape[0], self.cfg)

    def vision_loss(self, flat: torch.Tensor, batch: PackedT2IBatch, head_t, head_noise) -> torch.Tensor:
        """The vision loss sum over all targets, the head run on this TP rank's share of the patches (see the
        module docstring); `head_t` [k * n] / `head_noise` [k * n, P, C] are for all n patches of the batch."""
        P, C, k = self.cfg.parallel_num, self.cfg.latent_dim, self.cfg.head.diff_batch_mul
        n = batch.target_bits.shape[0] // P
        if head_t is None:  # drawn as BinaryDiffusionHead.loss does: times, then noises, for all k * n rows
            head_t = self.vision_head.sample_time(k * n, flat.device)
        if head_noise is None:
            head_noise = torch.randn(k * n, P, C, device=flat.device)
        if head_t.numel() != k * n or head_noise.numel() != k * n * P * C:
            raise ValueError(f"head_t / head_noise must hold draws for all {k} x {n} patch rows of the batch")
        part = patch_share(n, self.head_tp_group.size(), self.head_tp_group.rank())
        tokens = slice(part.start * P, part.stop * P)
        cond = tensor_parallel.copy_to_tensor_model_parallel_region(head_conditions(flat, batch), self.head_tp_group)
        mine = replace(
            batch,
            target_index=batch.target_index[tokens],
            target_bits=batch.target_bits[tokens],
            target_coords=batch.target_coords[tokens],
        )
        t = head_t.view(k, n)[:, part].reshape(-1)
        noise = head_noise.view(k, n, P, C)[:, part].reshape(-1, P, C)
        local = vision_loss_sum(self.vision_head, cond[tokens], mine, self.cfg, t, noise)
        return tensor_parallel.reduce_from_tensor_model_parallel_region(local, self.head_tp_group)


def patch_share(n: int, parts: int, index: int) -> slice:
    """Patches of share `index` when n patches are cut into `parts` contiguous shares as `torch.tensor_split`
    cuts them (the first n % parts shares hold one more; shares may be empty)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))
