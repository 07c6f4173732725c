"""`make demo` shortened: the same stages and code path (shapes -> tokenizer -> Ray -> torchrun training ->
sampling -> scoring -> report) with a few steps, then re-runs that reuse and redo the right stages."""

import hashlib
import json

import pytest
import torch
from PIL import Image

import cluster.demo.runner as runner
from cluster.demo.__main__ import main as demo_main
from cluster.demo.config import load_demo_config
from cluster.demo.launch import Launch, plan_launch
from cluster.demo.runner import run_demo
from cluster.demo.stage import Stage
from cluster.demo.stages import STAGES, t2i_overrides, tokenizer_overrides
from training.config import grad_accumulation, load_config
from training.output_folder import made_by

SHORT = [
    "samples=64",
    "samples_per_shard=32",
    "tokenizer_steps=3",
    "t2i_steps=2",
    "prompts_per_tag=1",
    "images_per_prompt=1",
    "seeds=2",
    "ceiling_renders=1",
    "sampling.steps=2",
    "chance_samples=10",
    "grid_images=6",
]


def outputs_digest(out) -> dict:
    """What a demo produced, to compare two runs: each seed's per-image verdicts and the bytes of every sample."""
    samples = sorted(out.glob("samples/seed_*/*/samples/*.png"))
    return {
        "verdicts": [(p.parent.name, p.read_text()) for p in sorted(out.glob("samples/seed_*/shapes_results.jsonl"))],
        "images": {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in samples},
    }


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    """One short demo from scratch: its folder and the digest of what it produced (before other tests re-run it)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    report = run_demo(load_demo_config([*SHORT, f"out={out}"]))
    return out, report, outputs_digest(out)


@pytest.mark.slow
def test_two_short_demos_from_scratch_give_identical_samples_and_scores(short_demo, tmp_path):
    first_out, _, first = short_demo
    second_out = tmp_path / "again"
    run_demo(load_demo_config([*SHORT, f"out={second_out}"]))
    second = outputs_digest(second_out)
    assert first["images"] and first == second
    scores = [json.loads((o / "stages" / "score.json").read_text())["result"] for o in (first_out, second_out)]
    assert scores[0]["per_tag"] == scores[1]["per_tag"] and scores[0]["ceiling"] == scores[1]["ceiling"]


@pytest.mark.slow
def test_short_demo_runs_end_to_end_and_reuses_stages(short_demo, capsys):
    out, report, _ = short_demo
    text = report.read_text()
    for section in (
        "## Shapes benchmark",
        "| single_object |",
        "chance",
        "PSNR",
        "## Throughput",
        "tokens/s",
        "wandb offline run",
        "## Stage timings",
        "ceiling",
        "samples_grid.png",
        "loss_curve.png",
    ):
        assert section in text, section
    for png in ("samples_grid.png", "loss_curve.png", "tokenizer_curve.png"):
        assert Image.open(out / png).size[0] > 100
    markers = {s.name: json.loads((out / "stages" / f"{s.name}.json").read_text()) for s in STAGES}
    score = markers["score"]["result"]
    assert score["images"] == 12 and len(score["per_seed"]) == 2  # 6 prompts x 1 image x 2 seeds
    assert set(score["per_tag"]) == set(score["chance"]["per_tag"]) == set(score["ceiling"]["per_tag"])
    tokenized = markers["tokenize"]["result"]
    assert tokenized["samples"] + tokenized["val_samples"] == 64 and tokenized["val_samples"] >= 1  # 5% held out
    rows = [json.loads(line) for line in (out / "t2i" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/loss" in r] == [0, 2]  # before training and at the last step
    assert [w["step"] for w in markers["train"]["result"]["watch"]] == [2]  # the watcher scored the checkpoint
    assert "Checkpoint watcher" in text and "held-out validation loss" in text
    assert rows[-1]["step"] == 2
    assert list((out / "t2i" / "wandb").glob("offline-run-*")), "the training run logs to wandb offline"
    capsys.readouterr()

    run_demo(load_demo_config([*SHORT, f"out={out}"]))  # nothing changed: every stage is reused
    printed = capsys.readouterr().out
    assert all(f"== {s.name}: reused" in printed for s in STAGES), printed

    run_demo(load_demo_config([*SHORT, f"out={out}", "t2i_steps=3"]))  # longer training: resume, resample
    printed = capsys.readouterr().out
    assert all(f"== {s}: reused" in printed for s in ("data", "tokenizer", "text", "tokenize")), printed
    assert "resumed from" in printed and "== train: done" in printed and "== score: done" in printed
    rows = [json.loads(line) for line in (out / "t2i" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3
    assert [r["step"] for r in rows if "watch/score" in r] == [2, 3]  # the resumed watcher: the new one only

    # the optional distillation: the base stages are reused, the student starts from the teacher and is compared
    report = run_demo(load_demo_config([*SHORT, f"out={out}", "t2i_steps=3", "distill=true", "distill_steps=2"]))
    printed = capsys.readouterr().out
    assert all(f"== {s.name}: reused" in printed for s in STAGES), printed
    text = report.read_text()
    assert "## Distillation" in text and "| student | 16 | 16 |" in text and "| teacher | 4 | 64 |" in text
    ev = json.loads((out / "stages" / "distill_eval.json").read_text())["result"]
    student = ev["rows"]["student"]
    assert student["s_per_image"] > 0 and student["s_per_image_batched"] > 0 and ev["speed_images"] == 32
    assert ev["batches"] == {"latency": 1, "throughput": 16} and ev["speedup"] > 0 and ev["speedup_batched"] > 0
    assert json.loads((out / "distill" / "export" / "vision_head_config.json").read_text())["parallel_num"] == 16


def test_bad_demo_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="known keys"):
        load_demo_config(["t2i_stepz=3"])
    with pytest.raises(ValueError, match="does not exist"):
        load_demo_config([f"t2i_config={tmp_path / 'missing.yaml'}"])
    with pytest.raises(ValueError, match=">= 1"):
        load_demo_config(["nproc=0"])


def test_a_foreign_non_empty_out_is_refused_in_one_line_before_any_stage(tmp_path, monkeypatch, capsys):
    def no_stage(cfg, out):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(runner, "STAGES", (Stage("data", "must not run", lambda c: {}, (), no_stage),))
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as err:
        demo_main([f"out={out}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"python -m cluster.demo: error: out {out} is not empty") and "--overwrite" in lines[0]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_overwrite_runs_every_stage_afresh_in_a_foreign_folder_which_then_resumes(tmp_path, monkeypatch):
    """Stage records found in a folder the demo did not make are not reused; once taken over, it is the demo's."""
    ran = []
    stage = Stage("fake", "a stage", lambda c: {}, (), lambda cfg, out: ran.append(out) or {}, owns=("fake",))
    monkeypatch.setattr(runner, "STAGES", (stage,))
    monkeypatch.setattr(runner, "write_demo_report", lambda cfg, out, done: out / "report.md")
    out = tmp_path / "theirs"
    cfg = load_demo_config([f"out={out}"])
    (out / "stages").mkdir(parents=True)
    forged = {"fingerprint": runner.fingerprint(stage, cfg, {}), "seconds": 0.0, "result": {}}
    (out / "stages" / "fake.json").write_text(json.dumps(forged))
    (out / "stages" / "theirs.txt").write_text("keep me")
    (out / "fake").mkdir()
    (out / "fake" / "old.txt").write_text("stale")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="pass --overwrite"):
        run_demo(cfg)
    assert ran == [] and made_by(out) is None
    run_demo(cfg, overwrite=True)
    assert ran == [out] and not (out / "fake" / "old.txt").exists() and (out / "notes.txt").read_text() == "keep me"
    assert made_by(out) == "cluster.demo" and (out / "stages" / "theirs.txt").is_file()
    run_demo(cfg)  # its own folder now: the stage is reused
    assert ran == [out]


@pytest.mark.parametrize("gpus", [1, 8])
def test_one_process_per_gpu_each_training_in_bf16_under_zero1(monkeypatch, tmp_path, gpus):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    cfg = load_demo_config([f"out={tmp_path}"])
    assert plan_launch() == Launch(gpus, "nccl") and cfg.nproc == gpus
    for config, overrides in (
        (cfg.tokenizer_config, tokenizer_overrides(cfg, tmp_path)),
        (cfg.t2i_config, t2i_overrides(cfg, tmp_path)),
    ):
        train = load_config(config, overrides)
        assert (train.engine.precision, train.engine.zero_stage) == ("bf16", 1)
        assert grad_accumulation(train, gpus) >= 1  # the global batch divides over the processes
    with pytest.raises(ValueError, match=f"has {gpus} GPU"):
        load_demo_config([f"nproc={gpus + 1}"])


def test_without_a_gpu_two_cpu_processes_train_the_yamls_as_written(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_demo_config([f"out={tmp_path}"])
    assert plan_launch() == Launch(2, "gloo") and cfg.nproc == 2
    for config, overrides in (
        (cfg.tokenizer_config, tokenizer_overrides(cfg, tmp_path)),
        (cfg.t2i_config, t2i_overrides(cfg, tmp_path)),
    ):
        assert not any(o.startswith(("engine.", "data.global_batch")) for o in overrides)
        train = load_config(config, overrides)
        assert (train.engine.precision, train.engine.zero_stage) == ("fp32", 0)


def test_finetune_holds_the_concept_out_of_the_base_data_and_adds_its_stages(tmp_path, monkeypatch):
    """finetune=true: the base T2I data has no object of the concept's colour (the image tokenizer's has every scene),
    the concept data has the concept in every scene, the fine-tuning runs are valid training configs, and the stages
    run after the base ones (stand-ins here)."""
    import tarfile
    from pathlib import Path

    import cluster.demo.finetune as finetune
    import cluster.demo.stages as stages
    from cluster.demo.report import finetune_section
    from data_pipeline.shapes import main as shapes_main

    cfg = load_demo_config([f"out={tmp_path}", "finetune=true", "samples=40", "finetune_samples=8"])
    commands = []
    monkeypatch.setattr(stages, "sh", lambda cmd, log: commands.append(cmd))
    monkeypatch.setattr(finetune, "sh", lambda cmd, log: commands.append(cmd))
    assert stages.run_data(cfg, tmp_path)["held_out"] == "purple"
    finetune.run_ft_data(cfg, tmp_path)
    assert [c[c.index("--out") + 1] for c in commands] == [
        str(tmp_path / "data" / d) for d in ("raw", "raw_t2i", "ft_raw")
    ]
    assert tokenizer_overrides(cfg, tmp_path)[1] == f"data.data_dir={tmp_path / 'data' / 'raw'}"  # it learns purple
    commands.pop(0)  # every scene, for the image tokenizer
    for cmd, wanted in zip(commands, (False, True), strict=True):
        shapes_main(cmd[3:])  # python -m data_pipeline.shapes <args>
        scenes = []
        for shard in sorted(Path(cmd[cmd.index("--out") + 1]).glob("*.tar")):
            with tarfile.open(shard) as tar:
                scenes += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
        has = [any((o["color"], o["shape"]) == ("purple", "circle") for o in s["objects"]) for s in scenes]
        purple = [any(o["color"] == "purple" for o in s["objects"]) for s in scenes]
        assert len(scenes) == int(cmd[cmd.index("--num-samples") + 1]) and set(has) == set(purple) == {wanted}
    assert "held_out" not in STAGES[0].settings(load_demo_config([])), "default base fingerprints must not change"
    for method in ("lora", "full"):
        extra = finetune.finetune_overrides(cfg, tmp_path, method)
        train = load_config(cfg.t2i_config, t2i_overrides(cfg, tmp_path, f"ft_{method}", 5, finetune.TOKENS, extra))
        assert train.finetune.method == method and [s.weight for s in train.data.sources] == [0.5, 0.5]
        assert train.model.init_from == str(tmp_path / "t2i" / "export")
    specs = finetune.concept_prompts(cfg)
    assert len(specs) == cfg.finetune_concept_prompts and all("purple circle" in p["prompt"] for p in specs)

    ran = []

    def stand_in(s: Stage) -> Stage:
        return Stage(s.name, s.what, s.settings, s.upstream, lambda c, o: ran.append(s.name) or {})

    monkeypatch.setattr(runner, "STAGES", tuple(stand_in(s) for s in STAGES[:1]))
    monkeypatch.setattr(runner, "FINETUNE_STAGES", tuple(stand_in(s) for s in finetune.STAGES if not s.upstream))
    monkeypatch.setattr(runner, "write_demo_report", lambda cfg, out, done: out / "report.md")
    run_demo(load_demo_config([f"out={tmp_path / 'a'}"]))
    run_demo(load_demo_config([f"out={tmp_path / 'b'}", "finetune=true"]))
    assert ran == ["data", "data", "ft_data"]

    row = {"concept": {"score": 0.2, "sd": 0.0, "prompts": 12}, "per_tag": {"colors": 0.5, "counting": 0.4}}
    ev = {
        "concept": "purple circle",
        "held_out": "purple",
        "concept_chance": 0.04,
        "rows": dict.fromkeys(finetune.MODELS, row),
    }
    done = {
        s: {"seconds": 10.0, "result": {"trainable_params": 100}} for s in ("train", *[s.name for s in finetune.STAGES])
    }
    text = "\n".join(finetune_section(cfg, ev, done))
    assert "| LoRA r=16 |" in text and "not met" in text and "50 s" in text


def test_finetune_eval_scores_the_concept_per_seed_and_the_other_tags_without_the_held_out_colour(tmp_path):
    """ft_eval's bookkeeping on rendered truth: a folder of correct renders of the eval prompts scores 1 everywhere;
    prompts naming purple (never in the base data) are not 'other tags'; a model that never draws the concept scores
    0 on it with the other tags unchanged."""
    import numpy as np

    import cluster.demo.finetune as finetune
    from eval.shapes_bench import render_prompt

    cfg = load_demo_config([f"out={tmp_path}", "finetune=true", "seeds=2", "prompts_per_tag=3"])
    specs = finetune.eval_prompts(cfg)
    assert {p["seed"] for p in specs} == {0, 1} and sum(p["set"] == "concept" for p in specs) == 2 * 12
    rng = np.random.default_rng(0)
    for i, spec in enumerate(specs):
        (tmp_path / f"{i:05d}" / "samples").mkdir(parents=True)
        (tmp_path / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(spec) + "\n")
        render_prompt(spec, rng, 32).save(tmp_path / f"{i:05d}" / "samples" / "0000.png")
    rows = finetune.scored(tmp_path)
    assert len(rows) == len(specs)
    summary = finetune.summarize(cfg, rows)
    assert summary["concept"]["per_seed"] == [1.0, 1.0] and set(summary["per_tag"].values()) == {1.0}
    named = [s for s, _ in rows if s["set"] == "benchmark" and "purple" in s["prompt"]]
    assert named and all(finetune.names_held_out(cfg, s) for s in named)
    blind = finetune.summarize(cfg, [(s, ok and s["set"] == "benchmark") for s, ok in rows])
    assert blind["concept"]["score"] == 0.0 and blind["per_tag"] == summary["per_tag"]
