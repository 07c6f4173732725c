"""Activation checkpointing changes neither the numbers nor the parameter names."""

from dataclasses import replace

import torch

from models.c2i.model import ClassConditionalBitDance, get_c2i_config
from models.t2i.model import TextToImageBitDance, get_t2i_config
from models.t2i.packing import T2ISample, pack_rows
from training.activation_checkpointing import apply_activation_checkpointing


class _Ids:
    pad_id = 0

    def image_prefix_ids(self, h, w):
        return [1, 2, 3, 4, 5, 6]


def _grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    named = model.named_parameters()
    return loss.detach(), {
        n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in named if p.grad is not None
    }


def test_t2i_checkpointing_is_transparent():
    cfg = get_t2i_config("tiny-4x", attention="dense")
    cfg = replace(cfg, llm=replace(cfg.llm, num_hidden_layers=1))
    model = TextToImageBitDance(cfg).eval()
    with torch.no_grad():
        for p in model.vision_head.parameters():
            p.normal_(0, 0.05)
    batch = pack_rows([[T2ISample([7, 8, 9], torch.randn(16, 8, 8).sign())]], _Ids(), 4)
    t, noise = torch.rand(16), torch.randn(16, 4, 16)
    keys = list(model.state_dict())
    ref_loss, ref = _grads(model, lambda: model(batch, t, noise).loss)
    assert apply_activation_checkpointing(model) == 1 + 2
    assert list(model.state_dict()) == keys
    loss, got = _grads(model, lambda: model(batch, t, noise).loss)
    assert torch.allclose(loss, ref_loss) and got.keys() == ref.keys()
    assert all(torch.allclose(got[k], ref[k], atol=1e-6) for k in ref)


def test_c2i_checkpointing_keeps_names():
    model = ClassConditionalBitDance(get_c2i_config("tiny"))
    keys = list(model.state_dict())
    assert apply_activation_checkpointing(model, head=False) == 2
    assert list(model.state_dict()) == keys
    model(torch.randn(2, 16, 16, 16).sign(), torch.tensor([0, 1])).backward()
