"""The megatron engine's EMA is sharded over data-parallel ranks like the distributed optimizer: half the bytes per rank
at dp=2, the same averages as a whole-tensor EMA, and a checkpoint of it reshards (TP2 -> TP1) and exports exactly."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from helpers.megatron_case import case_file, load_case, new_engine, step  # noqa: E402
from helpers.megatron_cpu import megatron_in_process, save_result, spawn  # noqa: E402

from models.t2i.io import load_t2i_folder  # noqa: E402
from models.t2i.megatron.mapping import megatron_to_reference, merge_tp  # noqa: E402
from models.t2i.text_tokenizer import build_chat_tokenizer  # noqa: E402
from models.tokenizer.io import save_tokenizer  # noqa: E402
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config  # noqa: E402
from training.checkpoint import save_checkpoint  # noqa: E402
from training.ema import EMA  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VOCAB = 544  # the test tokenizer's 542 tokens, padded to a multiple of TP=2


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def train_two_steps(engine, case, run_dir: Path | None = None) -> dict:
    """Two seeded steps; the sharded EMA next to a whole-tensor EMA of the same weights (the reference)."""
    sharded, whole = engine.new_ema(0.5), EMA(engine.module, 0.5)
    for seed in (11, 22):
        torch.manual_seed(seed)
        assert step(engine, case["batch"]).result.applied
        sharded.update(engine.module)
        whole.update(engine.module)
    if run_dir is not None:
        save_checkpoint(run_dir, 2, engine, sharded, {}, {"step": 2}, keep_last=1)
    full = sharded.full()
    return {
        "sharded_bytes": sharded.nbytes(),
        "whole_bytes": nbytes(whole.shadow.values()),
        "max_diff": max((full[k] - whole.shadow[k]).abs().max().item() for k in full),
        "whole": {k.removeprefix("0."): v.clone() for k, v in whole.shadow.items()},
    }


def test_dp1_sharded_ema_is_the_whole_ema(tmp_path):
    case_file(tmp_path / "case.pt", vocab_size=VOCAB)
    case = load_case(tmp_path / "case.pt")
    with megatron_in_process(init_model_parallel=False):
        out = train_two_steps(new_engine(case), case)
    assert out["sharded_bytes"] == out["whole_bytes"] and out["max_diff"] == 0.0


def _dp2_worker(rank, out_dir, case_path, run_dir):
    from megatron.core import parallel_state as ps

    case = load_case(case_path)
    out = train_two_steps(new_engine(case, tp=2), case, run_dir)  # world 4: tp=2 x dp=2
    out |= {"tp": ps.get_tensor_model_parallel_rank(), "dp": ps.get_data_parallel_rank()}
    save_result(out_dir, rank, out)


@pytest.mark.slow
def test_dp2_halves_ema_memory_and_its_checkpoint_reshards_and_exports_exactly(tmp_path):
    case_file(tmp_path / "case.pt", vocab_size=VOCAB)
    results = spawn(_dp2_worker, 4, 0, 0, tmp_path, tmp_path / "case.pt", tmp_path / "run")
    print("per-rank EMA bytes at dp=2 / whole:", [round(r["sharded_bytes"] / r["whole_bytes"], 4) for r in results])
    for r in results:
        assert 0.45 <= r["sharded_bytes"] / r["whole_bytes"] <= 0.55, r["sharded_bytes"] / r["whole_bytes"]
        assert r["max_diff"] == 0.0  # the gathered shards are exactly the whole-tensor EMA
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    run = [sys.executable, "-m", "training.checkpoint"]
    for args in (
        ["reshard", "--src", str(ckpt), "--dst", str(tmp_path / "tp1"), "--tp", "1", "--pp", "1"],
        ["export", "--src", str(tmp_path / "tp1"), "--dst", str(tmp_path / "export"), "--weights", "ema"]
        + ["--dtype", "fp32"]  # exact comparison (the default is the official folders' bf16)
        + ["--text-tokenizer", str(tokenizers(tmp_path)[0]), "--image-tokenizer", str(tokenizers(tmp_path)[1])],
    ):
        proc = subprocess.run(run + args, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    by_tp = {r["tp"]: r["whole"] for r in results if r["dp"] == 0}
    want = megatron_to_reference(merge_tp([by_tp[0], by_tp[1]]), load_case(tmp_path / "case.pt")["cfg"].llm)
    model, _, _ = load_t2i_folder(tmp_path / "export")
    got = model.state_dict()
    assert want.keys() <= got.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k].float(), v, rtol=0, atol=0, msg=k)


def tokenizers(root: Path) -> tuple[Path, Path]:
    text = root / "text"
    if not text.exists():
        build_chat_tokenizer(["a red circle", "two blue squares"], text)
        cfg = get_tokenizer_config("tiny")
        torch.manual_seed(0)
        save_tokenizer(BinaryAutoencoder(cfg), cfg, root / "ae", name="tiny")
    return text, root / "ae"
