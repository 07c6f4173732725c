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
- Mask: every stage builds a `BlockCausalMask` from the batch it reads (doc/block ids) and passes it as
  `attention_mask`; the schedule gives every stage the batch, so no mask crosses the pipeline.
- RoPE: megatron's `RotaryEmbedding` (base 1e6) owns the inverse frequencies; its forward only makes positions
  0..s-1, so angles for the packed per-token `position_ids` are formed here and passed as `rotary_pos_emb`
  [s, b, 1, d]; megatron applies them rotate-half (non-interleaved) like HF Qwen3 / models/t2i/qwen3.py.
- Diffusion head: replicated on every TP rank of the last stage, not sharded. It is a small transformer over P
  tokens per patch (1.6B parameters at 14B scale) whose cost is a few percent of the backbone's; sharding it would
  need a second TP implementation of models/core/diffusion_head.py. Its input (the gathered hidden states) and its
  random draws (default generator, seeded alike on the TP ranks of a data-parallel replica, as megatron's
  `model_parallel_cuda_manual_seed` does) are identical on every TP rank, so every TP rank computes the same
  loss and the same head gradient: no TP all-reduce is needed, only the usual data-parallel one. The gather keeps
  that true backwards: `tensor_parallel_output_grad=False` makes its backward a split, which is right because the
  gradient arriving there is already complete on every rank (the LM head's all-reduce plus the replicated head's).
  The projector on the first stage is replicated the same way. With FP8 the head and projector stay BF16 (FP8
  autocast wraps only the backbone layers).
"""

from __future__ import annotations

import copy

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from models.core.diffusion_head import BinaryDiffusionHead
from models.t2i.megatron.attention import BlockCausalMask
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
            block_spec(config, par, vp_stage),
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
        mask = BlockCausalMask(batch.doc_ids, batch.block_ids, self.cfg.attention)
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
        cond = head_conditions(flat, batch)
        vision_sum = vision_loss_sum(self.vision_head, cond, batch, self.cfg, head_t, head_noise)
        return combine_losses(text_sum, labelled.numel(), vision_sum, batch.target_bits.shape[0], self.cfg)
