"""The text-to-image task: `TextToImageBitDance` (or, under an engine that shards the model, the config and initial
weights the engine shards), packed binary-token rows from the loader, sample grids from prompts, and the official
folder export."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig, data_manifest
from data_pipeline.loader.packing import seed_of
from models.core.attention import resolve_attention
from models.core.diffusion_head import fixed_draws
from models.t2i.flops import t2i_batch_flops
from models.t2i.megatron.batch import FLEX_BLOCK, fixed_length, pad_to_length, row_length
from models.t2i.model import T2IConfig, TextToImageBitDance, get_t2i_config
from models.t2i.packing import PackedT2IBatch
from models.t2i.repatch import QueryRows, query_rows, repatch_, with_parallel_num
from models.tokenizer.model import tensor_to_images
from training.config import TrainConfig
from training.engines import engine_class
from training.finetune import Targets
from training.tasks import StepOutput, Task, image_grid

# what finetune.method=lora|head adapts: LoRA on the decoder layers' linears (and the head's); head trains the diffusion
# head, the projector (the image-token embedding) and the text-embedding rows of the query tokens (set per dataset)
T2I_TARGETS = Targets(
    layers="llm.model.layers",
    head="vision_head.net",
    parts=("vision_head.net", "projector"),
    embedding="llm.model.embed_tokens",
)


class T2ITask(Task):
    kind = "t2i"
    finetune_targets = T2I_TARGETS

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.manifest = data_manifest(cfg.data)  # data_dir or the sources of a mixture, local or at a URL
        text = self.manifest["text_tokens"]
        sizes = tuple(tuple(s) for s in self.manifest["identity"]["sizes"])
        mcfg = get_t2i_config(
            cfg.model.name, attention=cfg.model.attention, image_sizes=sizes, downsample=self.manifest["downsample"]
        )
        if mcfg.parallel_num != text["parallel_num"]:
            raise ValueError(
                f"model {cfg.model.name} predicts P={mcfg.parallel_num} tokens but the data was tokenized for "
                f"P={text['parallel_num']} (its query tokens); re-tokenize or pick the matching model"
            )
        if mcfg.latent_dim != self.manifest["bits_per_token"]:
            raise ValueError(f"data has {self.manifest['bits_per_token']}-bit tokens, model expects {mcfg.latent_dim}")
        mcfg = replace(mcfg, llm=replace(mcfg.llm, vocab_size=self.vocab(mcfg.llm.vocab_size)))
        self.init_checkpoint: Path | None = None
        self.init_folder: Path | None = None
        if engine_class(cfg).shards_model:
            self.model, mcfg = self._init_sharded(mcfg)
        else:
            self.model = self._init_model(mcfg)
        self.model_cfg = self.model.cfg if self.model is not None else mcfg
        self.finetune_targets = replace(T2I_TARGETS, rows=tuple(text["query_ids"]))
        # compiled FlexAttention recompiles for every new row length: give it one (the megatron engine pads itself)
        flex = resolve_attention(cfg.model.attention, device.type == "cuda") == "flex"
        self.row_length = row_length(cfg.data.token_budget, flex=True) if flex else None

    def vocab(self, model_vocab: int) -> int:
        """Text vocabulary to train with: the model's or the data's, whichever is larger, padded to a multiple of the
        multiple the engine needs (the tensor-parallel size under megatron; padding rows are never used)."""
        n = max(model_vocab, self.manifest["text_tokens"]["vocab_size"])
        multiple = engine_class(self.cfg).vocab_multiple(self.cfg)
        return -(-n // multiple) * multiple

    def _init_sharded(self, mcfg) -> tuple[TextToImageBitDance | None, T2IConfig]:
        """An engine that shards the model (megatron) builds its own chunks and loads `model.init_from` itself: a
        megatron checkpoint (`init_checkpoint`, which supplies the model config) or an official / Hugging Face Qwen3
        folder (`init_folder`). Returns (None, the model config)."""
        from training.engines.megatron_checkpoint import is_megatron_checkpoint, model_config_of

        src = self.cfg.model.init_from
        if src and is_megatron_checkpoint(src):
            self.init_checkpoint = Path(src)
            ckpt_cfg = replace(model_config_of(src), attention=mcfg.attention, image_sizes=mcfg.image_sizes)
            if (ckpt_cfg.parallel_num, ckpt_cfg.latent_dim) != (mcfg.parallel_num, mcfg.latent_dim):
                raise ValueError(
                    f"checkpoint {src} predicts P={ckpt_cfg.parallel_num} {ckpt_cfg.latent_dim}-bit "
                    f"tokens; the data has P={mcfg.parallel_num}, {mcfg.latent_dim} bits (to start another P from it, "
                    "export it to a folder with `python -m training.checkpoint export` and pass the folder)"
                )
            data_vocab = self.manifest["text_tokens"]["vocab_size"]
            if ckpt_cfg.llm.vocab_size < data_vocab:
                raise ValueError(
                    f"checkpoint {src} embeds {ckpt_cfg.llm.vocab_size} text tokens but the data uses "
                    f"{data_vocab}; re-import it with --vocab-size"
                )
            return None, ckpt_cfg
        if src:  # each rank reads its own shard of the folder (no full model anywhere)
            self.init_folder = Path(src)
            return None, self._folder_config(mcfg)
        return None, mcfg

    def _folder_config(self, mcfg) -> T2IConfig:
        """The model `model.init_from=<official or Hugging Face Qwen3 folder>` makes, without reading its weights:
        an official folder's own config (or `mcfg` with the folder's backbone), the vocabulary resized for the data."""
        from models.t2i.io import folder_parallel_num, qwen3_t2i_config, t2i_folder_config

        src = Path(self.cfg.model.init_from)
        if (src / "vision_head_config.json").is_file():
            source_p = folder_parallel_num(src)
            same_p = source_p == mcfg.parallel_num
            cfg, _ = t2i_folder_config(src, self.cfg.model.attention, mcfg.image_sizes if same_p else None)
            if not same_p:  # the engine's FolderLayers sets the new query rows
                self._query_rows(src, source_p, mcfg.parallel_num)
                cfg = with_parallel_num(cfg, mcfg.parallel_num, mcfg.image_sizes)
        else:
            cfg = qwen3_t2i_config(src, mcfg)
        return replace(cfg, llm=replace(cfg.llm, vocab_size=self.vocab(cfg.llm.vocab_size)))

    def _init_model(self, mcfg) -> TextToImageBitDance:
        src = self.cfg.model.init_from
        if src and (Path(src) / "vision_head_config.json").is_file():
            from models.t2i.io import folder_parallel_num, load_t2i_folder

            source_p = folder_parallel_num(src)
            sizes = mcfg.image_sizes if source_p == mcfg.parallel_num else None  # the data's sizes tile into P' patches
            model, _, _ = load_t2i_folder(src, attention=self.cfg.model.attention, image_sizes=sizes)
            model.resize_vocab(self.vocab(model.cfg.llm.vocab_size))
            if source_p != mcfg.parallel_num:
                rows = self._query_rows(src, source_p, mcfg.parallel_num)
                repatch_(model, mcfg.parallel_num, rows, mcfg.image_sizes)
            return model.float().to(self.device)
        if src:  # a Hugging Face Qwen3 folder: the backbone starts from it
            from models.t2i.io import t2i_from_qwen3_folder

            model = t2i_from_qwen3_folder(src, mcfg)
            model.resize_vocab(self.vocab(model.cfg.llm.vocab_size))
            return model.to(self.device)
        return TextToImageBitDance(mcfg).to(self.device)

    def _query_rows(self, src, source_p: int, target_p: int) -> QueryRows:
        """The query rows a P=`source_p` folder needs as a P'=`target_p` model (`models.t2i.repatch`), checked against
        the query ids the data was tokenized with."""
        rows = query_rows(src, source_p, target_p)
        data_ids = tuple(self.manifest["text_tokens"]["query_ids"])
        if rows.target != data_ids:
            raise ValueError(
                f"{src}'s text tokenizer gives the P={target_p} query tokens ids {list(rows.target[:3])}... but the "
                f"data was tokenized with {list(data_ids[:3])}...; tokenize with --text-tokenizer {src}"
            )
        return rows

    def loader(self, rank: int, world: int) -> BinaryTokenLoader:
        d = self.cfg.data
        lc = LoaderConfig.from_settings(
            d,
            d.data_dir,
            kind="t2i",
            seed=self.cfg.seed,
            rows_per_batch=d.micro_batch,
            sources=d.sources,
        )
        return BinaryTokenLoader(lc, rank=rank, world_size=world)

    metric_names = ("loss/text_ce", "loss/vision")

    @staticmethod
    def loss_metrics(out) -> dict[str, torch.Tensor]:
        return {"loss/text_ce": out.text_ce.detach(), "loss/vision": out.vision_loss.detach()}

    @staticmethod
    def counts(model_cfg: T2IConfig, batch: PackedT2IBatch) -> tuple[int, int, float]:
        """(samples, real tokens, model FLOPs of forward + backward) of a packed batch."""
        flops = t2i_batch_flops(model_cfg, batch)["total"]
        return batch.num_samples, int((batch.doc_ids >= 0).sum()), float(flops)

    def batch_counts(self, batch: PackedT2IBatch) -> tuple[int, int, float]:
        return self.counts(self.model_cfg, batch)

    def step(self, forward, batch) -> StepOutput:
        if self.row_length is not None:  # padding is document -1: no loss, no attention to or from real tokens
            length = max(self.row_length, fixed_length(batch.input_ids.shape[1], FLEX_BLOCK))
            batch = pad_to_length(batch, length, pad_id=0)
        batch = batch.to(self.device)
        out = forward(batch)
        metrics = {k: v.item() for k, v in self.loss_metrics(out).items()}
        return StepOutput(out.loss, metrics, *self.batch_counts(batch))

    validation_kind = "t2i"

    def validation_inputs(self, batch: PackedT2IBatch, index: int) -> tuple:
        if self.row_length is not None:
            batch = pad_to_length(batch, max(self.row_length, fixed_length(batch.input_ids.shape[1], FLEX_BLOCK)), 0)
        patches = batch.target_bits.shape[0] // self.model_cfg.parallel_num
        gen = torch.Generator().manual_seed(seed_of("validation", self.cfg.seed, index))
        return (batch, *fixed_draws(self.model_cfg.head, patches, gen))

    def validation_sums(self, out, inputs: tuple) -> torch.Tensor:
        values = (out.text_ce_sum.detach(), out.text_tokens, out.vision_loss_sum.detach(), out.vision_tokens)
        return torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu() for v in values])

    def validation_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        text_sum, n_text, vision_sum, n_vis = sums.tolist()
        text, vision = text_sum / max(n_text, 1.0), vision_sum / max(n_vis, 1.0)
        m = self.model_cfg
        loss = m.text_loss_weight * text + m.vision_loss_weight * vision
        return {"val/loss": loss, "val/text_ce": text, "val/vision": vision, "val/tokens": n_text + n_vis}

    def sample_grid(self, model: TextToImageBitDance) -> Image.Image | None:
        ev, mc = self.cfg.eval, self.cfg.model
        if not (ev.prompts and mc.image_tokenizer and mc.text_tokenizer):
            return None
        from models.t2i.sampler import sample_t2i

        text, ae = self.tokenizers
        gen = torch.Generator(device=self.device).manual_seed(0)
        bits = sample_t2i(model, text, list(ev.prompts), ev.height, ev.width, self.cfg.sampling, generator=gen)
        images = tensor_to_images(ae.decode(bits.to(next(ae.parameters()).dtype))).cpu().numpy()  # a bf16 model's bits
        model.train()
        return image_grid([Image.fromarray(i) for i in images], columns=min(4, len(images)))

    @functools.cached_property
    def tokenizers(self):
        """(text tokenizer, image tokenizer) for sampling and export, loaded once."""
        from models.t2i.text_tokenizer import T2ITextTokenizer
        from models.tokenizer.io import load_tokenizer

        mc = self.cfg.model
        text = T2ITextTokenizer.from_folder(mc.text_tokenizer, self.model_cfg.parallel_num)
        return text, load_tokenizer(mc.image_tokenizer, device=self.device)

    def export(self, model: TextToImageBitDance, out_dir: Path) -> Path | None:
        mc = self.cfg.model
        if not (mc.image_tokenizer and mc.text_tokenizer):
            return None
        from models.t2i.io import export_t2i_folder

        text, ae = self.tokenizers
        return export_t2i_folder(model, text, ae, out_dir)
