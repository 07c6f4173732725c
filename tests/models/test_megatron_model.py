"""megatron-core T2I model on CPU (gloo): TP=1, TP=2 (with and without sequence parallelism) and a PP=2 stage split
give the loss and gradients of the reference TextToImageBitDance with mapped weights (fp32, fixed head draws)."""

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from helpers.megatron_case import PAD, make_case  # noqa: E402
from helpers.megatron_cpu import megatron_in_process, save_result, spawn  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,  # noqa: E402
)
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb  # noqa: E402

from models.t2i.megatron.attention import BlockCausalCoreAttention, block_causal_mask  # noqa: E402
from models.t2i.megatron.batch import pad_packed_batch  # noqa: E402
from models.t2i.megatron.config import MegatronParallelConfig  # noqa: E402
from models.t2i.megatron.mapping import (  # noqa: E402
    load_model_state,
    megatron_to_reference,
    merge_pp,
    merge_tp,
    reference_to_megatron,
    split_pp,
    split_tp,
)
from models.t2i.megatron.model import MegatronT2IBitDance  # noqa: E402
from models.t2i.qwen3 import apply_rotary, rope_cos_sin  # noqa: E402


def step(model, batch, head_t=None, head_noise=None, output_grad=None):
    """One forward/backward through megatron's DDP and `finalize_model_grads` (which all-reduces the
    sequence-parallel norm and QK-norm gradients over TP) plus the engine's sum of the split head's gradients over
    TP; returns (output, {name: grad}). A stage that is not the last gets its output gradient from
    `output_grad(output)`."""
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    ddp.zero_grad_buffer()
    out = ddp(batch, head_t, head_noise)
    if isinstance(out, torch.Tensor):
        out.backward(output_grad(out))
    else:
        out.loss.backward()
    finalize_model_grads([ddp])
    if model.post_process:
        from megatron.core import parallel_state

        from training.engines.megatron import sum_head_grads_over_tp

        sum_head_grads_over_tp([model.vision_head], parallel_state.get_tensor_model_parallel_group())
    return out, {k: p.main_grad.clone() for k, p in model.named_parameters()}


def fp32(**kw) -> MegatronParallelConfig:
    return MegatronParallelConfig(params_dtype=torch.float32, use_cpu_initialization=True, **kw)


def loss_terms(out):
    return {k: float(getattr(out, k)) for k in ("loss", "text_ce_sum", "vision_loss_sum")} | {"n": out.text_tokens}


def assert_rel_close(got: float | torch.Tensor, want: float | torch.Tensor, what: str, tol: float = 1e-5):
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol}"


def assert_matches_reference(terms, grads_megatron, ref_terms, ref_grads, cfg, what):
    for k in ("loss", "text_ce_sum", "vision_loss_sum"):
        assert_rel_close(terms[k], ref_terms[k], f"{what} {k}")
    assert terms["n"] == ref_terms["n"]
    grads = megatron_to_reference(grads_megatron, cfg.llm)
    assert grads.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        assert_rel_close(grads[k], g, f"{what} grad {k}")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    cfg, ref, batch, head_t, head_noise = make_case()
    out = ref(batch, head_t, head_noise)
    out.loss.backward()
    ref_grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
    full = reference_to_megatron({k: v.detach() for k, v in ref.state_dict().items()}, cfg.llm)
    path = tmp_path_factory.mktemp("megatron_case") / "case.pt"
    torch.save(dict(cfg=cfg, full=full, batch=batch, head_t=head_t, head_noise=head_noise), path)
    return dict(
        cfg=cfg,
        batch=batch,
        head_t=head_t,
        head_noise=head_noise,
        full=full,
        path=path,
        ref_terms=loss_terms(out),
        ref_grads=ref_grads,
    )


@pytest.fixture(scope="module")
def megatron():
    with megatron_in_process():
        yield


@pytest.fixture(scope="module")
def tp1(case, megatron):
    model = MegatronT2IBitDance(case["cfg"], fp32()).eval()
    load_model_state(model, case["full"])
    out, grads = step(model, case["batch"], case["head_t"], case["head_noise"])
    return loss_terms(out), grads


def test_tp1_equals_reference(case, tp1):
    terms, grads = tp1
    assert_matches_reference(terms, grads, case["ref_terms"], case["ref_grads"], case["cfg"], "TP=1")


def test_rotary_on_packed_positions_matches_qwen3(case, megatron):
    model = MegatronT2IBitDance(case["cfg"], fp32())
    position_ids = case["batch"].position_ids  # restarts per packed sample
    b, s = position_ids.shape
    x = torch.randn(s, b, 4, 32)
    got = apply_rotary_pos_emb(x, model.rotary_freqs(position_ids), config=model.config)
    cos, sin = rope_cos_sin(position_ids, 32, case["cfg"].llm.rope_theta)
    want = apply_rotary(x.permute(1, 2, 0, 3), cos, sin).permute(2, 0, 1, 3)
    assert (got - want).abs().max().item() <= 1e-6


def test_core_attention_flex_equals_dense(case, megatron):
    cfg = case["cfg"]
    model = MegatronT2IBitDance(cfg, fp32())
    core = BlockCausalCoreAttention(model.config, layer_number=1)
    batch = case["batch"]
    b, s = batch.doc_ids.shape
    q, k, v = torch.randn(s, b, 4, 32), torch.randn(s, b, 2, 32), torch.randn(s, b, 2, 32)
    dense = core(q, k, v, block_causal_mask(batch.doc_ids, batch.block_ids, "dense"))
    flex = core(q, k, v, block_causal_mask(batch.doc_ids, batch.block_ids, "flex"))
    assert dense.shape == (s, b, 4 * 32)
    assert (dense - flex).abs().max().item() <= 1e-5
    with pytest.raises(TypeError, match="block_causal_mask"):
        core(q, k, v, torch.ones(b, 1, s, s, dtype=torch.bool))


def _tp_worker(rank, out_dir, case_path):
    case = torch.load(case_path, weights_only=False)
    cfg, batch = case["cfg"], case["batch"]
    result = {}
    for sp in (False, True):
        model = MegatronT2IBitDance(cfg, fp32(tp=2, sequence_parallel=sp)).eval()
        load_model_state(model, split_tp(case["full"], 2)[rank])
        if sp:
            with pytest.raises(ValueError, match="pad_packed_batch"):
                model(batch)
        run_batch = pad_packed_batch(batch, 2, PAD) if sp else batch
        out, grads = step(model, run_batch, case["head_t"], case["head_noise"])
        result[sp] = (loss_terms(out), grads)
    save_result(out_dir, rank, result)


@pytest.mark.slow
def test_tp2_with_and_without_sequence_parallel_equals_tp1_and_reference(case, tp1, tmp_path):
    ranks = spawn(_tp_worker, 2, 2, 1, tmp_path, case["path"])
    for sp in (False, True):
        what = f"TP=2 sequence_parallel={sp}"
        terms = [r[sp][0] for r in ranks]
        assert terms[0] == terms[1], f"{what}: TP ranks disagree on the loss"
        grads = merge_tp([r[sp][1] for r in ranks])  # raises if a replicated gradient differs between ranks
        assert_matches_reference(terms[0], grads, case["ref_terms"], case["ref_grads"], case["cfg"], what)
        assert_matches_reference(
            terms[0], grads, tp1[0], megatron_to_reference(tp1[1], case["cfg"].llm), case["cfg"], f"{what} vs TP=1"
        )


def _pp_worker(rank, out_dir, case_path):
    case = torch.load(case_path, weights_only=False)
    cfg, batch = case["cfg"], case["batch"]
    model = MegatronT2IBitDance(cfg, fp32(pp=2), pre_process=rank == 0, post_process=rank == 1).eval()
    assert len(model.decoder.layers) == 1 and model.decoder.layers[0].layer_number == rank + 1
    load_model_state(model, split_pp(case["full"], cfg.llm.num_hidden_layers, 2)[rank])
    b, s = batch.input_ids.shape
    if rank == 0:

        def exchange(hidden):  # send the activation forward, receive its gradient back
            assert hidden.shape == (s, b, cfg.llm.hidden_size)
            dist.send(hidden.detach().contiguous(), dst=1)
            grad = torch.empty_like(hidden)
            dist.recv(grad, src=1)
            return grad

        _, grads = step(model, batch, output_grad=exchange)
        terms = None
    else:
        received = torch.empty(s, b, cfg.llm.hidden_size)
        dist.recv(received, src=0)
        received.requires_grad_(True)
        model.set_input_tensor([received])  # what a pipeline schedule does
        out, grads = step(model, batch, case["head_t"], case["head_noise"])
        dist.send(received.grad, dst=0)
        terms = loss_terms(out)
    save_result(out_dir, rank, (terms, grads))


@pytest.mark.slow
def test_pp2_stages_equal_single_stage(case, tp1, tmp_path):
    (_, first), (terms, last) = spawn(_pp_worker, 2, 1, 2, tmp_path, case["path"])
    assert not any(k.startswith(("output_layer.", "vision_head.", "decoder.final_layernorm")) for k in first)
    assert not any(k.startswith(("word_embeddings.", "projector.")) for k in last)
    grads = merge_pp([first, last], case["cfg"].llm.num_hidden_layers)
    assert_matches_reference(
        terms, grads, tp1[0], megatron_to_reference(tp1[1], case["cfg"].llm), case["cfg"], "PP=2 vs single stage"
    )
    assert_matches_reference(terms, grads, case["ref_terms"], case["ref_grads"], case["cfg"], "PP=2 vs reference")


def test_te_layout_names_follow_megatron_key_map(case):
    """The TE spec fuses the input norms into linear_qkv / linear_fc1; megatron's local spec records the renaming."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    local_spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    renames = local_spec.submodules.sharded_state_dict_keys_map
    ref = megatron_to_reference(case["full"], case["cfg"].llm)
    te = reference_to_megatron(ref, case["cfg"].llm, layout="te")
    renamed = {}
    for key, t in case["full"].items():
        for old, new in renames.items():
            key = key.replace(f".{old}", f".{new}")
        renamed[key] = t
    assert renamed.keys() == te.keys()
    assert all(torch.equal(renamed[k], te[k]) for k in te)
