"""`torchrun ... -m training.tokenizer_trainer --config <yaml>`: trains the binary tokenizer.

Same engine, EMA, checkpoints and logging as `training.train`, its own model and losses: L1 reconstruction
(+ LPIPS when `model.lpips_weights` is a local file), the group entropy and commitment losses of the sign
quantizer, and from `model.disc_start` on a PatchGAN hinge discriminator with the adaptive weight
||grad rec|| / ||grad adv|| at the decoder's last layer, trained by its own optimizer (a second engine).
Reports PSNR/SSIM of the EMA weights on held-out images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from eval.image_metrics import psnr, ssim
from models.tokenizer.io import save_tokenizer
from models.tokenizer.losses import commitment_loss, group_entropy_loss
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config
from training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import TrainConfig, grad_accumulation, load_config, to_dict
from training.ema import EMA
from training.engines.deepspeed import DeepSpeedEngine, init_distributed
from training.image_data import RawImageBatches
from training.logger import RunLogger
from training.optim import build_optimizer, lr_at, set_lr
from training.perceptual import LPIPS, hinge_d_loss
from training.train import Preemption, mean_over_ranks, with_ema_weights


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


def adaptive_weight(rec_loss, adv_loss, last: nn.Parameter) -> torch.Tensor:
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


@torch.no_grad()
def evaluate(model: BinaryAutoencoder, images: torch.Tensor) -> dict[str, float]:
    was = model.training
    model.eval()
    rec = model(images)[0]
    model.train(was)
    return {"eval/psnr": psnr(rec, images), "eval/ssim": ssim(rec, images)}


def train_tokenizer(cfg: TrainConfig) -> dict[str, float]:
    rank, world, device = init_distributed()
    torch.manual_seed(cfg.seed * 1000 + rank)
    mc = cfg.model
    if cfg.engine.zero_stage > 2:
        raise ValueError("the tokenizer trainer supports engine.zero_stage 0-2 (its models are small)")
    tok_cfg = get_tokenizer_config(mc.name)
    grad_accum = grad_accumulation(cfg, world)
    ae = BinaryAutoencoder(tok_cfg).to(device)
    g = DeepSpeedEngine(ae, build_optimizer(ae, cfg.optim), cfg, grad_accum)
    disc = None
    if mc.disc_start > 0:
        d = PatchDiscriminator().to(device)
        disc = DeepSpeedEngine(d, build_optimizer(d, cfg.optim), cfg, grad_accum)
    lpips = LPIPS.from_file(mc.lpips_weights).to(device) if mc.lpips_weights else None
    ema = EMA(g.module, cfg.ema_decay)
    data = RawImageBatches(
        cfg.data.data_dir, cfg.data.image_size, cfg.data.micro_batch, rank, world, cfg.seed, cfg.data.holdout
    )
    step = 0
    resume = latest_checkpoint(cfg.run_dir) if cfg.checkpoint.resume == "auto" else None
    if resume is not None:
        trainer, loader_state, extra = load_checkpoint(resume, g, ema)
        data.load_state_dict(loader_state)
        if disc is not None and extra:
            disc.load_full_state_dict(extra["disc_model"])
            disc.load_optimizer_state(extra["disc_optimizer"])
        step = trainer["step"]
    log = RunLogger(cfg, rank, step)
    preempt = Preemption()
    holdout = data.holdout.to(device) if data.holdout is not None else None
    if holdout is not None and step == 0:
        log.log(0, with_ema_weights(g, ema, lambda m: evaluate(m, holdout)))

    def checkpoint():
        extra = {"disc_model": disc.full_state_dict(), "disc_optimizer": disc.optimizer_state()} if disc else None
        save_checkpoint(
            cfg.run_dir,
            step,
            g,
            ema,
            data.state_dict(),
            {"step": step, "config": to_dict(cfg)},
            cfg.checkpoint.keep_last,
            extra,
        )

    batches = iter(data)
    last_layer = g.module.decoder.conv_out.weight
    try:
        while step < cfg.schedule.total_steps:
            lr = lr_at(step, cfg.optim.lr, cfg.schedule)
            set_lr(g.base_optimizer, lr)
            gan_on = disc is not None and step >= mc.disc_start
            totals: dict[str, float] = {}
            for _ in range(grad_accum):
                x = next(batches).to(device)
                # plain module calls: DeepSpeed's forward hooks forbid the extra autograd.grad of the adaptive
                # GAN weight (so this trainer supports ZeRO 0-2; engine.backward still reduces the gradients)
                rec, enc = g.module(x)
                rec_loss = (rec - x).abs().mean()
                if lpips is not None:
                    rec_loss = rec_loss + lpips(rec, x)
                ent = group_entropy_loss(enc.latent, tok_cfg.entropy_groups)[0]
                com = commitment_loss(enc.latent, enc.bits)
                loss = rec_loss + mc.entropy_weight * ent + mc.commit_weight * com
                parts = {"loss/rec": rec_loss.item(), "loss/entropy": ent.item(), "loss/commit": com.item()}
                if gan_on:
                    disc.module.requires_grad_(False)  # the generator's loss must not train the discriminator
                    adv = -disc.module(rec).mean()
                    disc.module.requires_grad_(True)
                    weight = adaptive_weight(rec_loss, adv, last_layer) * mc.disc_weight
                    loss = loss + weight * adv
                    parts |= {"loss/g_adv": adv.item(), "gan_weight": weight.item()}
                g.backward(loss)
                result = g.step()
                if gan_on:
                    d_loss = hinge_d_loss(disc.module(x), disc.module(rec.detach()))
                    disc.backward(d_loss)
                    disc.step()
                    parts["loss/disc"] = d_loss.item()
                parts["loss"] = loss.item()
                for k, v in parts.items():
                    totals[k] = totals.get(k, 0.0) + v / grad_accum
            if result.applied:
                ema.update(g.module)
            step += 1
            keys = sorted(totals)
            values = dict(zip(keys, mean_over_ranks([totals[k] for k in keys]), strict=True))
            values |= {"lr": lr, "grad_norm": result.grad_norm}
            if holdout is not None and (step % max(1, cfg.logging.every * 5) == 0 or step == cfg.schedule.total_steps):
                values |= with_ema_weights(g, ema, lambda m: evaluate(m, holdout))
            if step % cfg.logging.every == 0 or step == 1 or "eval/psnr" in values:
                log.log(step, values)
            log.advance()
            if preempt.requested() or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                checkpoint()
                if preempt.flag:
                    return values
        checkpoint()
        if rank == 0:
            out = Path(cfg.run_dir) / "export"
            with_ema_weights(g, ema, lambda m: save_tokenizer(m, tok_cfg, out, name=mc.name))
            print(f"exported EMA tokenizer to {out}", flush=True)
        final = with_ema_weights(g, ema, lambda m: evaluate(m, holdout)) if holdout is not None else {}
        if rank == 0 and final:
            print(f"held-out PSNR {final['eval/psnr']:.2f} dB, SSIM {final['eval/ssim']:.4f}", flush=True)
        return final
    finally:
        log.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.tokenizer_trainer", description=__doc__.splitlines()[0])
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.model.kind != "tokenizer":
            raise ValueError(f"model.kind is {cfg.model.kind!r}; this trainer trains model.kind=tokenizer")
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    try:
        train_tokenizer(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from training.tokenizer_trainer import main as _main

    _main()
    sys.exit(0)
