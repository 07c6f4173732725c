"""What is being trained: one small builder per model kind (model, data loader, loss, FLOPs, samples, export).

The loop in `training/train.py` only talks to a `Task`; models stay plain PyTorch modules.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig
from data_pipeline.shard_format import load_manifest
from models.c2i.model import ClassConditionalBitDance, get_c2i_config
from models.t2i.model import T2IConfig, TextToImageBitDance, get_t2i_config
from models.tokenizer.model import tensor_to_images
from training.config import TrainConfig


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, float]
    samples: int
    tokens: int


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = max(i.width for i in images), max(i.height for i in images)
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for k, img in enumerate(images):
        grid.paste(img, ((k % columns) * w, (k // columns) * h))
    return grid


def dense_params(model: nn.Module) -> int:
    """Parameters that cost FLOPs per token (embedding tables excluded)."""
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return sum(p.numel() for p in model.parameters()) - emb


class Task:
    kind: str
    model: nn.Module

    def loader(self, rank: int, world: int) -> BinaryTokenLoader: ...

    def step(self, forward, batch) -> StepOutput: ...

    def flops_per_token(self) -> float:
        return 6.0 * dense_params(self.model)

    def sample_grid(self, model: nn.Module) -> Image.Image | None:
        return None

    def export(self, model: nn.Module, out_dir: Path) -> Path | None:
        return None


class T2ITask(Task):
    kind = "t2i"

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.manifest = load_manifest(Path(cfg.data.data_dir))
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
        if cfg.engine.kind == "megatron":
            self.model, mcfg = self._init_megatron(mcfg)
        else:
            self.model = self._init_model(mcfg)
        self.model_cfg = self.model.cfg if self.model is not None else mcfg

    def vocab(self, model_vocab: int) -> int:
        """Text vocabulary to train with: the model's or the data's, whichever is larger, padded to a multiple of the
        tensor-parallel size under the megatron engine (padding rows are never used)."""
        n = max(model_vocab, self.manifest["text_tokens"]["vocab_size"])
        tp = self.cfg.parallel.tp if self.cfg.engine.kind == "megatron" else 1
        return -(-n // tp) * tp

    def _init_megatron(self, mcfg) -> tuple[TextToImageBitDance | None, T2IConfig]:
        """The megatron engine builds its own model chunks: returns the full reference model (on CPU) only when its
        weights come from an official or Hugging Face folder; a megatron checkpoint in `model.init_from` is loaded
        by the engine (sharded) and supplies the model config."""
        from training.engines.megatron_checkpoint import is_megatron_checkpoint, model_config_of

        src = self.cfg.model.init_from
        if src and is_megatron_checkpoint(src):
            self.init_checkpoint = Path(src)
            ckpt_cfg = replace(model_config_of(src), attention=mcfg.attention, image_sizes=mcfg.image_sizes)
            if (ckpt_cfg.parallel_num, ckpt_cfg.latent_dim) != (mcfg.parallel_num, mcfg.latent_dim):
                raise ValueError(
                    f"checkpoint {src} predicts P={ckpt_cfg.parallel_num} {ckpt_cfg.latent_dim}-bit "
                    f"tokens; the data has P={mcfg.parallel_num}, {mcfg.latent_dim} bits"
                )
            data_vocab = self.manifest["text_tokens"]["vocab_size"]
            if ckpt_cfg.llm.vocab_size < data_vocab:
                raise ValueError(
                    f"checkpoint {src} embeds {ckpt_cfg.llm.vocab_size} text tokens but the data uses "
                    f"{data_vocab}; re-import it with --vocab-size"
                )
            return None, ckpt_cfg
        if src:
            device, self.device = self.device, torch.device("cpu")
            try:
                model = self._init_model(mcfg)
            finally:
                self.device = device
            return model, model.cfg
        return None, mcfg

    def _init_model(self, mcfg) -> TextToImageBitDance:
        src = self.cfg.model.init_from
        if src and (Path(src) / "vision_head_config.json").is_file():
            from models.t2i.io import load_t2i_folder

            model, _, _ = load_t2i_folder(src, attention=self.cfg.model.attention, image_sizes=mcfg.image_sizes)
            model.resize_vocab(self.vocab(model.cfg.llm.vocab_size))
            return model.float().to(self.device)
        if src:  # a Hugging Face Qwen3 folder: the backbone starts from it
            import json

            from models.core.state_dict import load_state_dict_strict
            from models.t2i.io import read_llm_state_dict
            from models.t2i.qwen3 import Qwen3Config

            llm = Qwen3Config.from_hf_dict(json.loads((Path(src) / "config.json").read_text()))
            model = TextToImageBitDance(replace(mcfg, llm=llm, head=replace(mcfg.head, ch_cond=llm.hidden_size)))
            load_state_dict_strict(model.llm, read_llm_state_dict(Path(src)), f"Qwen3 backbone in {src}")
            model.resize_vocab(self.vocab(llm.vocab_size))
            return model.to(self.device)
        return TextToImageBitDance(mcfg).to(self.device)

    def loader(self, rank: int, world: int) -> BinaryTokenLoader:
        d = self.cfg.data
        lc = LoaderConfig(
            d.data_dir,
            kind="t2i",
            seed=self.cfg.seed,
            shuffle_buffer=d.shuffle_buffer,
            token_budget=d.token_budget,
            rows_per_batch=d.micro_batch,
            parallel_num=self.model_cfg.parallel_num,
            caption_dropout=d.caption_dropout,
            num_workers=d.num_workers,
        )
        return BinaryTokenLoader(lc, rank=rank, world_size=world)

    metric_names = ("loss/text_ce", "loss/vision")

    @staticmethod
    def loss_metrics(out) -> dict[str, torch.Tensor]:
        return {"loss/text_ce": out.text_ce.detach(), "loss/vision": out.vision_loss.detach()}

    @staticmethod
    def batch_counts(batch) -> tuple[int, int]:
        """(samples, real tokens) of a packed batch."""
        return batch.num_samples, int((batch.doc_ids >= 0).sum())

    def step(self, forward, batch) -> StepOutput:
        batch = batch.to(self.device)
        out = forward(batch)
        metrics = {k: v.item() for k, v in self.loss_metrics(out).items()}
        return StepOutput(out.loss, metrics, *self.batch_counts(batch))

    def flops_per_token(self) -> float:
        if self.model is not None:
            return super().flops_per_token()
        with torch.device("meta"):
            return 6.0 * dense_params(TextToImageBitDance(self.model_cfg))

    def sample_grid(self, model: TextToImageBitDance) -> Image.Image | None:
        ev, mc = self.cfg.eval, self.cfg.model
        if not (ev.prompts and mc.image_tokenizer and mc.text_tokenizer):
            return None
        from models.t2i.sampler import sample_t2i

        text, ae = self.tokenizers
        gen = torch.Generator(device=self.device).manual_seed(0)
        bits = sample_t2i(model, text, list(ev.prompts), ev.height, ev.width, ev.num_steps, ev.cfg_scale, generator=gen)
        images = tensor_to_images(ae.decode(bits)).cpu().numpy()
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


class C2ITask(Task):
    kind = "c2i"

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.manifest = load_manifest(Path(cfg.data.data_dir))
        size = self.manifest["identity"]["image_size"]
        mcfg = get_c2i_config(
            cfg.model.name,
            image_size=size,
            downsample=self.manifest["downsample"],
            latent_dim=self.manifest["bits_per_token"],
        )
        if cfg.model.init_from:
            from models.c2i.io import load_c2i_checkpoint

            self.model, _ = load_c2i_checkpoint(cfg.model.init_from, mcfg, tokenizer_path=cfg.model.image_tokenizer)
            self.model.train()
        else:
            self.model = ClassConditionalBitDance(mcfg)
        self.model.to(device)

    def loader(self, rank: int, world: int) -> BinaryTokenLoader:
        d = self.cfg.data
        lc = LoaderConfig(
            d.data_dir,
            kind="imagenet",
            seed=self.cfg.seed,
            shuffle_buffer=d.shuffle_buffer,
            batch_size=d.micro_batch,
            num_workers=d.num_workers,
        )
        return BinaryTokenLoader(lc, rank=rank, world_size=world)

    def step(self, forward, batch) -> StepOutput:
        bits, labels = (t.to(self.device) for t in batch)
        loss = forward(bits, labels)
        tokens = labels.numel() * bits.shape[2] * bits.shape[3]
        return StepOutput(loss, {"loss/vision": loss.item()}, labels.numel(), tokens)

    def sample_grid(self, model: ClassConditionalBitDance) -> Image.Image | None:
        ev, mc = self.cfg.eval, self.cfg.model
        if not (ev.classes and mc.image_tokenizer):
            return None
        from models.c2i.sampler import sample_class_conditional
        from models.tokenizer.io import load_tokenizer

        ae = load_tokenizer(mc.image_tokenizer, device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(0)
        labels = torch.tensor(list(ev.classes), device=self.device)
        bits = sample_class_conditional(model, labels, ev.num_steps, ev.cfg_scale, "linear", gen)
        model.train()
        images = tensor_to_images(ae.decode(bits)).cpu().numpy()
        return image_grid([Image.fromarray(i) for i in images], columns=min(8, len(images)))

    def export(self, model: ClassConditionalBitDance, out_dir: Path) -> Path | None:
        from models.c2i.io import save_c2i_checkpoint

        tokenizer = None
        if self.cfg.model.image_tokenizer:
            from models.tokenizer.io import load_tokenizer

            tokenizer = load_tokenizer(self.cfg.model.image_tokenizer)
        path = Path(out_dir) / "bitdance_c2i.pt"
        save_c2i_checkpoint(path, model, tokenizer, ema=model)
        return path


def build_task(cfg: TrainConfig, device: torch.device) -> Task:
    if cfg.model.kind == "t2i":
        return T2ITask(cfg, device)
    if cfg.model.kind == "c2i":
        return C2ITask(cfg, device)
    raise ValueError(f"model.kind {cfg.model.kind!r} is trained by training.tokenizer_trainer, not training.train")
