"""The binary tokenizer as a task of the one training loop (`model.kind=tokenizer`).

Losses: L1 reconstruction (+ LPIPS when `model.lpips_weights` is a local file), the group entropy and commitment losses
of the sign quantizer, and from `model.disc_start` on a PatchGAN hinge discriminator with the adaptive weight
||grad rec|| / ||grad adv|| at the decoder's last layer. Autoencoder and discriminator are one module
(`TokenizerWithDiscriminator`) under one engine and optimizer: the generator's adversarial term runs the discriminator
with its parameters frozen, and the discriminator's hinge loss sees the reconstruction detached, so one backward of
the sum gives each part exactly its own gradient. Evaluation: PSNR/SSIM of the EMA weights on held-out images; export:
the EMA tokenizer in the official file layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from eval.image_metrics import psnr, ssim
from models.tokenizer.io import save_tokenizer
from models.tokenizer.losses import commitment_loss, group_entropy_loss
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config
from training.config import TrainConfig
from training.image_data import RawImageBatches
from training.perceptual import LPIPS, hinge_d_loss
from training.tasks import StepOutput, Task


class PatchDiscriminator(nn.Module):
    """PatchGAN: 4x4 stride-2 convolutions with GroupNorm and LeakyReLU, one logit per patch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods, c = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for i in range(1, layers):
            nxt = channels * min(2**i, 8)
            mods += [nn.Conv2d(c, nxt, 4, 2, 1, bias=False), nn.GroupNorm(32, nxt), nn.LeakyReLU(0.2)]
            c = nxt
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TokenizerWithDiscriminator(nn.Module):
    """The trained modules: `ae` (the tokenizer, exported) and `disc` (None until a GAN is configured)."""

    def __init__(self, ae: BinaryAutoencoder, disc: PatchDiscriminator | None):
        super().__init__()
        self.ae, self.disc = ae, disc


def adaptive_weight(rec_loss, adv_loss, last: nn.Parameter) -> torch.Tensor:
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class TokenizerTask(Task):
    kind = "tokenizer"
    evaluates_at_ends = True  # held-out PSNR/SSIM before the first step and after the last
    whole_parameters = True  # the adaptive GAN weight needs whole parameters on every rank (no ZeRO-3)

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        mc = cfg.model
        self.model_cfg = get_tokenizer_config(mc.name)
        disc = PatchDiscriminator() if mc.disc_start > 0 else None
        self.model = TokenizerWithDiscriminator(BinaryAutoencoder(self.model_cfg), disc).to(device)
        self.lpips = LPIPS.from_file(mc.lpips_weights).to(device) if mc.lpips_weights else None
        self._holdout: torch.Tensor | None = None

    def loader(self, rank: int, world: int) -> RawImageBatches:
        d = self.cfg.data
        data = RawImageBatches(d.data_dir, d.image_size, d.micro_batch, rank, world, self.cfg.seed, d.holdout)
        self._holdout = data.holdout.to(self.device) if data.holdout is not None else None
        return data

    def step(self, forward, batch: torch.Tensor) -> StepOutput:
        # plain module calls, not the engine's: DeepSpeed's forward hooks forbid the extra autograd.grad of the
        # adaptive GAN weight (hence ZeRO 0-2); the engine still reduces the gradients in its backward
        mc, m = self.cfg.model, self.model
        x = batch.to(self.device)
        rec, enc = m.ae(x)
        rec_loss = (rec - x).abs().mean()
        if self.lpips is not None:
            rec_loss = rec_loss + self.lpips(rec, x)
        ent = group_entropy_loss(enc.latent, self.model_cfg.entropy_groups)[0]
        com = commitment_loss(enc.latent, enc.bits)
        loss = rec_loss + mc.entropy_weight * ent + mc.commit_weight * com
        metrics = {"loss/rec": rec_loss.item(), "loss/entropy": ent.item(), "loss/commit": com.item()}
        if m.disc is not None and self.current_step >= mc.disc_start:
            m.disc.requires_grad_(False)  # the generator's loss must not train the discriminator
            adv = -m.disc(rec).mean()
            m.disc.requires_grad_(True)
            weight = adaptive_weight(rec_loss, adv, m.ae.decoder.conv_out.weight) * mc.disc_weight
            d_loss = hinge_d_loss(m.disc(x), m.disc(rec.detach()))
            metrics |= {"loss/g_adv": adv.item(), "gan_weight": weight.item(), "loss/disc": d_loss.item()}
            loss = loss + weight * adv + d_loss
        tokens = x.shape[0] * enc.bits.shape[-2] * enc.bits.shape[-1]
        return StepOutput(loss, metrics, x.shape[0], tokens, 0.0)

    @torch.no_grad()
    def evaluate(self, model: TokenizerWithDiscriminator) -> dict[str, float]:
        if self._holdout is None:
            return {}
        was = model.training
        model.eval()
        rec = model.ae(self._holdout)[0]
        model.train(was)
        out = {"eval/psnr": psnr(rec, self._holdout), "eval/ssim": ssim(rec, self._holdout)}
        print(f"held-out PSNR {out['eval/psnr']:.2f} dB, SSIM {out['eval/ssim']:.4f}", flush=True)
        return out

    def export(self, model: TokenizerWithDiscriminator, out_dir: Path) -> Path | None:
        save_tokenizer(model.ae, self.model_cfg, out_dir, name=self.cfg.model.name)
        return Path(out_dir)
