"""LoRA adapters in PEFT's saved format on the T2I model (models/t2i/lora.py): `python -m training.checkpoint merge`
writes an official folder whose outputs (logits, diffusion-head predictions, sampled bits) equal the base with the
adapter applied unmerged (fp32, within 1e-5); `eval.generate --lora` gives the images of `eval.generate` on the merged
folder for the same seeds; adapters that do not fit the base, a base other than the recorded one, NaN and a
non-empty `--dst` are refused in one line. The adapters are made with peft directly (random non-zero lora_B)."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")

from eval.generate import main as generate_main  # noqa: E402
from models.core.attention import dense_block_causal_mask  # noqa: E402
from models.core.sampling import SamplingConfig  # noqa: E402
from models.t2i.io import export_t2i_folder, load_t2i_folder  # noqa: E402
from models.t2i.lora import (  # noqa: E402
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_JSON,
    AdapterError,
    apply_adapter,
    base_fingerprint,
)
from models.t2i.model import TextToImageBitDance, get_t2i_config  # noqa: E402
from models.t2i.sampler import sample_t2i  # noqa: E402
from models.t2i.text_tokenizer import T2ITextTokenizer, build_chat_tokenizer  # noqa: E402
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config  # noqa: E402
from training.checkpoint import main as checkpoint_main  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "wqkv", "wo", "w1", "w2"]
TOL = 1e-5
PROMPTS = ["a photo of a cat", "a red circle"]
TINY = ["--image-size", "32x32", "--height", "32", "--width", "32", "--steps", "2", "--cfg-scale", "2"]


def tiny_model(vocab: int, layers: int = 2) -> TextToImageBitDance:
    cfg = get_t2i_config("tiny-4x")
    model = TextToImageBitDance(replace(cfg, llm=replace(cfg.llm, vocab_size=vocab, num_hidden_layers=layers)))
    with torch.no_grad():
        for p in model.vision_head.parameters():  # the fresh head's zero output layers would hide the adapter
            p.normal_(0, 0.05)
    return model


def make_adapter(model: TextToImageBitDance, folder, r: int = 4) -> None:
    """A LoRA adapter of `model` as PEFT saves it, lora_B random (a fresh one is zero: no change)."""
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    wrapped.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(root, sharded fp32 base folder, its adapter with base.json, the merged fp32 folder)."""
    root = tmp_path_factory.mktemp("lora")
    text = T2ITextTokenizer.from_folder(build_chat_tokenizer(PROMPTS, root / "tok", 300), 4)
    torch.manual_seed(0)
    folder = export_t2i_folder(
        tiny_model(len(text)), text, BinaryAutoencoder(get_tokenizer_config("tiny")), root / "base", 200_000
    )
    torch.manual_seed(1)
    make_adapter(load_t2i_folder(folder)[0], root / "adapter")
    (root / "adapter" / BASE_JSON).write_text(json.dumps({"fingerprint": base_fingerprint(folder)}))
    checkpoint_main([*merge_args(folder, root / "adapter", root / "merged"), "--dtype", "fp32"])
    return root, folder, root / "adapter"


def outputs(model: TextToImageBitDance, text: T2ITextTokenizer) -> dict[str, torch.Tensor]:
    """Logits of a fixed token row, diffusion-head predictions for fixed inputs, a short sampling run's bits."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.cfg.llm.vocab_size, (2, 12), generator=g)
    mask = dense_block_causal_mask(torch.zeros_like(ids), torch.arange(12).expand(2, -1))
    P, C, D = model.cfg.parallel_num, model.cfg.latent_dim, model.cfg.llm.hidden_size
    z, t, c = torch.randn(3, P, C, generator=g), torch.rand(3, generator=g), torch.randn(3, P, D, generator=g)
    sampling = SamplingConfig(steps=2, cfg_scale=2.0, cfg_schedule="constant")
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    with torch.no_grad():
        return {
            "logits": model.llm(ids, torch.arange(12).expand(2, -1), mask),
            "head": model.vision_head.net(z, t, c),
            "bits": sample_t2i(model, text, PROMPTS, 32, 32, sampling, gens),
        }


def loaded(folder, adapter=None) -> tuple[TextToImageBitDance, T2ITextTokenizer]:
    """(model, text tokenizer) of a folder, with the adapter applied unmerged when given."""
    model, text, _ = load_t2i_folder(folder, image_sizes=((32, 32),))
    if adapter is not None:
        apply_adapter(model, adapter, folder)
    return model, text


def test_merged_folder_equals_base_with_the_unmerged_adapter(base):
    root, folder, adapter = base
    merged_dir = root / "merged"
    assert {p.name for p in merged_dir.iterdir()} == {p.name for p in folder.iterdir()}  # the same files, shards
    assert len(list(merged_dir.glob("model-0000*"))) > 1
    assert json.loads((merged_dir / "config.json").read_text())["torch_dtype"] == "float32"
    plain, unmerged, merged = (
        outputs(*loaded(f, a)) for f, a in ((folder, None), (folder, adapter), (merged_dir, None))
    )
    for key in ("logits", "head"):
        diff, change = ((x[key] - unmerged[key]).abs().max().item() for x in (merged, plain))
        print(f"{key}: max |merged - unmerged| = {diff:.3g}; the adapter changes it by up to {change:.3g}")
        assert diff <= TOL, (key, diff)
        assert (plain[key] - unmerged[key]).abs().max() > 100 * TOL, f"the adapter does not change {key}"
    assert torch.equal(merged["bits"], unmerged["bits"])
    assert not torch.equal(plain["bits"], unmerged["bits"])


def test_merge_keeps_untargeted_tensors_and_writes_bf16_by_default(base, tmp_path):
    root, folder, adapter = base
    checkpoint_main(["merge", "--base", str(folder), "--adapter", str(adapter), "--dst", str(tmp_path / "bf16")])
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"

    def weights(folder):  # the backbone, vision head and projector (the image tokenizer keeps its dtype)
        return {k: v for f in folder.glob("[mvp]*.safetensors") for k, v in load_file(str(f)).items()}

    before, after, fp32 = weights(folder), weights(tmp_path / "bf16"), weights(root / "merged")
    assert set(after) == set(before)
    for k, v in after.items():
        if v.is_floating_point():
            assert v.dtype == torch.bfloat16, k
            assert torch.equal(v, fp32[k].to(torch.bfloat16)), k  # merged in fp32, rounded once
    assert torch.equal(fp32["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(
        fp32["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )


def test_generate_with_lora_equals_generate_on_the_merged_folder(base, tmp_path):
    root, folder, adapter = base
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["--task", "prompts", "--prompts-file", str(prompts), "--images-per-prompt", "2", "--seed", "5", *TINY]
    generate_main([*common, "--model", str(folder), "--lora", str(adapter), "--out", str(tmp_path / "lora")])
    generate_main([*common, "--model", str(root / "merged"), "--out", str(tmp_path / "merged")])
    generate_main([*common, "--model", str(folder), "--out", str(tmp_path / "plain")])
    pngs = sorted(p.relative_to(tmp_path / "lora") for p in (tmp_path / "lora").rglob("*.png"))
    assert len(pngs) == 4

    def image(run, name):
        return np.asarray(Image.open(tmp_path / run / name), dtype=np.int16)

    worst = max(np.abs(image("lora", n) - image("merged", n)).max() for n in pngs)
    print(f"max pixel difference, --lora vs merged folder: {worst}")
    assert worst == 0  # the same bits, so the same decoded pixels
    assert any(not np.array_equal(image("lora", n), image("plain", n)) for n in pngs)


def refused(argv, capsys) -> str:
    """The one error line of a merge that must stop with exit status 2."""
    with pytest.raises(SystemExit) as err:
        checkpoint_main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def merge_args(folder, adapter, dst) -> list[str]:
    return ["merge", "--base", str(folder), "--adapter", str(adapter), "--dst", str(dst)]


def edited_copy(adapter, dst, config=None, weights=None):
    """A copy of the adapter folder with config fields replaced and/or weights transformed."""
    shutil.copytree(adapter, dst)
    if config:
        cfg = json.loads((dst / ADAPTER_CONFIG).read_text())
        (dst / ADAPTER_CONFIG).write_text(json.dumps({**cfg, **config}))
    if weights:
        save_file(weights(load_file(str(dst / ADAPTER_WEIGHTS))), str(dst / ADAPTER_WEIGHTS))
    return dst


def poisoned(state):
    key = sorted(state)[0]
    state[key][0, 0] = float("nan")
    return state


def test_bad_adapters_and_folders_are_refused_in_one_line(base, tmp_path, capsys):
    root, folder, adapter = base
    dst = tmp_path / "out"
    cases = {
        "is not a folder": tmp_path / "missing",
        "lacks adapter_model.safetensors": edited_copy(adapter, tmp_path / "noweights"),
        "does not fit this base (Target modules {'qkv_proj'} not found": edited_copy(
            adapter, tmp_path / "targets", config={"target_modules": ["qkv_proj"]}
        ),
        "modules this base lacks or its config does not target": edited_copy(
            adapter, tmp_path / "fewer", config={"target_modules": ["q_proj"]}
        ),
        "tensors of other shapes": edited_copy(adapter, tmp_path / "rank", config={"r": 8}),
        "holds NaN or Inf": edited_copy(adapter, tmp_path / "nan", weights=poisoned),
        "was trained from a base with fingerprint": edited_copy(adapter, tmp_path / "otherbase"),
        "is not a PEFT adapter config": edited_copy(adapter, tmp_path / "badjson"),
    }
    (cases["lacks adapter_model.safetensors"] / ADAPTER_WEIGHTS).unlink()
    (cases["was trained from a base with fingerprint"] / BASE_JSON).write_text(json.dumps({"fingerprint": "0" * 64}))
    (cases["is not a PEFT adapter config"] / ADAPTER_CONFIG).write_text("{not json")
    for message, bad in cases.items():
        line = refused(merge_args(folder, bad, dst), capsys)
        assert message in line, (message, line)
        assert not dst.exists(), message  # nothing written
    # an adapter trained on a deeper model: weights for layers this base does not have
    vocab = load_t2i_folder(folder)[0].cfg.llm.vocab_size
    make_adapter(tiny_model(vocab, layers=3), tmp_path / "deeper")
    line = refused(merge_args(folder, tmp_path / "deeper", dst), capsys)
    assert "(llm.model.layers.2." in line and "7 modules" in line and "pass the base it was trained for" in line
    model = load_t2i_folder(folder)[0]  # a refused adapter leaves the model as it was
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(AdapterError, match="other shapes"):
        apply_adapter(model, tmp_path / "rank")
    assert [n for n, _ in model.named_parameters()] == names
    # --dst: not empty, the base itself
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    line = refused(merge_args(folder, adapter, dst), capsys)
    assert "is not empty" in line and "--overwrite" in line and (dst / "notes.txt").read_text() == "keep me"
    assert "is the --base folder" in refused(merge_args(folder, adapter, folder), capsys)
    checkpoint_main([*merge_args(folder, adapter, dst), "--overwrite", "--dtype", "fp32"])
    assert (dst / "notes.txt").is_file() and load_t2i_folder(dst)[0] is not None


def test_generate_refuses_a_bad_lora_in_one_line(base, tmp_path, capsys):
    root, folder, adapter = base
    other = edited_copy(adapter, tmp_path / "otherbase")
    (other / BASE_JSON).write_text(json.dumps({"fingerprint": "0" * 64}))
    argv = ["--task", "prompts", "--prompt", "a cat", "--model", str(folder), "--out", str(tmp_path / "o"), *TINY]
    for lora, message in ((tmp_path / "missing", "is not a folder"), (other, "was trained from a base")):
        with pytest.raises(SystemExit) as err:
            generate_main([*argv, "--lora", str(lora)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert err.value.code == 2 and message in lines[-1] and "Traceback" not in "\n".join(lines), lines
        assert lines[-1].startswith("python -m eval.generate: error: "), lines
    assert not (tmp_path / "o").exists()
