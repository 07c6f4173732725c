"""The class-conditional (ImageNet) task: `ClassConditionalBitDance`, fixed-size binary-token batches with labels,
class sample grids, and the official checkpoint export."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from PIL import Image

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig, data_manifest
from data_pipeline.loader.packing import seed_of
from models.c2i.model import ClassConditionalBitDance, get_c2i_config
from models.core.diffusion_head import fixed_draws
from models.tokenizer.model import tensor_to_images
from training.config import TrainConfig
from training.flops import dense_params
from training.tasks import StepOutput, Task, image_grid


class C2ITask(Task):
    kind = "c2i"

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.manifest = data_manifest(cfg.data)  # data_dir or the sources of a mixture, local or at a URL
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
        lc = LoaderConfig.from_settings(
            d, d.data_dir, kind="imagenet", seed=self.cfg.seed, batch_size=d.micro_batch, sources=d.sources
        )
        return BinaryTokenLoader(lc, rank=rank, world_size=world)

    def step(self, forward, batch) -> StepOutput:
        bits, labels = (t.to(self.device) for t in batch)
        loss = forward(bits, labels)
        tokens = labels.numel() * bits.shape[2] * bits.shape[3]
        return StepOutput(loss, {"loss/vision": loss.item()}, labels.numel(), tokens, self.flops_per_token * tokens)

    validation_kind = "imagenet"

    def validation_inputs(self, batch, index: int) -> tuple:
        bits, labels = batch
        c = self.model.cfg
        patches = labels.numel() * c.grid * c.grid // c.parallel_num
        gen = torch.Generator().manual_seed(seed_of("validation", self.cfg.seed, index))
        return (bits, labels, *fixed_draws(self.model.head.cfg, patches, gen))

    def validation_sums(self, out, inputs: tuple) -> torch.Tensor:
        """The loss is a mean over the batch's target tokens, all weighted alike: its sum is the mean x tokens."""
        bits = inputs[0]
        tokens = bits.shape[0] * bits.shape[2] * bits.shape[3]
        return torch.tensor([0.0, 0.0, out.detach().double().item() * tokens, tokens], dtype=torch.float64)

    def validation_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        vision, tokens = sums[2].item() / max(sums[3].item(), 1.0), sums[3].item()
        return {"val/loss": vision, "val/vision": vision, "val/tokens": tokens}

    @functools.cached_property
    def flops_per_token(self) -> float:
        return 6.0 * dense_params(self.model)

    def sample_grid(self, model: ClassConditionalBitDance) -> Image.Image | None:
        ev, mc = self.cfg.eval, self.cfg.model
        if not (ev.classes and mc.image_tokenizer):
            return None
        from models.c2i.sampler import sample_class_conditional
        from models.tokenizer.io import load_tokenizer

        ae = load_tokenizer(mc.image_tokenizer, device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(0)
        labels = torch.tensor(list(ev.classes), device=self.device)
        bits = sample_class_conditional(model, labels, self.cfg.sampling, gen)
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
