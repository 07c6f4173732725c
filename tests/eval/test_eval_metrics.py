"""ADM npz writer, FID / Inception Score with stand-in networks, scorer adapters' checks and the summary files."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from eval import scorers
from eval.imagenet_metrics import (
    NpzWriter,
    compute_metrics,
    extract,
    fid_from_stats,
    inception_score,
    iter_images,
    trace_sqrt_product,
)
from eval.scorers import MissingScorerError, run_dpg_scorer, run_geneval_scorer, write_summary


class TinyFeatures(nn.Module):
    """A fixed random conv net + global pooling: 16-d features; logits from a fixed linear layer (K classes)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 5, stride=2)
        self.fc = nn.Linear(16, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        h = torch.relu(self.conv(x.float() / 127.5 - 1))
        feats = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return feats, self.fc(feats)


def images(n: int, seed: int, size: int = 32, bright: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (n, 1, 1, 3)) * (1 - bright) + 255 * bright
    noise = rng.normal(0, 40, (n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_npz(path: Path, arr: np.ndarray, chunk: int = 7) -> Path:
    w = NpzWriter(path, len(arr), arr.shape[1], arr.shape[2])
    for s in range(0, len(arr), chunk):
        w.add(arr[s : s + chunk], s)
    return w.close()


# ---------------------------------------------------------------- NpzWriter


def test_npz_writer_chunked_adm_layout(tmp_path):
    arr = images(5, 0, size=256)
    path = tmp_path / "out" / "samples.npz"
    w = NpzWriter(path, 5)
    w.add(arr[3:], 3)  # out of order chunks
    w.add(arr[:3], 0)
    assert not path.exists()  # nothing final before close
    assert w.close() == path
    with np.load(path) as z:
        assert z.files == ["arr_0"]
        got = z["arr_0"]
    assert got.dtype == np.uint8 and got.shape == (5, 256, 256, 3)
    np.testing.assert_array_equal(got, arr)
    assert sorted(p.name for p in path.parent.iterdir()) == ["samples.npz"]  # temp files gone
    np.testing.assert_array_equal(np.concatenate(list(iter_images(path, batch_size=2))), arr)  # streamed reader


def test_npz_writer_errors(tmp_path):
    path = tmp_path / "s.npz"
    w = NpzWriter(path, 4, 8, 8)
    with pytest.raises(TypeError, match="uint8"):
        w.add(np.zeros((1, 8, 8, 3), np.float32), 0)
    with pytest.raises(ValueError, match=r"\[B, 8, 8, 3\]"):
        w.add(np.zeros((1, 8, 9, 3), np.uint8), 0)
    with pytest.raises(ValueError, match=r"\[B, 8, 8, 3\]"):
        w.add(np.zeros((8, 8, 3), np.uint8), 0)
    with pytest.raises(IndexError, match="outside 0..3"):
        w.add(np.zeros((2, 8, 8, 3), np.uint8), 3)
    with pytest.raises(IndexError):
        w.add(np.zeros((1, 8, 8, 3), np.uint8), -1)
    w.add(np.zeros((3, 8, 8, 3), np.uint8), 0)
    with pytest.raises(RuntimeError, match="1 of 4 images never written.*3"):
        w.close()
    assert not path.exists()
    w.add(np.ones((1, 8, 8, 3), np.uint8), 3)
    w.close()
    with pytest.raises(RuntimeError, match="already closed"):
        w.add(np.zeros((1, 8, 8, 3), np.uint8), 0)
    with pytest.raises(ValueError):
        NpzWriter(tmp_path / "bad.npz", 0)
    with pytest.raises(KeyError):  # an exception inside the context aborts: no file, no temp
        with NpzWriter(tmp_path / "aborted.npz", 2, 8, 8) as w2:
            w2.add(np.zeros((1, 8, 8, 3), np.uint8), 0)
            raise KeyError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


# ---------------------------------------------------------------- FID / IS


def test_fid_from_stats_hand_case():
    m1, s1, m2, s2 = 1.0, 4.0, 3.0, 9.0
    expected = (m1 - m2) ** 2 + s1 + s2 - 2 * np.sqrt(s1 * s2)  # 4 + 13 - 12 = 5
    assert fid_from_stats([m1], [[s1]], [m2], [[s2]]) == pytest.approx(expected, abs=1e-9)
    # diagonal 2-d case: per-axis sums
    assert fid_from_stats([0, 0], np.diag([1.0, 4.0]), [1, 2], np.diag([4.0, 1.0])) == pytest.approx(5 + 1 + 1)
    with pytest.raises(ValueError, match="mismatched"):
        fid_from_stats([0, 0], np.eye(2), [0], np.eye(1))


def test_trace_sqrt_methods_agree():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 12)), rng.normal(size=(50, 12)) * 2
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert trace_sqrt_product(s1, s2, "eigh") == pytest.approx(trace_sqrt_product(s1, s2, "scipy"), rel=1e-8)


def test_fid_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # import fails: the eigendecomposition route is used
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)
    assert fid_from_stats([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(5.0, abs=1e-9)
    rng = np.random.default_rng(1)
    s = np.cov(rng.normal(size=(40, 10)), rowvar=False)
    assert abs(fid_from_stats(np.zeros(10), s, np.zeros(10), s)) < 1e-9


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    net = TinyFeatures()
    a = write_npz(d / "a.npz", images(96, 1))
    b = write_npz(d / "b.npz", images(96, 2, bright=0.6))
    stats, _ = extract(a, net, batch_size=32)
    ref = d / "ref_a.npz"
    np.savez(ref, mu=stats.mean, sigma=stats.sigma)
    return net, a, b, ref


def test_fid_self_zero_and_other_positive(sets, tmp_path):
    net, a, b, ref = sets
    same = compute_metrics(a, str(ref), None, feature_extractor=net, batch_size=20)
    assert same["images"] == 96 and abs(same["fid"]) < 1e-3
    assert abs(compute_metrics(a, str(a), None, feature_extractor=net)["fid"]) < 1e-3  # ADM batch: arr_0 images
    other = compute_metrics(b, str(ref), None, feature_extractor=net)
    assert other["fid"] > 0.1
    # the folder path gives the same numbers as the npz
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(np.load(b)["arr_0"]):
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    assert compute_metrics(folder, str(ref), None, feature_extractor=net)["fid"] == pytest.approx(other["fid"])
    # streamed statistics equal numpy's on all features at once
    with torch.no_grad():
        feats = net(torch.from_numpy(np.load(a)["arr_0"]).permute(0, 3, 1, 2))[0].double().numpy()
    stats, _ = extract(a, net, batch_size=13)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), atol=1e-10)
    with pytest.raises(ValueError, match="16-d statistics"):
        compute_metrics(a, str(ref), None, feature_extractor=lambda x: x.float().mean((2, 3)))


def test_inception_score_constant_and_uniform(tmp_path):
    k, n = 4, 40
    arr = np.zeros((n, 8, 8, 3), np.uint8)
    arr[..., 0] = (np.arange(n) % k)[:, None, None]  # each image's class in its red channel
    path = write_npz(tmp_path / "cls.npz", arr)

    def constant(x):
        return x.float().mean((2, 3)), torch.tensor([[2.0, -1.0, 0.5, 0.0]]).expand(len(x), k)

    def one_hot(x):
        return x.float().mean((2, 3)), 30.0 * nn.functional.one_hot(x[:, 0, 0, 0].long(), k).float()

    assert compute_metrics(path, None, None, feature_extractor=constant)["inception_score"] == pytest.approx(1.0)
    exact = compute_metrics(path, None, None, feature_extractor=one_hot, is_splits=1)
    assert "fid" not in exact and exact["inception_score"] == pytest.approx(k, rel=1e-6)
    shuffled = compute_metrics(path, None, None, feature_extractor=one_hot)  # 10 shuffled splits of 4 images
    assert 2.0 < shuffled["inception_score"] <= k + 1e-6
    assert "inception_score" not in compute_metrics(
        path, None, None, feature_extractor=lambda x: x.float().mean((2, 3))
    )


def test_matches_torch_fidelity_formulas():
    try:
        from torch_fidelity.metric_fid import fid_statistics_to_metric
        from torch_fidelity.metric_isc import isc_features_to_metric
    except ImportError as e:
        pytest.skip(f"torch-fidelity not importable: {e}")
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(200, 7)) * 3)
    ref = isc_features_to_metric(logits)
    assert inception_score(logits.numpy()) == pytest.approx((ref["inception_score_mean"], ref["inception_score_std"]))
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 0.3
    s1 = {"mu": a.mean(0), "sigma": np.cov(a, rowvar=False)}
    s2 = {"mu": b.mean(0), "sigma": np.cov(b, rowvar=False)}
    expected = fid_statistics_to_metric(s1, s2, False)["frechet_inception_distance"]
    assert fid_from_stats(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"]) == pytest.approx(expected, rel=1e-6)


def test_inception_weights_missing(sets, tmp_path):
    _, a, _, ref = sets
    with pytest.raises(
        MissingScorerError, match=r"needs Inception weights: pass --inception-weights .*nothing is downl"
    ):
        compute_metrics(a, str(ref), None)
    with pytest.raises(MissingScorerError, match="Inception weights not found at .*nope.pth"):
        compute_metrics(a, str(ref), str(tmp_path / "nope.pth"))
    assert issubclass(MissingScorerError, RuntimeError)


# ---------------------------------------------------------------- scorer adapters


def fake_geneval(root: Path) -> Path:
    ev = root / "evaluation"
    ev.mkdir(parents=True)
    (ev / "object_names.txt").write_text("person\ndog\n")
    (ev / "evaluate_images.py").write_text(
        textwrap.dedent("""
        import argparse, json, os
        p = argparse.ArgumentParser()
        p.add_argument("imagedir"); p.add_argument("--outfile"); p.add_argument("--model-config")
        p.add_argument("--model-path"); p.add_argument("--options", nargs="*", default=[])
        a = p.parse_args()
        assert os.path.isfile(os.path.join(a.model_path, a.options[0].split("=")[1] + ".pth")), a
        assert os.path.isfile(a.model_config)
        rows = [("single_object", True), ("single_object", True), ("counting", False), ("counting", True)]
        with open(a.outfile, "w") as f:
            for tag, ok in rows:
                f.write(json.dumps({"filename": "x.png", "tag": tag, "correct": ok}) + "\\n")
    """)
    )
    (ev / "summary_scores.py").write_text(
        textwrap.dedent("""
        open("object_names.txt").read()  # the official script reads it from the working directory
        print("Summary\\n=======\\nTask breakdown\\n==============")
        print("single_object    = 100.00% (2 / 2)\\ncounting         = 50.00% (1 / 2)\\n")
        print("Overall score (avg. over tasks): 0.75000")
    """)
    )
    return root


def test_geneval_adapter_checks(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MissingScorerError, match="GenEval needs its official scorer: clone .* --geneval-repo"):
        run_geneval_scorer(out, None, None)
    with pytest.raises(MissingScorerError, match="evaluate_images.py not found"):
        run_geneval_scorer(out, str(tmp_path / "missing"), None)
    repo = fake_geneval(tmp_path / "geneval")
    with pytest.raises(MissingScorerError, match="needs the Mask2Former detector weights: .*--detector-weights"):
        run_geneval_scorer(out, str(repo), None)
    with pytest.raises(MissingScorerError, match="detector weights not found at .*mask2former_swin-s"):
        run_geneval_scorer(out, str(repo), str(tmp_path))  # a folder without the checkpoint
    weights = tmp_path / "w" / f"{scorers.GENEVAL_DETECTOR}.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    monkeypatch.setattr(scorers, "_cuda_available", lambda: False)
    with pytest.raises(MissingScorerError, match="asserts CUDA"):
        run_geneval_scorer(out, str(repo), str(weights))
    monkeypatch.setattr(scorers, "_cuda_available", lambda: True)
    with pytest.raises(MissingScorerError, match="cannot import .*no_such_scorer_pkg"):
        monkeypatch.setattr(scorers, "GENEVAL_MODULES", ("json", "no_such_scorer_pkg"))
        run_geneval_scorer(out, str(repo), str(weights))


def test_geneval_adapter_runs_official_scripts(tmp_path, monkeypatch):
    repo = fake_geneval(tmp_path / "geneval")
    config = tmp_path / "m2f.py"
    config.write_text("")
    weights = tmp_path / f"{scorers.GENEVAL_DETECTOR}.pth"
    weights.write_bytes(b"")
    monkeypatch.setattr(scorers, "_cuda_available", lambda: True)
    monkeypatch.setattr(scorers, "GENEVAL_MODULES", ("json",))
    out = tmp_path / "out"
    out.mkdir()
    result = run_geneval_scorer(out, str(repo), str(tmp_path), sys.executable, detector_config=str(config))
    assert result == {"per_tag": {"single_object": 1.0, "counting": 0.5}, "overall": 0.75, "images": 4}
    assert (out / "geneval_results.jsonl").is_file() and "Overall" in (out / "geneval_summary.txt").read_text()


def fake_dpg(root: Path, pkgs: Path) -> Path:
    (root / "dpg_bench").mkdir(parents=True)
    (root / "dpg_bench" / "dpg_bench.csv").write_text("item_id\n")
    (root / "dpg_bench" / "compute_dpg_bench.py").write_text(
        textwrap.dedent("""
        import argparse, os
        from modelscope.pipelines import pipeline
        p = argparse.ArgumentParser()
        for k in ("--image-root-path", "--resolution", "--csv", "--res-path", "--pic-num", "--vqa-model"):
            p.add_argument(k)
        a = p.parse_args()
        assert a.resolution == "16" and a.pic_num == "4" and os.path.isfile(a.csv), a
        model = pipeline("vqa", model="damo/mplug_visual-question-answering_coco_large_en")
        assert os.path.isfile(os.path.join(model, "configuration.json")), model
        print("Failed filename: summary.json not an image")
        print("Failed filename: 7.png broken")
        print("Model: out\\nL1 category scores:\\n\\tentity: 80.0\\n\\tglobal: 90.5\\nL2 category scores:")
        print("\\tentity - whole: 80.0\\nImage path: x\\nSave results to: y\\nDPG-Bench score: 81.25")
    """)
    )
    (pkgs / "modelscope").mkdir(parents=True)
    (pkgs / "modelscope" / "__init__.py").write_text("")
    (pkgs / "modelscope" / "pipelines.py").write_text(
        "def pipeline(task, model=None, device=None):\n    return model\n"
    )
    return root


def test_dpg_adapter(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (32, 32)).save(out / "1.png")
    with pytest.raises(MissingScorerError, match="DPG-Bench needs its official scorer .*--dpg-repo"):
        run_dpg_scorer(out, None, None)
    with pytest.raises(MissingScorerError, match="no dpg_bench/compute_dpg_bench.py in"):
        run_dpg_scorer(out, str(tmp_path), None)
    repo = fake_dpg(tmp_path / "ELLA", tmp_path / "pkgs")
    with pytest.raises(MissingScorerError, match="needs the mPLUG VQA model: .*--mplug-weights"):
        run_dpg_scorer(out, str(repo), None)
    mplug = tmp_path / "mplug"
    mplug.mkdir()
    with pytest.raises(MissingScorerError, match="configuration.json not found"):
        run_dpg_scorer(out, str(repo), str(mplug))
    (mplug / "configuration.json").write_text("{}")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "pkgs"))
    monkeypatch.setattr(scorers, "DPG_MODULES", ("modelscope",))
    result = run_dpg_scorer(out, str(repo), str(mplug))
    assert result == {"score": 81.25, "per_category": {"entity": 80.0, "global": 90.5}, "failed_images": 1}


def test_write_summary_merges(tmp_path):
    write_summary(tmp_path, "geneval", {"per_tag": {"counting": 0.5}, "overall": 0.75})
    write_summary(tmp_path, "imagenet", {"images": 10, "fid": 3.21})
    write_summary(tmp_path, "geneval", {"per_tag": {"counting": 0.6}, "overall": 0.8})  # replaces its own entry
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {
        "geneval": {"per_tag": {"counting": 0.6}, "overall": 0.8},
        "imagenet": {"images": 10, "fid": 3.21},
    }
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0] == "| benchmark | metric | value |"
    assert "| geneval | per_tag.counting | 0.6000 |" in md and "| imagenet | fid | 3.2100 |" in md
    assert "| imagenet | images | 10 |" in md and len(md) == 2 + 4
