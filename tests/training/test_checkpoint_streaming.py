"""The streaming checkpoint tools (training/engines/checkpoint_stream.py): export, import and reshard hold about one
decoder layer (plus the embeddings) at a time, measured as peak RSS of the CLI in a subprocess; their outputs are
exact (export in bf16 by default, fp32 on request); the megatron engine's `model.init_from=<folder>` gives every rank
its own slice of the folder's weights.

Memory bound, for each tool: peak VmHWM of the tool process minus the VmHWM of a process that imports the same
modules and does nothing must stay under 2 x (largest layer bytes + non-layer bytes) of the tensors the tool moves
(non-layer: embeddings, LM head, final norm, projector, vision head; for reshard every layer/non-layer byte counts once
per stored kind: model, EMA, fp32 main weights and two Adam moments). The model (hidden 1024, 8 layers) is big enough
that its full size is several times that bound, which the tests assert too (so a non-streaming tool fails them)."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from helpers.data import make_tokenizers  # noqa: E402
from helpers.megatron_case import train_config  # noqa: E402
from helpers.megatron_cpu import save_result, spawn  # noqa: E402
from safetensors import safe_open  # noqa: E402

from models.t2i.io import export_t2i_folder, load_t2i_folder  # noqa: E402
from models.t2i.megatron.mapping import reference_to_megatron, split_tp, tp_split  # noqa: E402
from models.t2i.model import TextToImageBitDance, get_t2i_config  # noqa: E402
from models.t2i.text_tokenizer import T2ITextTokenizer  # noqa: E402
from models.tokenizer.io import load_tokenizer  # noqa: E402
from training.engines.checkpoint_stream import TOP, CheckpointLayers, reshard_streaming, save_lazy  # noqa: E402
from training.engines.megatron_checkpoint import (  # noqa: E402
    DIST,
    TRAINER,
    fresh_dir,
    single_process,
    tensor_meta,
)

REPO = Path(__file__).resolve().parents[2]
VOCAB = 544  # the test tokenizer's 542 tokens, padded to a multiple of 4
LAYERS = 8
KINDS = ("model.", "ema.", "optimizer.state.param.model.", "optimizer.state.exp_avg.model.")
KINDS += ("optimizer.state.exp_avg_sq.model.",)
MODULES = (
    "training.checkpoint",
    "training.engines.megatron_checkpoint",
    "training.engines.checkpoint_stream",
    "megatron.core.dist_checkpointing",
    "torch.distributed.checkpoint",
    "safetensors.torch",
    "models.t2i.io",
    "models.t2i.megatron.mapping",
    "models.tokenizer.io",
)
# runs the CLI with the given arguments (none: only the imports) and prints its own peak RSS (kB) last
WRAPPER = (
    f"import sys, importlib; [importlib.import_module(m) for m in {MODULES!r}]; "
    "from training.checkpoint import main; main(sys.argv[1:]) if sys.argv[1:] else None; "
    "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])"
)


# MALLOC: glibc serves allocations above its mmap threshold with their own mappings, returned to the system when
# freed; below it they come from the heap, where freed layers leave fragments that count as resident. The threshold
# adapts up to 32 MB, below every layer tensor of a 14B model (a 5120 x 17408 fp32 matrix is 340 MB), so at scale each
# layer's memory is returned when the next one is read. This model's tensors are 1-8 MB: the tool processes run with a
# 1 MB threshold so that they behave as at scale (the baseline process too).


def big_config():
    cfg = get_t2i_config("tiny-4x")
    llm = replace(
        cfg.llm,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        vocab_size=VOCAB,
    )
    return replace(cfg, llm=llm, head=replace(cfg.head, ch_cond=1024))


def peak_rss_mb(*args: str) -> float:
    """VmHWM (MB) of a fresh interpreter running `python -m training.checkpoint <args>` after importing `MODULES`."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}  # see MALLOC below
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return int(proc.stdout.split()[-1]) / 1024


def layer_and_top_mb(meta: dict, prefixes: tuple[str, ...]) -> tuple[float, float, float]:
    """(largest layer, non-layer, whole model) MB of the checkpoint tensors under `prefixes`."""
    layer = top = 0
    for key, (shape, dtype) in meta.items():
        if not key.startswith(prefixes):
            continue
        n = torch.Size(shape).numel() * dtype.itemsize
        if ".decoder.layers." in key:
            layer += n // shape[0]
        else:
            top += n
    return layer / 2**20, top / 2**20, (layer * LAYERS + top) / 2**20


def check_bound(tool: str, peak: float, baseline: float, layer: float, top: float, full: float) -> None:
    bound = 2 * (layer + top)
    print(
        f"{tool}: peak {peak:.0f} MB - baseline {baseline:.0f} MB = {peak - baseline:.0f} MB; bound {bound:.0f} MB "
        f"(2 x (layer {layer:.0f} + non-layer {top:.0f})); whole model {full:.0f} MB"
    )
    assert full > 2 * bound  # the bound is tight enough to catch a tool that holds the whole model
    assert peak - baseline < bound


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return make_tokenizers(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module")
def official(tokenizers, tmp_path_factory):
    """An fp32 official-layout folder of the big model (one `model.safetensors`)."""
    text_dir, ae_dir = tokenizers
    torch.manual_seed(1)
    model = TextToImageBitDance(big_config())
    with torch.no_grad():  # the head is zero-initialised: give it values a mix-up would show
        for p in model.vision_head.parameters():
            p.normal_()
    tok = T2ITextTokenizer.from_folder(text_dir, 4)
    return export_t2i_folder(model, tok, load_tokenizer(ae_dir), tmp_path_factory.mktemp("official") / "folder")


@pytest.fixture(scope="module")
def baseline():
    return peak_rss_mb()


@pytest.fixture(scope="module")
def imported(official, baseline, tmp_path_factory):
    dst = tmp_path_factory.mktemp("imported") / "ckpt"
    peak = peak_rss_mb("import", "--src", str(official), "--dst", str(dst), "--tp", "2", "--pp", "2")
    return dst, peak


def test_import_streams(imported, baseline):
    dst, peak = imported
    meta = single_process(tensor_meta, dst / DIST)
    check_bound("import", peak, baseline, *layer_and_top_mb(meta, ("model.",)))


def export(src: Path, dst: Path, tokenizers, *extra: str) -> float:
    text_dir, ae_dir = tokenizers
    args = ["--text-tokenizer", str(text_dir), "--image-tokenizer", str(ae_dir), "--weights", "model", *extra]
    return peak_rss_mb("export", "--src", str(src), "--dst", str(dst), *args)


def folder_state(folder: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_t2i_folder(folder)
    return model.state_dict()


def test_export_streams_bf16_shards_that_load_as_the_weights_in_bf16(
    imported, official, tokenizers, baseline, tmp_path
):
    src, _ = imported
    peak = export(src, tmp_path / "out", tokenizers)
    meta = single_process(tensor_meta, src / DIST)
    check_bound("export", peak, baseline, *layer_and_top_mb(meta, ("model.",)))
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == [f"model-{i:05d}-of-{LAYERS + 1:05d}.safetensors" for i in range(1, 10)]
    assert index["model.layers.3.mlp.up_proj.weight"] == "model-00004-of-00009.safetensors"
    for name in set(index.values()):
        with safe_open(str(out / name), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    want, got = folder_state(official), folder_state(out)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16)), k


def test_import_export_round_trip_is_exact_in_fp32(imported, official, tokenizers, tmp_path):
    src, _ = imported
    export(src, tmp_path / "out", tokenizers, "--dtype", "fp32")
    want, got = folder_state(official), folder_state(tmp_path / "out")
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k


@pytest.fixture(scope="module")
def training_checkpoint(imported, tmp_path_factory):
    """A model + EMA + optimizer checkpoint (TP=2, PP=2) made from the imported one: each kind its own values."""
    src, _ = imported
    dst = tmp_path_factory.mktemp("trained") / "ckpt"

    def write():
        model_meta = tensor_meta(src / DIST)
        meta = {
            kind + k[len("model.") :]: (shape, torch.float32) for k, (shape, _) in model_meta.items() for kind in KINDS
        }
        source = CheckpointLayers(src / DIST, model_meta)
        cache = {}

        def fetch(key, offsets, sizes):
            group = offsets[0] if ".decoder.layers." in key else TOP
            if cache.get("group") != group:
                cache.clear()
                cache.update(group=group, tensors=source.read(group))
            kind = next(k for k in KINDS if key.startswith(k))
            t = cache["tensors"]["model." + key[len(kind) :]] + KINDS.index(kind)
            inner = zip(offsets[1:], sizes[1:], strict=True) if group != TOP else zip(offsets, sizes, strict=True)
            return t[tuple(slice(o, o + s) for o, s in inner)].reshape(sizes)

        fresh_dir(dst)
        save_lazy(meta, 2, 2, fetch, dst / DIST)

    single_process(write)
    trainer = json.loads((src / TRAINER).read_text())
    trainer["megatron"]["contents"] = ["ema", "model", "optimizer"]
    (dst / TRAINER).write_text(json.dumps(trainer))
    return dst


def same_groups(a: Path, b: Path) -> None:
    """Every group (layer, non-layer tensors) of every key equal in two dist checkpoints, one group at a time."""

    def compare():
        meta = tensor_meta(a / DIST)
        assert tensor_meta(b / DIST) == meta
        left, right = CheckpointLayers(a / DIST, meta), CheckpointLayers(b / DIST, meta)
        for group in [TOP, *range(LAYERS)]:
            x, y = left.read(group), right.read(group)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), group

    single_process(compare)


def test_reshard_streams_and_keeps_every_tensor(training_checkpoint, baseline, tmp_path):
    dst = tmp_path / "tp1pp4"
    peak = peak_rss_mb("reshard", "--src", str(training_checkpoint), "--dst", str(dst), "--tp", "1", "--pp", "4")
    meta = single_process(tensor_meta, training_checkpoint / DIST)
    check_bound("reshard", peak, baseline, *layer_and_top_mb(meta, KINDS))
    assert json.loads((dst / TRAINER).read_text())["megatron"]["layout"]["pp"] == 4
    same_groups(training_checkpoint, dst)


def test_reshard_reads_each_source_layer_once(imported, tmp_path):
    """The writer visits the chunks layer by layer: the one-layer cache reads each group once."""
    src, _ = imported
    fresh_dir(tmp_path / "r")
    fetch = single_process(reshard_streaming, src, tmp_path / "r", 1, 1)
    assert fetch.reads == LAYERS + 1
    meta = single_process(tensor_meta, src / DIST)
    # one file per chunk: per layer for stacked keys, fc1 as two pieces ([gate; up]) even at TP=1
    items = sum((shape[0] if ".decoder.layers." in k else 1) * tp_split(k)[1] for k, (shape, _) in meta.items())
    assert len(list((tmp_path / "r" / DIST).glob("*.distcp"))) == items


# ---- the megatron engine's model.init_from=<folder> -----------------------------------------------------------------


def _init_from_worker(rank, out_dir, folder):
    from models.t2i.megatron.mapping import model_state
    from training.engines.megatron import MegatronEngine
    from training.tasks.t2i import T2ITask

    cfg = train_config(2, 1, f"model.init_from={folder}")
    task = T2ITask.__new__(T2ITask)  # only the folder config: no data folder
    task.cfg, task.manifest = cfg, {"text_tokens": {"vocab_size": 550}}
    model_cfg = replace(task._folder_config(get_t2i_config("tiny-4x")), attention="dense")
    engine = MegatronEngine(cfg, model_cfg, init_folder=folder)
    (chunk,) = engine.chunks
    weights = {k: v.detach().clone() for k, v in model_state(chunk).items()}
    save_result(out_dir, rank, {"weights": weights, "vocab": model_cfg.llm.vocab_size})


def test_engine_init_from_a_folder_gives_each_rank_its_slice(tokenizers, tmp_path):
    text_dir, ae_dir = tokenizers
    tok = T2ITextTokenizer.from_folder(text_dir, 4)
    cfg = get_t2i_config("tiny-4x")
    cfg = replace(cfg, llm=replace(cfg.llm, vocab_size=len(tok)))  # 542; the data's 550 makes the model's 550
    torch.manual_seed(3)
    model = TextToImageBitDance(cfg)
    with torch.no_grad():
        for p in model.vision_head.parameters():
            p.normal_()
    folder = export_t2i_folder(model.to(torch.bfloat16), tok, load_tokenizer(ae_dir), tmp_path / "folder")
    ranks = spawn(_init_from_worker, 2, 2, 1, tmp_path, folder)
    assert ranks[0]["vocab"] == 550
    model.resize_vocab(550)  # new rows at the mean, as the folder source makes them
    full = reference_to_megatron({k: v.float() for k, v in model.state_dict().items()}, model.cfg.llm)
    for rank, want in enumerate(split_tp(full, 2)):
        got = ranks[rank]["weights"]
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert torch.equal(got[k], v), (rank, k)
