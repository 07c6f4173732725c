"""megatron checkpoints through dist_checkpointing on CPU: model, EMA and fully reshardable optimizer state saved at one
TP/PP layout load at another with the same outputs and the same next step; the offline tools (reshard, export to the
official folder, import from official / Hugging Face folders) keep every tensor; their errors are one line."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from helpers.data import make_tokenizers  # noqa: E402
from helpers.megatron_case import (  # noqa: E402
    case_file,
    forward_loss,
    load_case,
    local_weights,
    new_engine,
    reference_model,
    step,
    train_config,
)
from helpers.megatron_cpu import megatron_in_process, save_result, spawn  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from models.t2i.io import export_t2i_folder, load_t2i_folder  # noqa: E402
from models.t2i.megatron.mapping import megatron_to_reference, merge_tp  # noqa: E402
from models.t2i.model import TextToImageBitDance, get_t2i_config  # noqa: E402
from models.t2i.text_tokenizer import T2ITextTokenizer  # noqa: E402
from training.checkpoint import load_checkpoint, main, save_checkpoint  # noqa: E402
from training.ema import ShardedEMA  # noqa: E402
from training.engines.megatron_checkpoint import DIST, load_full, single_process, tensor_meta  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SEED_STEP1, SEED_STEP2 = 11, 22
VOCAB = 544  # the test tokenizer's 542 tokens, padded to a multiple of TP=2


def first_step_and_save(engine, case, run_dir: Path) -> tuple[ShardedEMA, Path]:
    """Step 1 (seeded), EMA update, checkpoint through the training loop's save_checkpoint."""
    ema = engine.new_ema(0.5)
    torch.manual_seed(SEED_STEP1)
    assert step(engine, case["batch"]).result.applied
    ema.update(engine.module)
    path = save_checkpoint(run_dir, 1, engine, ema, {}, {"step": 1}, keep_last=2)
    return ema, path


def second_step(engine, case) -> dict:
    """Step 2 (seeded) and what it produced: the loss after the update and the weights."""
    torch.manual_seed(SEED_STEP2)
    assert step(engine, case["batch"]).result.applied
    return {"loss": forward_loss(engine, case), "weights": local_weights(engine)}


def resume(case, path: Path, tp: int = 1, pp: int = 1):
    """A fresh engine (no reference weights) and EMA restored from `path` through load_checkpoint."""
    engine = new_engine(case, tp, pp, reference=False)
    ema = engine.new_ema(0.5)
    load_checkpoint(path, engine, ema)
    return engine, ema


def ema_state(ema) -> dict:
    """The whole EMA (gathered over data-parallel ranks), keyed by the single chunk's parameter names."""
    return {k.removeprefix("0."): v.clone() for k, v in ema.full().items()}


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def update_err(got: dict, want: dict, start: dict) -> float:
    """|got - want| relative to the size of the update want - start (Adam amplifies rounding of tiny gradients)."""
    err = sum((got[k] - want[k]).double().norm() ** 2 for k in want) ** 0.5
    return (err / sum((want[k] - start[k]).double().norm() ** 2 for k in want) ** 0.5).item()


@pytest.fixture(scope="module")
def case_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_case") / "case.pt"
    case_file(path, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="module")
def base(case_path, tmp_path_factory):
    """TP=1: step 1, checkpoint, loss; step 2 as the reference continuation."""
    case, run = load_case(case_path), tmp_path_factory.mktemp("tp1_run")
    with megatron_in_process(init_model_parallel=False):
        engine = new_engine(case)
        ema, path = first_step_and_save(engine, case, run)
        out = {
            "path": path,
            "loss1": forward_loss(engine, case),
            "weights1": local_weights(engine),
            "ema1": ema_state(ema),
        }
        out.update({f"{k}2": v for k, v in second_step(engine, case).items()})
    return out


def test_same_layout_resume_is_exact(base, case_path):
    case = load_case(case_path)
    with megatron_in_process(init_model_parallel=False):
        engine, ema = resume(case, base["path"])
        assert forward_loss(engine, case) == base["loss1"]
        assert all(torch.equal(v, base["ema1"][k]) for k, v in ema_state(ema).items())
        after = second_step(engine, case)
    assert after["loss"] == base["loss2"]
    assert all(torch.equal(v, base["weights2"][k]) for k, v in after["weights"].items())


def test_checkpoint_layout(base):
    section = json.loads((base["path"] / "trainer.json").read_text())["megatron"]
    assert section["contents"] == ["ema", "model", "optimizer"]
    assert section["layout"] == {"tp": 1, "pp": 1, "virtual_pp": None, "dp": 1}
    assert (base["path"] / "rank_00000.pt").is_file() and (base["path"] / DIST / "metadata.json").is_file()
    assert (base["path"].parent / "latest").read_text().strip() == base["path"].name
    keys = single_process(tensor_meta, base["path"] / DIST)
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    assert keys[f"model.{qkv}"][0] == (2, 256, 128)  # layers stacked by global index
    assert keys[f"ema.{qkv}"][1] == torch.float32
    for kind in ("param", "exp_avg", "exp_avg_sq"):  # param: the fp32 main weights
        assert keys[f"optimizer.state.{kind}.model.{qkv}"][0] == (2, 256, 128)
    assert keys["model.vision_head.net.input_proj.weight"][0] == (128, 16)
    assert keys["model.word_embeddings.weight"][0] == (VOCAB, 128)
    assert not any("layers.0" in k or "_extra_state" in k for k in keys)


def _tp2_worker(rank, out_dir, case_path, tp1_path):
    """Save at TP=2 and continue; then resume the TP=1 checkpoint at TP=2 and continue."""
    case = load_case(case_path)
    engine = new_engine(case, tp=2)
    sharded = engine.chunks[0].sharded_state_dict(prefix="model.")
    qkv = sharded["model.decoder.layers.0.self_attention.linear_qkv.weight"]
    head = sharded["model.vision_head.net.input_proj.weight"]
    fc1 = sharded["model.decoder.layers.1.mlp.linear_fc1.weight"]
    layout = {
        "qkv": (qkv.key, qkv.global_shape, qkv.global_offset, qkv.replica_id),
        "head": head.replica_id,
        "fc1": [(t.global_offset, t.axis_fragmentations) for t in fc1.build()],
    }
    _, path = first_step_and_save(engine, case, out_dir / "tp2_run")
    saved = {"path": path, "loss1": forward_loss(engine, case), **second_step(engine, case)}
    engine, ema = resume(case, tp1_path, tp=2)
    resumed = {"loss1": forward_loss(engine, case), "ema1": ema_state(ema), **second_step(engine, case)}
    save_result(out_dir, rank, {"layout": layout, "saved": saved, "resumed": resumed})


@pytest.fixture(scope="module")
def tp2(base, case_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    return spawn(_tp2_worker, 2, 0, 0, out, case_path, base["path"])


@pytest.mark.slow
def test_tp2_sharded_state_dict_layout(tp2):
    for rank, r in enumerate(tp2):
        key, shape, offset, replica = r["layout"]["qkv"]
        assert key == "model.decoder.layers.self_attention.linear_qkv.weight" and shape == (2, 256, 128)
        assert offset == (0, rank * 128, 0) and replica == (0, 0, 0)  # layer 0, TP shard `rank`, main replica
        assert r["layout"]["head"] == (0, rank, 0)  # the diffusion head is replicated over TP: rank 0 is main
        gate, up = r["layout"]["fc1"]  # [gate_r; up_r]: pieces r and 2 + r of 4 along the (layer-offset) rows
        assert gate == ((1, rank * 128, 0), (2, 4, 1)) and up == ((1, (2 + rank) * 128, 0), (2, 4, 1))


@pytest.mark.slow
def test_tp2_checkpoint_resumes_at_tp1_and_tp1_at_tp2(base, tp2, case_path):
    case, cfg = load_case(case_path), load_case(case_path)["cfg"]
    saved = tp2[0]["saved"]
    # TP=2 -> TP=1: same outputs, and the next step equals the TP=2 run's own next step
    with megatron_in_process(init_model_parallel=False):
        engine, _ = resume(case, saved["path"])
        assert rel(forward_loss(engine, case), saved["loss1"]) < 1e-6
        before = local_weights(engine)
        after = second_step(engine, case)
    assert rel(after["loss"], saved["loss"]) < 1e-6
    tp2_weights = megatron_to_reference(merge_tp([r["saved"]["weights"] for r in tp2]), cfg.llm)
    ref = lambda w: megatron_to_reference(w, cfg.llm)  # noqa: E731
    assert update_err(ref(after["weights"]), tp2_weights, ref(before)) < 1e-4
    # TP=1 -> TP=2: same outputs, same EMA, and the next step equals the TP=1 run's
    resumed = [r["resumed"] for r in tp2]
    assert rel(resumed[0]["loss1"], base["loss1"]) < 1e-6
    assert all(torch.equal(v, base["ema1"][k]) for k, v in merge_tp([r["ema1"] for r in resumed]).items())
    assert rel(resumed[0]["loss"], base["loss2"]) < 1e-6
    merged = ref(merge_tp([r["weights"] for r in resumed]))
    assert update_err(merged, ref(base["weights2"]), ref(base["weights1"])) < 1e-4


def _pp2_worker(rank, out_dir, case_path, tp1_path):
    """Resume the TP=1 checkpoint at PP=2 (construction and checkpoints only: the pipeline schedule needs CUDA) and
    save it again from the two stages."""
    case = load_case(case_path)
    engine, ema = resume(case, tp1_path, pp=2)
    qkv = engine.chunks[0].sharded_state_dict(prefix="model.")[
        "model.decoder.layers.0.self_attention.linear_qkv.weight"
    ]
    path = save_checkpoint(out_dir / "pp2_run", 1, engine, ema, {}, {"step": 1}, keep_last=2)
    save_result(out_dir, rank, {"path": path, "qkv": (qkv.global_shape, qkv.global_offset)})


@pytest.mark.slow
def test_pp2_keys_layers_globally_and_round_trips_exactly(base, case_path, tmp_path):
    ranks = spawn(_pp2_worker, 2, 0, 0, tmp_path, case_path, base["path"])
    for stage, r in enumerate(ranks):
        assert r["qkv"] == ((2, 256, 128), (stage, 0, 0))  # the stage's local layer 0 is global layer `stage`
    case = load_case(case_path)
    with megatron_in_process(init_model_parallel=False):
        engine, ema = resume(case, ranks[0]["path"])
        assert forward_loss(engine, case) == base["loss1"]
        assert all(torch.equal(v, base["ema1"][k]) for k, v in ema_state(ema).items())
        after = second_step(engine, case)
    assert after["loss"] == base["loss2"]
    assert all(torch.equal(v, base["weights2"][k]) for k, v in after["weights"].items())


def _interleaved_worker(rank, out_dir, case_path):
    """PP=2 with two virtual stages per rank: chunks from the reference weights, then a checkpoint."""
    case = load_case(case_path)
    engine = new_engine(case, pp=2, overrides=("parallel.virtual_pp=2", "data.global_batch=2"))
    layers = []
    for chunk in engine.chunks:
        sharded = chunk.sharded_state_dict(prefix="model.")
        qkv = sharded["model.decoder.layers.0.self_attention.linear_qkv.weight"]
        layers.append((qkv.global_offset[0], chunk.pre_process, chunk.post_process))
    path = save_checkpoint(out_dir / "vpp_run", 0, engine, engine.new_ema(0.5), {}, {"step": 0}, keep_last=2)
    save_result(out_dir, rank, {"path": path, "layers": layers})


@pytest.mark.slow
def test_interleaved_chunks_hold_their_global_layers(tmp_path):
    case_file(tmp_path / "deep.pt", num_layers=4)
    case = load_case(tmp_path / "deep.pt")
    ranks = spawn(_interleaved_worker, 2, 0, 0, tmp_path, tmp_path / "deep.pt")
    # rank r, virtual stage v holds global layer 2 v + r; the first chunk embeds, the last one scores
    assert ranks[0]["layers"] == [(0, True, False), (2, False, False)]
    assert ranks[1]["layers"] == [(1, False, False), (3, False, True)]
    with megatron_in_process(init_model_parallel=False):
        engine, ema = resume(case, ranks[0]["path"])
        weights = megatron_to_reference(local_weights(engine), case["cfg"].llm)
    assert weights.keys() == case["ref"].keys()
    assert all(torch.equal(weights[k], v) for k, v in case["ref"].items())
    assert all(torch.equal(v, ema_state(ema)[k]) for k, v in local_weights(engine).items())


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "training.checkpoint", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_reshard_cli_rewrites_chunks_and_keeps_optimizer_state(base, tp2, case_path, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    cli("reshard", "--src", str(base["path"]), "--dst", str(tmp_path / "to_tp2"), "--tp", "2", "--pp", "1")
    cli("reshard", "--src", str(tp2[0]["saved"]["path"]), "--dst", str(tmp_path / "to_tp1"), "--tp", "1", "--pp", "1")
    chunks = FileSystemReader(str(tmp_path / "to_tp2" / DIST)).read_metadata().state_dict_metadata
    fc1 = chunks["optimizer.state.exp_avg.model.decoder.layers.mlp.linear_fc1.weight"].chunks
    assert sorted(tuple(c.offsets) for c in fc1) == [(i, j * 128, 0) for i in range(2) for j in range(4)]
    assert len(chunks["model.vision_head.net.input_proj.weight"].chunks) == 1
    case = load_case(case_path)
    with megatron_in_process(init_model_parallel=False):
        engine, ema = resume(case, tmp_path / "to_tp2")  # resharded for TP=2, loaded at TP=1: exact
        assert forward_loss(engine, case) == base["loss1"]
        assert all(torch.equal(v, base["ema1"][k]) for k, v in ema_state(ema).items())
        assert second_step(engine, case)["loss"] == base["loss2"]
        direct, _ = resume(case, tp2[0]["saved"]["path"])
        direct_after = second_step(direct, case)
        engine, _ = resume(case, tmp_path / "to_tp1")
        after = second_step(engine, case)
    assert after["loss"] == direct_after["loss"]
    assert all(torch.equal(v, direct_after["weights"][k]) for k, v in after["weights"].items())


# ---- official folder in and out -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return make_tokenizers(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module")
def official(tokenizers, tmp_path_factory):
    """An official-layout folder of a bf16 tiny model (vocabulary: the tokenizer's, padded to a multiple of 4)."""
    text_dir, ae_dir = tokenizers
    tok = T2ITextTokenizer.from_folder(text_dir, 4)
    cfg = get_t2i_config("tiny-4x")
    cfg = replace(cfg, llm=replace(cfg.llm, vocab_size=len(tok) + (-len(tok)) % 4))
    torch.manual_seed(1)
    model = TextToImageBitDance(cfg).to(torch.bfloat16)
    from models.tokenizer.io import load_tokenizer

    return export_t2i_folder(model, tok, load_tokenizer(ae_dir), tmp_path_factory.mktemp("official") / "folder")


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder, keyed `<file>:<name>`; the LLM's files (one or sharded) as `llm:<name>`."""
    part = lambda f: "llm" if f.name.startswith("model") else f.name  # noqa: E731
    return {f"{part(f)}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_import_export_round_trip_is_byte_identical(official, tokenizers, tmp_path):
    text_dir, ae_dir = tokenizers
    assert main(["import", "--src", str(official), "--dst", str(tmp_path / "ckpt"), "--tp", "2", "--pp", "2"]) is None
    assert (
        main(
            [
                "export",
                "--src",
                str(tmp_path / "ckpt"),
                "--dst",
                str(tmp_path / "out"),
                "--text-tokenizer",
                str(text_dir),
                "--image-tokenizer",
                str(ae_dir),
            ]
        )
        is None
    )
    want, got = folder_tensors(official), folder_tensors(tmp_path / "out")
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_import_from_a_hugging_face_qwen3_folder(official, tmp_path):
    hf = tmp_path / "qwen3"
    hf.mkdir()
    for name in ("config.json", "model.safetensors"):
        (hf / name).write_bytes((official / name).read_bytes())
    args = ["import", "--src", str(hf), "--dst", str(tmp_path / "ckpt"), "--tp", "2", "--pp", "1"]
    with pytest.raises(SystemExit, match="2"):
        main(args)  # the head's config must be named
    main([*args, "--model", "tiny-4x", "--vocab-size", "520"])
    state = single_process(load_full, tmp_path / "ckpt" / DIST, "model.")
    backbone = load_file(str(official / "model.safetensors"))
    assert torch.equal(
        state["decoder.layers.1.self_attention.k_layernorm.weight"], backbone["model.layers.1.self_attn.k_norm.weight"]
    )
    assert state["word_embeddings.weight"].shape[0] == 520 and state["projector.fc1.weight"].dtype == torch.bfloat16


@pytest.mark.slow
def test_export_of_a_trained_checkpoint_gives_the_same_loss(base, tokenizers, case_path, tmp_path):
    text_dir, ae_dir = tokenizers
    cli(
        "export",
        "--src",
        str(base["path"]),
        "--dst",
        str(tmp_path / "out"),
        "--text-tokenizer",
        str(text_dir),
        "--image-tokenizer",
        str(ae_dir),
        "--weights",
        "model",
        "--dtype",
        "fp32",  # the loss is compared to the fp32 run's
    )
    case = load_case(case_path)
    model, _, _ = load_t2i_folder(tmp_path / "out", attention="dense", image_sizes=case["cfg"].image_sizes)
    with torch.no_grad():
        loss = float(model(case["batch"], case["head_t"], case["head_noise"]).loss)
    assert rel(loss, base["loss1"]) < 1e-5


def test_cli_errors_are_one_line(official, tokenizers, tmp_path, capsys):
    text_dir, _ = tokenizers
    ckpt = tmp_path / "ckpt"
    main(["import", "--src", str(official), "--dst", str(ckpt), "--tp", "1", "--pp", "1"])
    capsys.readouterr()
    cases = [
        (
            ["reshard", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "x"), "--tp", "1", "--pp", "1"],
            "does not exist",
        ),
        (
            ["import", "--src", str(official), "--dst", str(tmp_path / "y"), "--tp", "3", "--pp", "1"],
            "tp=3 does not divide the 4 attention heads",
        ),
        (
            ["import", "--src", str(official), "--dst", str(tmp_path / "z"), "--tp", "1", "--pp", "3"],
            "pp=3 does not divide the 2 layers",
        ),
        (
            [
                "export",
                "--src",
                str(official),
                "--dst",
                str(tmp_path / "w"),
                "--text-tokenizer",
                str(text_dir),
                "--image-tokenizer",
                "x",
            ],
            "is not a megatron checkpoint",
        ),
        (
            [
                "export",
                "--src",
                str(ckpt),
                "--dst",
                str(tmp_path / "v"),
                "--text-tokenizer",
                str(text_dir),
                "--image-tokenizer",
                str(tmp_path / "no_ae"),
            ],
            "no_ae does not exist",
        ),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


def test_engine_starts_from_an_imported_checkpoint(official, case_path, tmp_path):
    """`model.init_from=<megatron checkpoint>`: every rank reads its shard; the optimizer's main weights follow."""
    from training.engines.megatron import MegatronEngine
    from training.engines.megatron_checkpoint import model_config_of

    main(["import", "--src", str(official), "--dst", str(tmp_path / "ckpt"), "--tp", "1", "--pp", "1"])
    cfg = replace(model_config_of(tmp_path / "ckpt"), attention="dense")
    want, _, _ = load_t2i_folder(official)
    with megatron_in_process(init_model_parallel=False):
        engine = MegatronEngine(train_config(), cfg, None, tmp_path / "ckpt")
        start = local_weights(engine)
        assert step(engine, load_case(case_path)["batch"]).result.applied
        moved = max((local_weights(engine)[k] - v).abs().max().item() for k, v in start.items())
    got = megatron_to_reference(start, cfg.llm)
    assert all(torch.equal(got[k], v.float()) for k, v in want.state_dict().items())
    assert 0 < moved <= 2 * train_config().optim.lr  # one Adam step from the imported weights, not from fresh ones


def test_bf16_resume_restores_the_fp32_main_weights(case_path, tmp_path):
    """bf16 weights, fp32 main weights and Adam state in the distributed optimizer: resuming is exact."""
    from training.engines.megatron import MegatronEngine

    case, cfg = load_case(case_path), train_config(1, 1, "engine.precision=bf16")
    with megatron_in_process(init_model_parallel=False):
        engine = MegatronEngine(cfg, case["cfg"], reference_model(case))
        assert {p.dtype for p in engine.chunks[0].parameters()} == {torch.bfloat16}
        ema = engine.new_ema(0.5)
        for _ in range(2):
            assert step(engine, case["batch"]).result.applied
            ema.update(engine.module)
        path = save_checkpoint(tmp_path / "run", 2, engine, ema, {}, {"step": 2}, keep_last=1)
        want = second_step(engine, case)
        resumed = MegatronEngine(cfg, case["cfg"])
        load_checkpoint(path, resumed, resumed.new_ema(0.5))
        got = second_step(resumed, case)
    keys = single_process(tensor_meta, path / DIST)
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    assert keys[f"model.{qkv}"][1] == torch.bfloat16 and keys[f"optimizer.state.param.model.{qkv}"][1] == torch.float32
    assert got["loss"] == want["loss"]
    assert all(torch.equal(v, want["weights"][k]) for k, v in got["weights"].items())
