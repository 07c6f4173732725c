"""CPU parts of cluster/gpu_check.py: the ~1B config, the synthetic packed batches, the FLOP count (against a hand
computation and the modules' own weights), the CLI (--help; a one-line error without a GPU)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster import gpu_check
from cluster.gpu_check import (
    PrefixIds,
    batch_flops,
    check_config,
    linear_params,
    mask_pairs,
    synthetic_batch,
)
from models.core.attention import dense_block_causal_mask
from models.t2i.model import TextToImageBitDance, get_t2i_config
from models.t2i.packing import T2ISample, pack_rows

ROOT = Path(__file__).resolve().parents[1]


def linear_weights(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def test_check_config_is_about_one_billion():
    cfg = check_config()
    m = cfg.llm
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads, m.head_dim) == (
        2048,
        16,
        16,
        8,
        128,
    )
    assert (cfg.parallel_num, cfg.latent_dim, cfg.head.ch_latent) == (16, 32, 1024)
    lp = linear_params(cfg)
    assert lp["backbone"] == 16 * (2 * 2048 * 2048 + 2 * 2048 * 1024 + 3 * 2048 * 6144)
    total = lp["backbone"] + 2 * lp["lm_head"] + lp["projector"] + lp["head_token"] + lp["head_patch"]
    assert 0.95e9 < total < 1.1e9
    assert check_config(quick=True).llm.num_hidden_layers == 4


def test_linear_params_match_the_reference_modules():
    cfg = get_t2i_config("tiny-16x")
    ref = TextToImageBitDance(cfg)
    net = ref.vision_head.net
    lp = linear_params(cfg)
    assert lp["backbone"] == linear_weights(ref.llm.model.layers)
    assert lp["lm_head"] == ref.llm.lm_head.weight.numel()
    assert lp["projector"] == linear_weights(ref.projector)
    assert lp["head_patch"] == linear_weights(net.time_embed)
    assert lp["head_token"] == linear_weights(net) - linear_weights(net.time_embed)


def one_sample_batch():
    """tiny-16x: 10 text ids and an 8x24 grid (12 blocks of P=16), no padding: 204 positions."""
    cfg = get_t2i_config("tiny-16x")
    sample = T2ISample(list(range(100, 110)), torch.ones(cfg.latent_dim, 8, 24))
    return cfg, pack_rows([[sample]], PrefixIds(cfg.parallel_num), cfg.parallel_num)


def test_mask_pairs_by_hand_and_against_the_dense_mask():
    _, batch = one_sample_batch()
    # 12 causal positions (text, vision_start, res_h): 12 * 13 / 2 pairs; block k (of 12) has 16 queries that see
    # the 12 causal positions and k + 1 blocks of 16
    assert mask_pairs(batch.doc_ids, batch.block_ids) == 78 + sum(16 * (12 + 16 * (k + 1)) for k in range(12))
    rows = synthetic_batch(get_t2i_config("tiny-16x"), 700, rows=3, seed=1)
    want = int(dense_block_causal_mask(rows.doc_ids, rows.block_ids).sum())
    assert mask_pairs(rows.doc_ids, rows.block_ids) == want == mask_pairs(rows.doc_ids, rows.block_ids, chunk=97)


def test_batch_flops_by_hand():
    cfg, batch = one_sample_batch()
    f = batch_flops(cfg, batch)
    assert (f["positions"], f["text"], f["image_in"], f["targets"], f["pairs"]) == (204, 9, 176, 192, 22350)
    backbone = 2 * (128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 256)  # q, k, v, o, SwiGLU; 2 layers
    lm_head, projector = 128 * 512, 16 * 128 + 128 * 128
    w, hidden = 128, 192  # head width, its SwiGLU width (1.5 w)
    head_token = 16 * w + 128 * w + 6 * w * w + 2 * (4 * w * w + 3 * w * hidden) + 2 * w * w + w * 16
    head_patch = 256 * w + w * w  # timestep MLP, once per patch of 16
    dense = 6 * (backbone * 204 + lm_head * 9 + projector * 176 + head_token * 192 + head_patch * 12)
    attention = 12 * 2 * 4 * 32 * 22350 + 12 * 2 * w * 192 * 16  # backbone pairs; head: 16 keys per target
    assert (f["dense"], f["attention"], f["total"]) == (dense, attention, dense + attention)


def test_synthetic_batch_packs_several_samples_per_row():
    cfg = check_config()
    batch = synthetic_batch(cfg, 8192, rows=1, seed=0)
    assert batch.input_ids.shape == (1, 8192) and batch.parallel_num == 16
    assert batch.num_samples >= 5
    assert batch.target_bits.shape[1] == 32 and set(batch.target_bits.unique().tolist()) == {-1.0, 1.0}
    assert (batch.block_ids.diff(dim=1) >= 0).all()
    docs = batch.doc_ids[0]
    assert (docs[docs >= 0].diff() >= 0).all() and (docs[:-1][docs[:-1] < 0] < 0).all()  # padding only at the end
    sizes = torch.unique_consecutive(batch.block_ids[0][docs >= 0], return_counts=True)[1]
    assert set(sizes.tolist()) == {1, 16}  # causal positions, then blocks of P
    assert batch.target_index.numel() == batch.image_in_index.numel() + 16 * batch.num_samples
    again = synthetic_batch(cfg, 8192, rows=1, seed=0)
    assert torch.equal(batch.input_ids, again.input_ids)


def test_help_and_no_gpu_error(capsys, monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--help"])
    assert exit_.value.code == 0 and "--out" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_check.main(["--out", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cli_without_gpu_fails_in_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "cluster.gpu_check", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in run.stderr


def test_param_counts_cover_the_megatron_model():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    sys.path.insert(0, str(ROOT / "tests"))
    from megatron_cpu import megatron_in_process

    from models.t2i.megatron.config import MegatronParallelConfig
    from models.t2i.megatron.model import MegatronT2IBitDance

    with megatron_in_process():
        par = MegatronParallelConfig(params_dtype=torch.float32, use_cpu_initialization=True)
        model = MegatronT2IBitDance(get_t2i_config("tiny-16x"), par)
        counts = gpu_check.param_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert counts["lm_head"] == counts["embedding"] == 512 * 128
