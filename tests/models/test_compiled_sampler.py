"""The compiled sampler (`SamplingConfig.compile`) against the eager one on the tiny configs: same seeds, same bits
(fp32), the head's continuous outputs within float rounding, and a fixed number of compiled graphs per run - not one
per patch, none for a second run or another batch of the same row bucket.

Measured on this project's CPU runs: bits equal for T2I and C2I (P = 4, guided, per-image generators, 3 images padded
to a bucket of 4); the head's continuous outputs differ by at most ~1.2e-5 of their largest magnitude (inductor's
layer norms, softmax and fused activations round in other places; the velocity's 1 / max(1 - t, 0.05) grows it);
TOLERANCE bounds it with margin.
"""

from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from models.c2i.model import ClassConditionalBitDance, get_c2i_config
from models.c2i.sampler import sample_class_conditional
from models.core.compiled_sampling import compiled, row_bucket
from models.core.head_sampler import em_coefficients, em_noise, euler_maruyama, euler_maruyama_loop
from models.core.sampling import SamplingConfig
from models.t2i.model import TextToImageBitDance, get_t2i_config
from models.t2i.sampler import sample_t2i
from models.t2i.text_tokenizer import T2ITextTokenizer, build_chat_tokenizer

TOLERANCE = 1e-4  # max abs difference of the head's continuous outputs, compiled vs eager, relative to max |x|
CAPTIONS = ["a red circle left of a blue square", "two green triangles", "a yellow star above a cat"]


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_row_buckets_are_powers_of_two():
    assert [row_bucket(n) for n in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="at least one image"):
        row_bucket(0)


@pytest.mark.slow  # two inductor compilations (each test): 10-20 s on CPU
def test_c2i_compiled_equals_eager_with_a_fixed_number_of_graphs():
    torch.manual_seed(0)
    model = ClassConditionalBitDance(get_c2i_config("tiny", parallel_num=4, image_size=16)).eval()  # 16 patches
    with torch.no_grad():  # the zero-initialised adaLN / output layers would make x_hat = 0
        for p in model.head.parameters():
            p.normal_(0, 0.2)
    sampling = SamplingConfig(steps=3, cfg_scale=4.0)
    labels = torch.tensor([3, 7, 1])  # padded to a bucket of 4
    eager = sample_class_conditional(model, labels, sampling, gens(11, 12, 13))
    fast = sample_class_conditional(model, labels, replace(sampling, compile=True), gens(11, 12, 13))
    assert fast.shape == eager.shape and torch.equal(fast, eager), (fast != eager).float().mean().item()
    n_graphs = graphs()
    assert n_graphs <= 2 and not counters["graph_break"]  # the head loop and the decoder step, for 16 patches
    four, g = torch.tensor([1, 2, 3, 4]), torch.Generator  # the bucket of 3; one generator for all rows
    fast = sample_class_conditional(model, four, replace(sampling, compile=True), g().manual_seed(5))
    assert graphs() == n_graphs  # batch 4 reuses batch 3's graphs
    assert torch.equal(fast, sample_class_conditional(model, four, sampling, g().manual_seed(5)))

    # the head alone: the same noise and coefficients give continuous outputs within float rounding
    cond = torch.randn(8, 4, model.cfg.dim, generator=torch.Generator().manual_seed(0))
    g_eager, g_fast = gens(1, 2, 3, 4), gens(1, 2, 3, 4)
    net, C = model.head.net, model.cfg.latent_dim
    with torch.no_grad():
        ref = euler_maruyama(net, cond[:4], C, 3, 4.0, cond[4:], generator=g_eager)
        x0, eps = em_noise((4, 4, C), "cpu", g_fast, 3)
        w = torch.tensor(4.0)
        out = compiled(euler_maruyama_loop, "cpu")(net, x0, eps, em_coefficients(3), cond, True, w)
    assert (out - ref).abs().max().item() <= TOLERANCE * ref.abs().max().item()
    assert graphs() == n_graphs  # the sampler's graph at the same shapes


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_chat_tokenizer(CAPTIONS * 3, tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.mark.slow
def test_t2i_compiled_equals_eager_under_linear_guidance(tok_dir):
    P = 4
    tok = T2ITextTokenizer.from_folder(tok_dir, P)
    cfg = get_t2i_config(f"tiny-{P}x")
    torch.manual_seed(0)
    model = TextToImageBitDance(replace(cfg, llm=replace(cfg.llm, vocab_size=len(tok)))).eval()
    with torch.no_grad():
        for p in model.vision_head.parameters():
            p.normal_(0, 0.05)
    # linear: an unguided first patch (2n rows, their own noise), then guided patches - 48 in all
    sampling = SamplingConfig(steps=3, cfg_scale=4.0, cfg_schedule="linear")
    eager = sample_t2i(model, tok, CAPTIONS, 16, 48, sampling, gens(11, 12, 13))
    fast = sample_t2i(model, tok, CAPTIONS, 16, 48, replace(sampling, compile=True), gens(11, 12, 13))
    assert fast.shape == eager.shape == (3, 16, 8, 24)
    assert torch.equal(fast, eager), (fast != eager).float().mean().item()
    n_graphs = graphs()
    assert n_graphs <= 2 and not counters["graph_break"]
    again = sample_t2i(model, tok, CAPTIONS[::-1], 16, 48, replace(sampling, compile=True), gens(4, 5, 6))
    assert graphs() == n_graphs  # other prompts, other seeds: no new graph
    assert torch.equal(again, sample_t2i(model, tok, CAPTIONS[::-1], 16, 48, sampling, gens(4, 5, 6)))
