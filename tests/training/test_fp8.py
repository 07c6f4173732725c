"""engine.precision=fp8 (torchao float8, DeepSpeed engine): which linears are converted, config errors, plain state
dicts; end to end (slow): fp8 losses track the bf16 run's, and an fp8-trained checkpoint loads strictly into the plain
model and samples in bf16."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from models.c2i.model import ClassConditionalBitDance, get_c2i_config, to_patch_raster
from models.family import FAMILIES
from models.t2i.model import TextToImageBitDance, get_t2i_config
from training.config import load_config
from training.fp8 import convert_backbone, is_backbone_linear, skipped_unaligned

T2I, C2I = FAMILIES.get("t2i").fp8_prefixes, FAMILIES.get("c2i").fp8_prefixes

pytest.importorskip("torchao.float8")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402


def t2i_model():
    torch.manual_seed(0)
    return TextToImageBitDance(get_t2i_config("tiny-4x"))


def c2i_model():
    torch.manual_seed(0)
    return ClassConditionalBitDance(get_c2i_config("tiny-4x", image_size=32, downsample=2, latent_dim=16))


def float8_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}


def test_t2i_conversion_touches_exactly_the_backbone_linears():
    model = t2i_model()
    layers = model.cfg.llm.num_hidden_layers
    converted = convert_backbone(model, T2I, "tensorwise")
    expected = {f"llm.model.layers.{i}.{p}" for i in range(layers) for p in ("self_attn.q_proj", "self_attn.k_proj")}
    expected |= {f"llm.model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("v_proj", "o_proj")}
    expected |= {f"llm.model.layers.{i}.mlp.{p}" for i in range(layers) for p in ("gate_proj", "up_proj", "down_proj")}
    assert len(converted) == 7 * layers and set(converted) == expected == float8_names(model)
    assert type(model.llm.model.embed_tokens) is nn.Embedding and type(model.llm.lm_head) is nn.Linear
    assert type(model.vision_head.net.final_layer.linear) is nn.Linear
    assert type(model.projector.fc1) is nn.Linear
    assert not any(isinstance(m, Float8Linear) for m in model.vision_head.modules())


def test_c2i_conversion_touches_exactly_the_backbone_linears():
    model = c2i_model()
    converted = convert_backbone(model, C2I, "rowwise")
    parts = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2")
    expected = {f"layers.{i}.{p}" for i in range(model.cfg.n_layer) for p in parts}
    assert len(converted) == 4 * model.cfg.n_layer and set(converted) == expected == float8_names(model)
    assert type(model.cls_embedding) is nn.Embedding and type(model.pos_for_diff) is nn.Embedding
    assert type(model.head.net.final_layer.linear) is nn.Linear and type(model.proj_in.w1) is nn.Linear
    assert not any(isinstance(m, Float8Linear) for m in model.head.modules())


def test_unaligned_linears_stay_plain():
    model = nn.Module()
    model.layers = nn.ModuleList([nn.ModuleDict({"a": nn.Linear(32, 48), "b": nn.Linear(32, 40)})])
    assert is_backbone_linear(model.layers[0]["a"], "layers.0.a", C2I)
    assert not is_backbone_linear(model.layers[0]["b"], "layers.0.b", C2I)  # 40 is not a multiple of 16
    assert convert_backbone(model, C2I) == ["layers.0.a"] and skipped_unaligned(model, C2I) == ["layers.0.b"]
    assert type(model.layers[0]["b"]) is nn.Linear and isinstance(model.layers[0]["a"], Float8Linear)


def test_converted_state_dict_keeps_plain_names_and_dtypes_and_forward_is_close():
    plain, fp8 = c2i_model(), c2i_model()
    convert_backbone(fp8, C2I)
    a, b = plain.state_dict(), fp8.state_dict()
    assert list(a) == list(b) and all(a[k].dtype == b[k].dtype and type(b[k]) is torch.Tensor for k in a)
    for name in ("layers.0.attention.wqkv.weight", "layers.1.feed_forward.w2.weight"):
        assert type(dict(fp8.named_parameters())[name]) is nn.Parameter
    fresh = c2i_model()
    fresh.load_state_dict(b, strict=True)
    torch.manual_seed(1)
    bits = torch.randint(0, 2, (2, 16, 16, 16)).float() * 2 - 1
    tokens, labels = to_patch_raster(bits, fresh.cfg.parallel_num), torch.tensor([0, 3])
    ref, out = (m.eval().head_conditions(tokens, labels) for m in (fresh, fp8))
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1, rel  # float8 rounding: different, but close


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["engine.kind=megatron", "engine.zero_stage=0"], "parallel.transformer_impl=te parallel.fp8=hybrid"),
        (["engine.zero_stage=0"], "needs engine.zero_stage >= 1"),
        (["engine.zero_stage=1", "engine.fp8_recipe=delayed"], "engine.fp8_recipe must be tensorwise or rowwise"),
        (["engine.zero_stage=1", "model.kind=tokenizer"], "model.kind t2i|c2i"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace("|", r"\|").replace(".", r"\.")):
        load_config(None, ["engine.precision=fp8", *overrides])


def test_missing_torchao_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install torchao==0\.18\.0"):
        convert_backbone(c2i_model(), C2I)


# ---- end to end through training.train (slow) --------------------------------------------------------------------

STEPS = 6
# Measured on CPU (emulated float8 matmuls): over 6 steps the fp8 run's losses differ from bf16's by <= 1.5e-4
# relative (t2i total), text cross-entropy by <= 0.31% (the backbone-driven term; drift grows with the step). 2% is
# ~6x that drift, far below what a wrong scale (a factor 2 on any operand) or an unconverted bf16 layer's NaN/overflow
# would give; the runs must also differ (float8 rounding is in effect).
REL_TOL = 0.02


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from helpers.data import make_c2i_data, make_t2i_data

    root = tmp_path_factory.mktemp("fp8_data")
    t2i = make_t2i_data(root / "t2i")
    return {**t2i, "c2i": make_c2i_data(root / "c2i", t2i["ae"])}


def train(run_dir, data, kind, nproc, *overrides):
    from test_training import run

    common = [f"schedule.total_steps={STEPS}", "schedule.warmup_steps=2", "checkpoint.every=0", "engine.zero_stage=1"]
    extra = ["data.global_batch=1"] if kind == "t2i" else [f"data.micro_batch={8 // nproc}"]
    return run(run_dir, data, *common, *extra, *overrides, nproc=nproc, kind=kind)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close(bf16: list[dict], fp8: list[dict], keys: tuple[str, ...]) -> None:
    assert [r["step"] for r in bf16] == [r["step"] for r in fp8] == list(range(1, STEPS + 1))
    diffs = [abs(f[k] - b[k]) / abs(b[k]) for b, f in zip(bf16, fp8, strict=True) for k in keys]
    print(f"fp8 vs bf16 {keys}: max relative difference {max(diffs):.2e} over {STEPS} steps")
    assert max(diffs) < REL_TOL, diffs
    assert max(diffs) > 0, "fp8 losses equal bf16's: the float8 linears are not in effect"


@pytest.mark.slow
def test_t2i_fp8_tensorwise_losses_track_bf16(data, tmp_path):
    train(tmp_path / "bf16", data, "t2i", 1, "engine.precision=bf16")
    proc = train(tmp_path / "fp8", data, "t2i", 1, "engine.precision=fp8")
    assert "fp8 (torchao tensorwise): 14 backbone linears converted, 0 left in bf16" in proc.stdout + proc.stderr
    assert_close(metrics(tmp_path / "bf16"), metrics(tmp_path / "fp8"), ("loss", "loss/text_ce"))


@pytest.mark.slow
def test_c2i_fp8_rowwise_two_processes_tracks_bf16_and_checkpoint_samples_in_bf16(data, tmp_path):
    from models.c2i.sampler import sample_class_conditional
    from models.core.sampling import SamplingConfig
    from models.tokenizer.io import load_tokenizer

    train(tmp_path / "bf16", data, "c2i", 2, "engine.precision=bf16")
    train(tmp_path / "fp8", data, "c2i", 2, "engine.precision=fp8", "engine.fp8_recipe=rowwise")
    assert_close(metrics(tmp_path / "bf16"), metrics(tmp_path / "fp8"), ("loss",))
    step = f"step_{STEPS:08d}"
    bf16_state = load_file(str(tmp_path / "bf16" / "checkpoints" / step / "model.safetensors"))
    state = load_file(str(tmp_path / "fp8" / "checkpoints" / step / "model.safetensors"))
    model = c2i_model()
    assert sorted(state) == sorted(model.state_dict())
    assert {k: v.dtype for k, v in state.items()} == {k: v.dtype for k, v in bf16_state.items()}
    model.load_state_dict(state, strict=True)
    assert not float8_names(model)
    gen = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bits = sample_class_conditional(model, torch.tensor([0, 1]), SamplingConfig(steps=2, cfg_scale=2.0), gen)
        images = load_tokenizer(data["ae"]).decode(bits.float())
    assert bits.shape == (2, 16, 16, 16) and set(bits.unique().tolist()) <= {-1.0, 1.0}
    assert torch.isfinite(images).all() and images.shape[-2:] == (32, 32)
