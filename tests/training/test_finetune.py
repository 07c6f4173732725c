"""Fine-tuning a released / exported text-to-image folder (`finetune.method=lora|head`, training/finetune.py) through
the DeepSpeed engine: what trains, PEFT-format adapters, trainable-only checkpoints that resume exactly after a
SIGKILL and refuse another base, ZeRO's CPU offload, and the megatron engine's refusal.

The base is a seeded tiny-4x model exported as an official folder (the layout of a release or of a run's export). The
multi-process runs are marked slow."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.data import make_t2i_data
from helpers.train_runs import launch, losses
from torch import nn

from models.core.diffusion_head import fixed_draws
from models.t2i.io import export_t2i_folder, load_t2i_folder
from models.t2i.model import TextToImageBitDance, get_t2i_config
from models.t2i.text_tokenizer import T2ITextTokenizer
from models.tokenizer.io import load_tokenizer
from training.config import load_config
from training.finetune import build_method, plain_name
from training.tasks import build_task

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Tokenized test data and a seeded tiny-4x model exported as an official folder (the fine-tuning base)."""
    root = tmp_path_factory.mktemp("finetune")
    data = make_t2i_data(root / "data")
    torch.manual_seed(1)
    model = TextToImageBitDance(get_t2i_config("tiny-4x", image_sizes=((32, 32), (32, 64))))
    text = T2ITextTokenizer.from_folder(data["text"], 4)
    model.resize_vocab(max(model.cfg.llm.vocab_size, len(text)))
    export_t2i_folder(model, text, load_tokenizer(data["ae"]), root / "base")
    return {**data, "base": root / "base"}


def overrides(base, *extra) -> list[str]:
    return [
        f"data.data_dir={base['tokens']}",
        f"model.init_from={base['base']}",
        f"model.text_tokenizer={base['text']}",
        f"model.image_tokenizer={base['ae']}",
        "data.token_budget=1024",
        "schedule.warmup_steps=0",
        "logging.every=1",
        "logging.wandb=disabled",
        *extra,
    ]


def built(base, *extra):
    """(config, task) with the fine-tuning method applied to the task's model, in this process."""
    cfg = load_config(REPO / "training" / "configs" / "tiny_t2i.yaml", overrides(base, *extra))
    task = build_task(cfg, torch.device("cpu"))
    build_method(cfg).apply(task)
    return cfg, task


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---- what trains ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", [False, True])
def test_lora_trains_exactly_rank_r_adapters_of_the_targeted_linears(base, head):
    cfg, task = built(base, "finetune.method=lora", "finetune.lora.rank=8", f"finetune.lora.head={head}")
    plain = TextToImageBitDance(task.model.cfg)
    targeted = {
        n: m
        for n, m in plain.named_modules()
        if isinstance(m, nn.Linear)
        and ((n.startswith("llm.model.layers.") and n.rsplit(".", 1)[1] in TARGETS) or (head and "vision_head." in n))
    }
    assert len(targeted) == 2 * 7 + (15 if head else 0)  # tiny: 2 decoder layers x 7 linears (+ the head's 15)
    params = trainable(task.model)
    assert set(params) == {f"{n}.lora_{ab}.default.weight" for n in targeted for ab in "AB"}
    for n, m in targeted.items():
        assert params[f"{n}.lora_A.default.weight"].shape == (8, m.in_features)
        assert params[f"{n}.lora_B.default.weight"].shape == (m.out_features, 8)
    count, total = sum(p.numel() for p in params.values()), sum(p.numel() for p in task.model.parameters())
    assert count == sum(8 * (m.in_features + m.out_features) for m in targeted.values())
    assert total == count + sum(p.numel() for p in plain.parameters())
    assert build_method(cfg).describe(task.model).endswith(f"({100 * count / total:.3f}%)")
    frozen = {p.dtype for p in task.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and {p.dtype for p in params.values()} == {torch.float32}


def test_head_only_trains_the_head_the_projector_and_the_query_rows(base):
    cfg, task = built(base, "finetune.method=head")
    model = task.model
    params = trainable(model)
    parts = {n for n, _ in model.named_parameters() if n.startswith(("vision_head.", "projector."))}
    assert set(params) == parts | {"llm.model.embed_tokens.rows"}
    queries = task.manifest["text_tokens"]["query_ids"]
    assert len(queries) == 3 and params["llm.model.embed_tokens.rows"].shape == (3, 128)  # P - 1 rows of width D
    expected = sum(p.numel() for n, p in model.named_parameters() if n in parts) + 3 * 128
    assert sum(p.numel() for p in params.values()) == expected
    # the state dict keeps the official layout, with the trained rows folded into the embedding
    with torch.no_grad():
        params["llm.model.embed_tokens.rows"].add_(1.0)
    state = model.llm.state_dict()
    assert "model.embed_tokens.rows" not in state
    rows = params["llm.model.embed_tokens.rows"].to(torch.bfloat16)  # the frozen embedding's dtype (base_dtype)
    assert torch.equal(state["model.embed_tokens.weight"][queries], rows)


# ---- config checks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["engine.kind=megatron", "finetune.method=lora"],
            "finetune.method=lora runs on engine.kind=deepspeed; megatron trains the whole model",
        ),
        (["engine.kind=megatron", "finetune.method=head"], "finetune.method=head runs on engine.kind=deepspeed"),
        (["engine.zero_stage=2", "engine.offload=params"], "engine.offload=params needs engine.zero_stage=3"),
        (["engine.offload=optimizer"], "engine.offload=optimizer moves ZeRO's state to the CPU: set engine.zero_stage"),
        (["engine.offload=disk"], "engine.offload must be none, optimizer, params"),
        (["finetune.method=lora", "model.init_from=null"], "finetune.method=lora adapts a trained model"),
        (["finetune.method=adapters"], "unknown finetune.method 'adapters'; choose one of full, lora, head"),
        (["finetune.method=lora", "finetune.lora.rank=0"], "finetune.lora.rank must be >= 1"),
    ],
)
def test_a_setting_the_engine_cannot_train_is_refused_in_one_line(base, extra, message):
    with pytest.raises(ValueError) as err:
        load_config(REPO / "training" / "configs" / "tiny_t2i.yaml", overrides(base, *extra))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_resume_from_another_base_or_method_is_refused_in_one_line(base, tmp_path):
    cfg, _ = built(base, "finetune.method=lora")
    method = build_method(cfg)
    trainer = {"finetune": method.base_reference()}
    method.check_resume(tmp_path, trainer)  # the same base: fine
    other = tmp_path / "other_base"
    shutil.copytree(base["base"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    moved, _ = built(base, "finetune.method=lora", f"model.init_from={other}")
    with pytest.raises(ValueError, match="adapts the base .* but model.init_from=.* has fingerprint") as err:
        build_method(moved).check_resume(tmp_path, trainer)
    assert "\n" not in str(err.value)
    head, _ = built(base, "finetune.method=head")
    with pytest.raises(ValueError, match="written by finetune.method=lora, this run has finetune.method=head"):
        build_method(head).check_resume(tmp_path, trainer)
    ranked, _ = built(base, "finetune.method=lora", "finetune.lora.rank=4")
    with pytest.raises(ValueError, match="trained with finetune rank=16, this run has 4"):
        build_method(ranked).check_resume(tmp_path, trainer)


# ---- runs ----------------------------------------------------------------------------------------------------------


def run(run_dir, base, *extra, nproc=2, env=None, check=True):
    config = REPO / "training" / "configs" / "tiny_t2i.yaml"
    return launch(
        ["--config", str(config), f"run_dir={run_dir}", *overrides(base, *extra)], nproc, env=env, check=check
    )


def killed_and_resumed(root: Path, base, common: list[str]) -> tuple[Path, str]:
    """Two ranks: an uninterrupted run of 6 steps and one SIGKILLed after step 4 (its last checkpoint: step 3), then
    resumed; asserts their losses are bit-identical. Returns the uninterrupted run's folder and its output."""
    full = run(root / "full", base, *common)
    killed = run(root / "cut", base, *common, env={"BITDANCE_FAULT_KILL": "step:4"}, check=False)
    assert killed.returncode != 0
    assert (root / "cut" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    resumed = run(root / "cut", base, *common)
    assert "resumed from" in resumed.stdout + resumed.stderr
    whole, cut = losses(root / "full"), losses(root / "cut")
    assert sorted(whole) == sorted(cut) == list(range(1, 7))
    assert [cut[s] for s in range(1, 7)] == [whole[s] for s in range(1, 7)]
    return root / "full", full.stdout + full.stderr


# LoRA (rank 4, the default bf16 base) under ZeRO-3 with parameters and optimizer state offloaded to the CPU
LORA = [
    "finetune.method=lora",
    "finetune.lora.rank=4",
    "engine.zero_stage=3",
    "engine.offload=params",
    "schedule.total_steps=6",
    "checkpoint.every=3",
]


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    return killed_and_resumed(tmp_path_factory.mktemp("lora"), base, LORA)


@pytest.mark.slow
def test_lora_resumes_exactly_after_sigkill_from_the_trainable_state_alone(lora_run):
    full, output = lora_run
    assert "finetune.method=lora: 16,384 trainable parameters of 965,648 (1.697%)" in output
    assert "engine.offload=params: ZeRO-3 with offload_optimizer and offload_param to the CPU" in output
    ckpt = full / "checkpoints" / "step_00000006"
    assert sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()) == [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/base.json",  # the base's fingerprint: merge and eval.generate --lora check it
        "manifest.json",
        "rank_00000.pt",
        "rank_00001.pt",
        "trainer.json",
    ]
    tuned = json.loads((ckpt / "trainer.json").read_text())["finetune"]
    assert tuned["method"] == "lora" and tuned["rank"] == 4 and tuned["init_from"].endswith("base")
    assert len(tuned["fingerprint"]) == 64


@pytest.mark.slow
def test_offloading_changes_no_loss(base, lora_run, tmp_path):
    run(tmp_path / "on_gpu_memory", base, *LORA, "engine.offload=none", "checkpoint.every=0")
    assert losses(tmp_path / "on_gpu_memory") == losses(lora_run[0])


@pytest.mark.slow
def test_the_exported_adapter_loads_with_peft_and_gives_the_runs_outputs(base, lora_run, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from training.engines.export import ema_weights

    full, _ = lora_run
    adapter, ckpt = full / "export" / "adapter", full / "checkpoints" / "step_00000006"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(saved) == 2 * 2 * 7 and all(k.startswith("base_model.model.llm.model.layers.") for k in saved)
    # the run's model with its EMA adapters (the ZeRO-3 partitions of every rank), rebuilt here
    cfg, task = built(base, *LORA)
    params = dict(task.model.named_parameters())
    trainer = json.loads((ckpt / "trainer.json").read_text())
    ema = ema_weights(ckpt, trainer, {n: p.shape for n, p in params.items() if p.requires_grad})
    with torch.no_grad():
        for k, v in ema.items():
            params[k].copy_(v)
    # written from that model (the engine's path when rank 0 holds it: ZeRO 0-2), the export is the same
    build_method(cfg).export(task, task.model, tmp_path)
    again = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    # a freshly loaded base with the adapter through PEFT alone gives the same outputs
    fresh, _, _ = load_t2i_folder(base["base"], attention="dense", image_sizes=((32, 32), (32, 64)))
    fresh.resize_vocab(task.model.cfg.llm.vocab_size)
    peft_model = PeftModel.from_pretrained(fresh.to(torch.bfloat16), str(adapter))
    assert sum(".lora_" in n for n, _ in peft_model.named_parameters()) == len(saved)
    batch = next(iter(task.loader(0, 1)))
    draws = fixed_draws(task.model_cfg.head, batch.target_bits.shape[0] // 4, torch.Generator().manual_seed(0))
    task.model.eval(), peft_model.eval()
    with torch.no_grad():
        ours, theirs = task.model(batch, *draws), peft_model(batch, *draws)
        assert torch.equal(ours.loss, theirs.loss) and torch.equal(ours.text_ce_sum, theirs.text_ce_sum)
        with peft_model.disable_adapter():
            assert not torch.equal(peft_model(batch, *draws).loss, theirs.loss)  # the adapters change the model
    # the adapter names its base by fingerprint: the merge tool takes it for that base (and refuses others)
    from models.t2i.lora import base_fingerprint
    from training.adapters import merge_folder

    assert json.loads((adapter / "base.json").read_text())["fingerprint"] == base_fingerprint(base["base"])
    assert (merge_folder(base["base"], adapter, tmp_path / "merged") / "config.json").is_file()


@pytest.mark.slow
def test_a_lora_checkpoint_is_under_5_percent_of_a_full_one(base, lora_run, tmp_path):
    whole = ["engine.zero_stage=3", "engine.offload=params", "schedule.total_steps=1", "checkpoint.every=1"]
    run(tmp_path / "whole", base, *whole, "checkpoint.export_official=false")

    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    lora = size(lora_run[0] / "checkpoints" / "step_00000006")
    full = size(tmp_path / "whole" / "checkpoints" / "step_00000001")
    assert lora < 0.05 * full, (lora, full)


@pytest.mark.slow
def test_head_only_resumes_exactly_after_sigkill_and_exports_an_official_folder(base, tmp_path):
    from safetensors.torch import load_file

    common = [
        "finetune.method=head",
        "engine.zero_stage=2",
        "engine.offload=optimizer",
        "model.activation_checkpointing=true",
        "schedule.total_steps=6",
        "checkpoint.every=3",
    ]
    full, output = killed_and_resumed(tmp_path, base, common)
    assert "engine.offload=optimizer: ZeRO-2 with offload_optimizer to the CPU" in output
    ckpt = full / "checkpoints" / "step_00000006"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "ema.safetensors",
        "manifest.json",
        "rank_00000.pt",
        "rank_00001.pt",
        "trainable.safetensors",
        "trainer.json",
    ]
    # the export is the base with the EMA head, projector and query rows, in the official layout
    exported, _, _ = load_t2i_folder(full / "export")
    source, _, _ = load_t2i_folder(base["base"])
    ema = {plain_name(k): v for k, v in load_file(str(ckpt / "ema.safetensors")).items()}
    queries = json.loads((base["tokens"] / "manifest.json").read_text())["text_tokens"]["query_ids"]
    embed, before = exported.llm.model.embed_tokens.weight, source.llm.model.embed_tokens.weight
    assert torch.equal(embed[queries], ema["llm.model.embed_tokens.rows"].to(embed.dtype))
    others = torch.ones(len(embed), dtype=torch.bool)
    others[queries] = False
    assert torch.equal(embed[others], before[others].to(embed.dtype))  # the frozen rows, in the base dtype
    for name, value in exported.vision_head.state_dict().items():
        assert torch.equal(value, ema[f"vision_head.{name}"]), name
