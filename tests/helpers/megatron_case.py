"""A tiny text-to-image case for the megatron model, engine and checkpoint tests: the reference model, a packed batch
of odd length and fixed head draws, a megatron TrainConfig, and helpers to step an engine and read its weights."""

from __future__ import annotations

import itertools
from dataclasses import replace
from types import SimpleNamespace

import torch

from models.t2i.megatron.mapping import megatron_to_reference, merge_tp, model_state
from models.t2i.model import TextToImageBitDance, get_t2i_config
from models.t2i.packing import T2ISample, pack_rows
from training.config import TrainConfig, load_config
from training.tasks.t2i import T2ITask

P, C, PAD = 4, 16, 0


class PrefixIds:
    """Image-prefix ids for packing (vision_start, res_h, res_w, queries) without a trained text tokenizer."""

    pad_id = PAD

    def image_prefix_ids(self, h, w):
        return [1, 2 + h, 2 + w] + list(range(40, 40 + P - 1))


def make_case():
    """Reference model (eval, random head weights), a 2-row packed batch of odd length, fixed head draws."""
    g = torch.Generator().manual_seed(0)

    def sample(n_text, h, w, text_loss=True):
        ids = torch.randint(60, 512, (n_text,), generator=g).tolist()
        return T2ISample(ids, torch.randn(C, h, w, generator=g).sign(), text_loss)

    rows = [[sample(8, 8, 8), sample(5, 4, 12)], [sample(9, 12, 4), sample(6, 4, 4, text_loss=False)]]
    batch = pack_rows(rows, PrefixIds(), P)
    assert batch.input_ids.shape[1] % 2 == 1  # sequence parallelism must pad it
    cfg = replace(get_t2i_config("tiny-4x"), attention="dense")
    torch.manual_seed(0)
    ref = TextToImageBitDance(cfg).eval()
    with torch.no_grad():  # the head is zero-initialised; give it weights so the conditions matter
        for p in ref.vision_head.parameters():
            p.normal_(0, 0.05)
    n = batch.target_bits.shape[0] // P
    head_t, head_noise = torch.rand(n, generator=g), torch.randn(n, P, C, generator=g)
    return cfg, ref, batch, head_t, head_noise


def task(cfg):
    """The T2I task's per-batch hooks the megatron engine calls, for model config `cfg` (no data folder needed)."""
    return SimpleNamespace(
        batch_counts=lambda batch: T2ITask.counts(cfg, batch),
        loss_metrics=T2ITask.loss_metrics,
        metric_names=T2ITask.metric_names,
    )


def train_config(tp: int = 1, pp: int = 1, *overrides: str) -> TrainConfig:
    layout = [f"parallel.tp={tp}", f"parallel.pp={pp}"]
    return load_config(
        None,
        [
            "engine.kind=megatron",
            "engine.precision=fp32",
            *layout,
            "optim.lr=1e-3",
            "optim.weight_decay=0.1",
            "optim.grad_clip=1.0",
            "data.token_budget=130",  # the engine pads every row to this: the case batch's 129, made even for SP
            *overrides,
        ],
    )


def case_file(path, vocab_size: int | None = None, num_layers: int | None = None) -> None:
    """The case (model config, reference weights, batch) saved for spawned workers; `vocab_size` grows the text
    vocabulary (room for a real T2I tokenizer's added tokens), `num_layers` deepens the backbone (fresh weights)."""
    cfg, ref, batch, head_t, head_noise = make_case()
    if num_layers is not None:
        from models.t2i.model import TextToImageBitDance

        torch.manual_seed(1)
        ref = TextToImageBitDance(replace(cfg, llm=replace(cfg.llm, num_hidden_layers=num_layers)))
    if vocab_size is not None:
        ref.resize_vocab(vocab_size)
    torch.save(dict(cfg=ref.cfg, ref=ref.state_dict(), batch=batch, head_t=head_t, head_noise=head_noise), path)


def load_case(path) -> dict:
    return torch.load(path, weights_only=False)


def reference_model(case: dict):
    from models.t2i.model import TextToImageBitDance

    model = TextToImageBitDance(case["cfg"])
    model.load_state_dict(case["ref"])
    return model


def new_engine(case: dict, tp: int = 1, pp: int = 1, reference: bool = True, init_checkpoint=None, overrides=()):
    from training.engines.megatron import MegatronEngine

    ref = reference_model(case) if reference else None
    return MegatronEngine(train_config(tp, pp, *overrides), case["cfg"], ref, init_checkpoint)


def step(engine, batch, grad_accum: int = 1, poison: bool = False):
    return engine.train_step(itertools.repeat(batch), task(engine.model_cfg), grad_accum, poison)


def local_weights(engine) -> dict[str, torch.Tensor]:
    """This rank's weights (single chunk, megatron names), detached copies."""
    (chunk,) = engine.chunks
    return {k: v.detach().clone() for k, v in model_state(chunk).items()}


def reference_weights(shards: list[dict], cfg) -> dict[str, torch.Tensor]:
    """TP shards of a full single-stage model -> reference (official) names."""
    return megatron_to_reference(merge_tp(shards), cfg.llm)


def forward_loss(engine, case: dict) -> float:
    """The loss of the case batch with fixed diffusion draws (no bit flips), from this engine's single chunk."""
    (chunk,) = engine.chunks
    chunk.eval()
    with torch.no_grad():
        out = chunk(case["batch"], case["head_t"], case["head_noise"])
    chunk.train()
    return float(out.loss)


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
