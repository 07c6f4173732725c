"""Fixed-shape micro-batches: every packed row is padded to one length (the token budget rounded up for sequence
parallelism, FP8 and FlexAttention), so compiled attention compiles once over real demo data; padding changes neither
the loss nor the gradients; the megatron engine runs its schedule at that length."""

import itertools

import pytest
import torch
from torch._dynamo.utils import counters

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from helpers.megatron_case import PAD, make_case, new_engine, task  # noqa: E402
from helpers.megatron_cpu import megatron_in_process  # noqa: E402

from models.core.attention import compile_flex_on_cpu  # noqa: E402
from models.t2i.megatron.attention import BlockCausalCoreAttention, block_causal_mask  # noqa: E402
from models.t2i.megatron.batch import fixed_length, pad_to_length, sequence_multiple  # noqa: E402

BUDGET = 1000  # tokens per packed row of the demo data (tp=2, sequence parallel, flex: padded to 1024)
MICRO_BATCHES = 60


@pytest.fixture(scope="module")
def demo_batches(tmp_path_factory):
    """60 micro-batches (one packed row each) of the tokenized demo data, as the training loader hands them out."""
    from helpers.data import make_t2i_data

    from data_pipeline.loader import BinaryTokenLoader, LoaderConfig

    tokens = make_t2i_data(tmp_path_factory.mktemp("fixed_shapes"))["tokens"]
    cfg = LoaderConfig(tokens, kind="t2i", token_budget=BUDGET, num_workers=0, caption_dropout=0.1)
    return list(itertools.islice(iter(BinaryTokenLoader(cfg, rank=0, world_size=1)), MICRO_BATCHES))


@pytest.fixture(scope="module")
def core_attention():
    from models.t2i.megatron.config import MegatronParallelConfig, transformer_config
    from models.t2i.model import get_t2i_config

    cfg = get_t2i_config("tiny-4x")  # 4 query heads, 2 KV heads of 32 channels
    config = transformer_config(cfg, MegatronParallelConfig(params_dtype=torch.float32, use_cpu_initialization=True))
    return BlockCausalCoreAttention(config, layer_number=1, backend="flex")


def compilations(core, batches, length: int | None) -> int:
    """Compiled graphs (dynamo) of the product's compiled FlexAttention over `batches`, padded to `length` (as the
    megatron engine pads them) or not; attention as the megatron core attention runs it."""
    torch._dynamo.reset()
    counters.clear()
    compile_flex_on_cpu("eager")  # the GPU path (torch.compile(flex_attention, dynamic=False)), tracing only
    try:
        for batch in batches:
            if length is not None:
                batch = pad_to_length(batch, length, PAD)
            b, s = batch.doc_ids.shape
            mask = block_causal_mask(batch.doc_ids, batch.block_ids, "flex")
            q, k, v = torch.randn(s, b, 4, 32), torch.randn(s, b, 2, 32), torch.randn(s, b, 2, 32)
            assert core(q, k, v, mask).shape == (s, b, 4 * 32)
        return counters["stats"]["unique_graphs"]
    finally:
        compile_flex_on_cpu(None)
        torch._dynamo.reset()


def test_compiled_attention_compiles_once_over_sixty_demo_micro_batches(demo_batches, core_attention):
    lengths = sorted({b.input_ids.shape[1] for b in demo_batches})
    assert len(lengths) >= 4, lengths  # the loader's rows differ in length: unpadded, each would compile anew
    length = fixed_length(BUDGET, sequence_multiple(tp=2, sequence_parallel=True, flex=True))
    assert length == 1024
    padded = compilations(core_attention, demo_batches, length)
    unpadded = compilations(
        core_attention, [next(b for b in demo_batches if b.input_ids.shape[1] == n) for n in lengths[:4]], None
    )
    real = sum(int((b.doc_ids >= 0).sum()) for b in demo_batches)
    overhead = (MICRO_BATCHES * length - real) / real
    print(
        f"\n{MICRO_BATCHES} micro-batches, {len(lengths)} row lengths {lengths[0]}..{lengths[-1]}: "
        f"{padded} compilation(s) padded to {length} (unpadded: {unpadded} for 4 lengths); "
        f"padding overhead {overhead:.1%} of real positions"
    )
    assert padded == 1
    assert unpadded == 4  # the counter does see recompilations


def test_row_multiples_for_sequence_parallel_fp8_and_flex():
    assert sequence_multiple() == 1
    assert sequence_multiple(tp=8) == 1  # no sequence parallelism: the rows are not split over TP ranks
    assert sequence_multiple(tp=6, sequence_parallel=True) == 6
    assert sequence_multiple(tp=6, sequence_parallel=True, fp8=True) == 96  # 16 positions per TP rank
    assert sequence_multiple(tp=6, sequence_parallel=True, flex=True) == 384
    assert fixed_length(37376, sequence_multiple(tp=8, sequence_parallel=True, fp8=True, flex=True)) == 37376  # 14B
    assert fixed_length(37300, 128) == 37376


def test_padding_changes_neither_loss_nor_gradients():
    from models.t2i.megatron.config import MegatronParallelConfig
    from models.t2i.megatron.mapping import load_model_state, reference_to_megatron
    from models.t2i.megatron.model import MegatronT2IBitDance

    cfg, ref, batch, head_t, head_noise = make_case()
    full = reference_to_megatron({k: v.detach() for k, v in ref.state_dict().items()}, cfg.llm)
    with megatron_in_process():
        par = MegatronParallelConfig(params_dtype=torch.float32, use_cpu_initialization=True)
        model = MegatronT2IBitDance(cfg, par).eval()
        load_model_state(model, full)
        results = []
        for b in (batch, pad_to_length(batch, 256, PAD)):
            model.zero_grad()
            out = model(b, head_t, head_noise)
            out.loss.backward()
            results.append((out, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (out, grads), (padded, padded_grads) = results
    assert padded.text_tokens == out.text_tokens
    assert abs(padded.loss.item() - out.loss.item()) <= 1e-6 * abs(out.loss.item())
    for k, g in grads.items():
        assert (padded_grads[k] - g).norm() <= 1e-6 * g.norm() + 1e-12, k


def test_engine_runs_every_micro_batch_at_the_fixed_length():
    case = dict(zip(("cfg", "ref", "batch", "head_t", "head_noise"), make_case(), strict=True))
    case["ref"] = case["ref"].state_dict()
    with megatron_in_process(init_model_parallel=False):
        engine = new_engine(case, overrides=("data.token_budget=200",))
        (chunk,) = engine.chunks
        assert engine.seq_length == 200 and not chunk.config.variable_seq_lengths
        seen, schedule = [], engine.forward_backward
        original_forward = type(chunk).forward

        def spy_schedule(**kw):
            seen.append(kw["seq_length"])
            return schedule(**kw)

        def spy_forward(self, batch, *args):
            seen.append(batch.input_ids.shape[1])
            return original_forward(self, batch, *args)

        engine.forward_backward = spy_schedule
        chunk.forward = spy_forward.__get__(chunk)
        shorter = pad_to_length(case["batch"], 150, PAD)  # micro-batches of two lengths in one step
        stats = engine.train_step(iter([case["batch"], shorter]), task(case["cfg"]), 2)
    assert stats.result.applied
    assert seen == [200, 200, 200]
