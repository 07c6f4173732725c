"""The diffusion head's patches split over TP ranks (models.t2i.megatron.model): at tp=2, with and without sequence
parallelism, loss and gradients (through megatron's DDP and the engine's `finalize_model_grads_func`) equal tp=1 and
the reference, each rank saves about half the head activations, and head recompute keeps the numbers and saves less."""

from dataclasses import replace

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from helpers.megatron_case import PAD, case_file, load_case, new_engine, reference_model, reference_weights  # noqa: E402
from helpers.megatron_cpu import megatron_in_process, save_result, spawn  # noqa: E402

from models.t2i.megatron.batch import pad_packed_batch  # noqa: E402
from models.t2i.megatron.model import patch_share  # noqa: E402
from training.activation_checkpointing import recompute_head  # noqa: E402

SEED = 7  # for the steps with random head draws


class SavedBytes:
    """Bytes of the distinct non-parameter storages autograd saves for backward while `module` runs forward."""

    def __init__(self, module: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.storages: dict[int, int] = {}
        hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.handles = [
            module.register_forward_pre_hook(lambda *_: hooks.__enter__()),
            module.register_forward_hook(lambda *_: hooks.__exit__(None, None, None)),
        ]

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def close(self) -> int:
        for h in self.handles:
            h.remove()
        return sum(self.storages.values())


def loss_terms(out) -> dict:
    return {k: float(getattr(out, k).detach()) for k in ("loss", "text_ce_sum", "vision_loss_sum")}


def fixed_step(engine, batch, head_t=None, head_noise=None):
    """Forward/backward of the engine's single chunk (eval: no bit flips) through megatron's DDP and the engine's
    `finalize_model_grads_func`; returns (loss terms, {name: grad}, bytes the head's net saved for backward)."""
    (chunk,), (ddp,) = engine.chunks, engine.ddp
    chunk.eval()
    if engine.par.sequence_parallel:
        batch = pad_packed_batch(batch, engine.par.tp, PAD)
    ddp.zero_grad_buffer()
    saved = SavedBytes(chunk.vision_head.net)
    out = ddp(batch, head_t, head_noise)
    nbytes = saved.close()
    out.loss.backward()
    chunk.config.finalize_model_grads_func([ddp])
    return loss_terms(out), {k: p.main_grad.clone() for k, p in chunk.named_parameters()}, nbytes


def random_draws_step(engine, batch) -> tuple[float, torch.Tensor]:
    """The loss with head draws from the default generator seeded with SEED, and the generator state after it."""
    torch.manual_seed(SEED)
    terms, _, _ = fixed_step(engine, batch)
    return terms["loss"], torch.get_rng_state()


def assert_rel_close(got, want, what: str, tol: float = 1e-5) -> None:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol}"


def assert_matches(terms: dict, grads: dict, want_terms: dict, want_grads: dict, what: str) -> None:
    for k in ("loss", "text_ce_sum", "vision_loss_sum"):
        assert_rel_close(terms[k], want_terms[k], f"{what} {k}")
    assert grads.keys() == want_grads.keys()
    for k, g in want_grads.items():
        assert_rel_close(grads[k], g, f"{what} grad {k}")


def reference_run(case: dict, cfg, head_t, head_noise) -> tuple[dict, dict]:
    ref = reference_model({**case, "cfg": cfg}).eval()
    out = ref(case["batch"], head_t, head_noise)
    out.loss.backward()
    return loss_terms(out), {k: p.grad.clone() for k, p in ref.named_parameters()}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The tiny case (44 patches of P=4 tokens), plus a variant with two diffusion draws per patch
    (`diff_batch_mul=2`), their fixed draws and the reference model's loss terms and gradients for both."""
    path = tmp_path_factory.mktemp("head_split") / "case.pt"
    case_file(path)
    case = load_case(path)
    cfg, n = case["cfg"], case["head_t"].shape[0]
    g = torch.Generator().manual_seed(1)
    two = dict(
        cfg=replace(cfg, head=replace(cfg.head, diff_batch_mul=2)),
        head_t=torch.rand(2 * n, generator=g),
        head_noise=torch.randn(2 * n, *case["head_noise"].shape[1:], generator=g),
    )
    case["two_draws"] = two
    torch.save(case, path)
    return dict(
        case,
        path=path,
        expected=reference_run(case, cfg, case["head_t"], case["head_noise"]),
        expected_two=reference_run(case, two["cfg"], two["head_t"], two["head_noise"]),
    )


@pytest.fixture(scope="module")
def tp1(case):
    """tp=1 through the engine: fixed draws without and with head recompute, random draws; and whether
    `model.activation_checkpointing=true` makes the engine recompute the head."""
    batch, draws = case["batch"], (case["head_t"], case["head_noise"])
    with megatron_in_process(init_model_parallel=False):
        engine = new_engine(case)
        plain = fixed_step(engine, batch, *draws)
        random = random_draws_step(engine, batch)
        assert recompute_head(engine.chunks[0]) == len(engine.chunks[0].vision_head.net.res_blocks)
        recomputed = fixed_step(engine, batch, *draws)
        configured = new_engine(case, overrides=("model.activation_checkpointing=true",))
        wired = all("forward" in vars(b) for b in configured.chunks[0].vision_head.net.res_blocks)
    return dict(plain=plain, random=random, recomputed=recomputed, wired=wired)


def test_patch_share_cuts_like_tensor_split():
    for n in range(12):
        for parts in (1, 2, 3, 5):
            want = [c.tolist() for c in torch.tensor_split(torch.arange(n), parts)]
            assert [list(range(n))[patch_share(n, parts, i)] for i in range(parts)] == want


def test_tp1_equals_reference(case, tp1):
    terms, grads, _ = tp1["plain"]
    assert_matches(terms, reference_weights([grads], case["cfg"]), *case["expected"], "TP=1")


def test_head_recompute_keeps_loss_and_grads_and_saves_less(case, tp1):
    (terms, grads, saved), (terms_rc, grads_rc, saved_rc) = tp1["plain"], tp1["recomputed"]
    assert terms_rc == terms
    assert grads_rc.keys() == grads.keys()  # recompute leaves parameter names alone
    for k, g in grads.items():
        assert_rel_close(grads_rc[k], g, f"recompute grad {k}", tol=1e-6)
    assert saved_rc < 0.7 * saved, f"head recompute saved {saved_rc} bytes, without {saved}"
    assert tp1["wired"], "model.activation_checkpointing=true did not make the megatron engine recompute the head"


def _tp2_worker(rank, out_dir, case_path):
    case = load_case(case_path)
    batch, draws, two = case["batch"], (case["head_t"], case["head_noise"]), case["two_draws"]
    result = {}
    for sp in (False, True):
        engine = new_engine(case, tp=2, overrides=(f"parallel.sequence_parallel={str(sp).lower()}",))
        result[sp] = fixed_step(engine, batch, *draws)
    result["random"] = random_draws_step(engine, batch)
    engine = new_engine({**case, "cfg": two["cfg"]}, tp=2)
    result["two_draws"] = fixed_step(engine, batch, two["head_t"], two["head_noise"])
    save_result(out_dir, rank, result)


@pytest.mark.slow
def test_tp2_head_split_equals_tp1_and_reference_with_half_the_head_activations(case, tp1, tmp_path):
    ranks = spawn(_tp2_worker, 2, 2, 1, tmp_path, case["path"])
    cfg = case["cfg"]
    terms1, grads1, saved1 = tp1["plain"]
    head1 = {k: g for k, g in grads1.items() if k.startswith("vision_head.")}
    for sp in (False, True):
        what = f"TP=2 sequence_parallel={sp}"
        terms = [r[sp][0] for r in ranks]
        assert terms[0] == terms[1], f"{what}: TP ranks disagree on the loss"
        grads = reference_weights([r[sp][1] for r in ranks], cfg)  # raises if a replicated grad differs by rank
        assert_matches(terms[0], grads, *case["expected"], what)
        assert_matches(terms[0], grads, terms1, reference_weights([grads1], cfg), f"{what} vs TP=1")
        for rank, r in enumerate(ranks):
            for k, g in head1.items():
                assert_rel_close(r[sp][1][k], g, f"{what} rank {rank} head grad {k}")
            ratio = r[sp][2] / saved1
            assert 0.4 <= ratio <= 0.65, f"{what} rank {rank}: head saved {ratio:.2f}x the bytes of TP=1"
    two = [r["two_draws"] for r in ranks]
    grads = reference_weights([t[1] for t in two], cfg)
    assert_matches(two[0][0], grads, *case["expected_two"], "TP=2 diff_batch_mul=2")
    # random draws: every TP rank draws for all patches and keeps its share, so tp does not change the numbers
    # and the default generators of the TP ranks stay in step
    (loss0, rng0), (loss1, rng1) = ranks[0]["random"], ranks[1]["random"]
    assert loss0 == loss1 and torch.equal(rng0, rng1)
    assert torch.equal(rng0, tp1["random"][1])
    assert_rel_close(loss0, tp1["random"][0], "TP=2 random draws vs TP=1")
