"""Text-to-image BitDance: packed layout, flex == dense, teacher forcing == KV-cache decode, loss additivity."""

from dataclasses import replace

import pytest
import torch

from models.core.sampling import SamplingConfig
from models.t2i.model import TextToImageBitDance, get_t2i_config, sincos_2d
from models.t2i.packing import IGNORE_INDEX, T2ISample, pack_rows
from models.t2i.sampler import T2IDecoder, sample_t2i
from models.t2i.text_tokenizer import T2ITextTokenizer, build_chat_tokenizer

CAPTIONS = ["a red circle left of a blue square", "two green triangles", "a yellow star above a cat"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_chat_tokenizer(CAPTIONS * 3, tmp_path_factory.mktemp("tok"), vocab_size=300)


def make(tok_dir, P, **kw):
    tok = T2ITextTokenizer.from_folder(tok_dir, P)
    cfg = get_t2i_config(f"tiny-{P}x", **kw)
    cfg = replace(cfg, llm=replace(cfg.llm, vocab_size=len(tok)))
    torch.manual_seed(0)
    model = TextToImageBitDance(cfg)
    with torch.no_grad():  # the head is zero-initialised; give it weights so conditions matter
        for p in model.vision_head.parameters():
            p.normal_(0, 0.05)
    return tok, model.eval()


def sample(tok, caption, h, w, C=16, text_loss=True):
    return T2ISample(tok.prompt_ids(caption), torch.randn(C, h, w).sign(), text_loss)


def test_layout_of_one_sample(tok_dir):
    tok, model = make(tok_dir, 4)
    s = sample(tok, CAPTIONS[0], 8, 8)
    b = pack_rows([[s]], tok, 4)
    T = len(s.text_ids)
    assert b.input_ids.shape == (1, T + 2 + 64)
    assert b.input_ids[0, T : T + 6].tolist() == tok.image_prefix_ids(8, 8)
    assert b.position_ids[0].tolist() == list(range(T + 66))
    blk = b.block_ids[0]
    assert blk[T + 1] < blk[T + 2] == blk[T + 5] < blk[T + 6] == blk[T + 9]  # res_w + 3 queries; then patch 0
    assert b.target_index.tolist() == list(range(T + 2, T + 66))
    assert b.text_labels[0, : T - 1].tolist() == s.text_ids[1:] and (b.text_labels[0, T - 1 :] == IGNORE_INDEX).all()


@pytest.mark.parametrize("P", [4, 16])
@pytest.mark.parametrize("backend", ["flex", "segments"])
def test_attention_backends_equal_dense_on_a_packed_batch(tok_dir, P, backend):
    tok, model = make(tok_dir, P)
    rows = [[sample(tok, CAPTIONS[0], 16, 16), sample(tok, CAPTIONS[1], 8, 24)], [sample(tok, CAPTIONS[2], 24, 8)]]
    batch = pack_rows(rows, tok, P)
    t = torch.rand(batch.target_bits.shape[0] // P)
    noise = torch.randn(batch.target_bits.shape[0] // P, P, model.cfg.latent_dim)
    model.eval()
    results = {}
    for name in ("dense", backend):
        model.cfg.attention = name
        model.zero_grad()
        with torch.set_grad_enabled(name != "flex"):  # FlexAttention has no backward on CPU
            h, c = model.head_conditions(batch)
            if name != "flex":
                model(batch, t, noise).loss.backward()
        results[name] = h.detach(), c.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    real = batch.doc_ids >= 0
    (h_ref, c_ref, g_ref), (h, c, g) = results["dense"], results[backend]
    assert (h - h_ref)[real].abs().max().item() <= 1e-5
    assert (c - c_ref).abs().max().item() <= 1e-5
    if backend != "flex":
        assert len(g) == len(g_ref) > 0
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g, g_ref, strict=True))


def test_segment_mask_keeps_the_dense_mask_for_split_documents():
    from models.core.attention import SegmentMask, build_mask

    blk = torch.arange(6)[None]
    split = build_mask(torch.tensor([[0, 0, 1, 1, 0, 0]]), blk, "segments")  # document 0 in two runs
    assert isinstance(split, torch.Tensor) and split.shape == (1, 1, 6, 6)
    runs = build_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]), blk, "segments")
    assert isinstance(runs, SegmentMask) and [(s, e) for s, e, _ in runs.rows[0]] == [(0, 2), (2, 5), (5, 6)]


@pytest.mark.parametrize("P", [4, 16])
def test_teacher_forcing_equals_kv_cache_decoding(tok_dir, P):
    tok, model = make(tok_dir, P)
    s = sample(tok, CAPTIONS[1], 8, 24)
    other = sample(tok, CAPTIONS[0], 16, 16)  # packed before it: document masking must isolate the two
    batch = pack_rows([[other, s]], tok, P)
    with torch.no_grad():
        _, cond = model.head_conditions(batch)
        full = cond[256:]  # the second sample's 8 * 24 targets
        dec = T2IDecoder(model, [s.text_ids + tok.image_prefix_ids(8, 24)] * 2, (8, 24), tok.pad_id)
        steps = [dec.prefill()]
        tokens = batch.target_bits[256:].view(-1, P, 16)
        for k in range(tokens.shape[0] - 1):
            steps.append(dec.step(tokens[k][None].expand(2, -1, -1)))
    inc = torch.cat(steps, dim=1)
    assert (inc[0] - full).abs().max().item() <= 1e-4 and (inc[1] - full).abs().max().item() <= 1e-4


def test_left_padded_rows_decode_like_unpadded(tok_dir):
    tok, model = make(tok_dir, 4)
    prefix = tok.image_prefix_ids(16, 16)
    short, long = tok.uncond_ids() + prefix, tok.prompt_ids(CAPTIONS[2]) + prefix
    bits = torch.randn(1, 4, 16).sign()
    with torch.no_grad():
        both = T2IDecoder(model, [long, short], (16, 16), tok.pad_id)
        a0, a1 = both.prefill(), both.step(bits.expand(2, -1, -1))
        alone = T2IDecoder(model, [short], (16, 16), tok.pad_id)
        b0, b1 = alone.prefill(), alone.step(bits)
    assert (a0[1] - b0[0]).abs().max() <= 1e-5 and (a1[1] - b1[0]).abs().max() <= 1e-5


def test_packed_loss_equals_token_weighted_per_sample_losses(tok_dir):
    tok, model = make(tok_dir, 4)
    s1, s2 = sample(tok, CAPTIONS[0], 16, 16), sample(tok, CAPTIONS[1], 8, 24, text_loss=False)
    n1, n2 = 256 // 4, 192 // 4
    t, noise = torch.rand(n1 + n2), torch.randn(n1 + n2, 4, 16)
    with torch.no_grad():
        packed = model(pack_rows([[s1, s2]], tok, 4), t, noise)
        one = model(pack_rows([[s1]], tok, 4), t[:n1], noise[:n1])
        two = model(pack_rows([[s2]], tok, 4), t[n1:], noise[n1:])
    assert packed.text_tokens == one.text_tokens + two.text_tokens and two.text_tokens == 0
    assert packed.vision_tokens == one.vision_tokens + two.vision_tokens == 448
    assert torch.allclose(packed.text_ce_sum, one.text_ce_sum + two.text_ce_sum, rtol=1e-5)
    assert torch.allclose(packed.vision_loss_sum, one.vision_loss_sum + two.vision_loss_sum, rtol=1e-5)
    want = 0.01 * one.text_ce + (one.vision_loss_sum + two.vision_loss_sum) / 448
    assert torch.allclose(packed.loss, want, rtol=1e-5)


def test_training_step_reaches_parameters_and_perturbs_inputs(tok_dir):
    tok, model = make(tok_dir, 4)
    model.train()
    batch = pack_rows([[sample(tok, CAPTIONS[0], 16, 16), sample(tok, CAPTIONS[2], 8, 24)]], tok, 4)
    out = model(batch)
    out.loss.backward()
    assert out.text_tokens > 0 and torch.isfinite(out.loss)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in (
        "projector.fc1.weight",
        "llm.model.layers.0.self_attn.q_norm.weight",
        "vision_head.net.input_proj.weight",
        "llm.lm_head.weight",
        "llm.model.embed_tokens.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_sin_cos_2d_embedding_follows_the_spec():
    D = 16
    emb = sincos_2d(torch.tensor([[2, 5]]), D)[0]  # row 2, col 5
    for i in range(D // 4):
        w = 1 / 10000 ** (i / (D / 4))
        assert emb[i].item() == pytest.approx(torch.tensor(5 * w).sin().item(), abs=1e-6)
        assert emb[D // 4 + i].item() == pytest.approx(torch.tensor(5 * w).cos().item(), abs=1e-6)
        assert emb[D // 2 + i].item() == pytest.approx(torch.tensor(2 * w).sin().item(), abs=1e-6)


def test_sampler_reproducible_batched_equals_separate_and_sizes(tok_dir):
    tok, model = make(tok_dir, 16)

    def run(seed, batched, h=16, w=48, schedule="constant"):
        g = torch.Generator().manual_seed(seed)
        sampling = SamplingConfig(2, 4.0, cfg_schedule=schedule, batched_cfg=batched)
        return sample_t2i(model, tok, CAPTIONS[:2], h, w, sampling, g)

    a = run(0, True)
    assert a.shape == (2, 16, 8, 24) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a, run(0, True)) and torch.equal(a, run(0, False)) and not torch.equal(a, run(1, True))
    lin = run(0, True, schedule="linear")  # unguided first patch: 2n rows, each row fed its own patch
    assert torch.equal(lin, run(0, False, schedule="linear")) and not torch.equal(lin, a)
    with pytest.raises(ValueError, match=r"image size 20x20 \(HxW\) is not supported; choose one of: 32x32"):
        run(0, True, 20, 20)


def test_bad_configs_and_batches(tok_dir):
    with pytest.raises(ValueError, match="unknown T2I config"):
        get_t2i_config("7B-16x")
    with pytest.raises(ValueError, match="not divisible by the patch side"):
        get_t2i_config("tiny-64x", image_sizes=((32, 32), (24, 24)))
    tok, model = make(tok_dir, 4)
    batch = pack_rows([[sample(tok, CAPTIONS[0], 16, 16)]], tok, 4)
    batch.parallel_num = 16
    with pytest.raises(ValueError, match="packed for P=16"):
        model(batch)


def test_resize_vocab_appends_rows_at_the_mean(tok_dir):
    _, model = make(tok_dir, 4)
    old = model.llm.model.embed_tokens.weight.detach().clone()
    n = old.shape[0]
    model.resize_vocab(n + 5)
    new = model.llm.model.embed_tokens.weight
    assert new.shape[0] == n + 5 and model.llm.lm_head.weight.shape[0] == n + 5 and model.cfg.llm.vocab_size == n + 5
    assert torch.equal(new[:n], old) and torch.allclose(new[n:], old.mean(0).expand(5, -1))
