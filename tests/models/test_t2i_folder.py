"""Official T2I folder layout: export -> load -> export is byte-identical; strict failures name the problem."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.core.state_dict import StateDictMismatchError
from models.t2i.io import HEAD_JSON_KEYS, export_t2i_folder, head_config_from_json, load_t2i_folder, write_t2i_parts
from models.t2i.model import TextToImageBitDance, get_t2i_config
from models.t2i.text_tokenizer import T2ITextTokenizer, build_chat_tokenizer
from models.tokenizer.model import BinaryAutoencoder, get_tokenizer_config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    tok = T2ITextTokenizer.from_folder(build_chat_tokenizer(["a red circle", "two blue squares"], root / "tok", 300), 4)
    cfg = get_t2i_config("tiny-4x")
    cfg = replace(cfg, llm=replace(cfg.llm, vocab_size=len(tok) + 3))  # padded rows beyond the tokenizer
    torch.manual_seed(0)
    model = TextToImageBitDance(cfg).to(torch.bfloat16)
    ae = BinaryAutoencoder(get_tokenizer_config("tiny"))
    out = export_t2i_folder(model, tok, ae, root / "folder", max_shard_bytes=200_000)
    return model, out, root


def tensors_of(folder):
    files = sorted(p for p in folder.glob("*.safetensors"))
    return {f"{p.name}:{k}": v for p in files for k, v in load_file(str(p)).items()}


def test_export_layout_is_official(exported):
    _, out, _ = exported
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors.index.json",
        "ae.safetensors",
        "ae_config.json",
        "vision_head_config.json",
        "vision_head.safetensors",
        "projector.safetensors",
        "tokenizer.json",
    } <= names
    assert len([n for n in names if n.startswith("model-0000")]) > 1  # sharded
    head = json.loads((out / "vision_head_config.json").read_text())
    assert head["parallel_num"] == 4 and head["ch_target"] == 16 and head["use_swiglu"] is True
    assert set(load_file(str(out / "projector.safetensors"))) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert all(k.startswith("net.") for k in load_file(str(out / "vision_head.safetensors")))
    assert json.loads((out / "ae_config.json").read_text())["ddconfig"]["z_channels"] == 16


def test_head_dim_is_written_only_when_it_is_not_the_official_128(exported, tmp_path):
    model, out, _ = exported
    head = json.loads((out / "vision_head_config.json").read_text())
    assert model.cfg.head.head_dim == 128 and set(head) == set(HEAD_JSON_KEYS)  # the official keys, nothing else
    assert head_config_from_json(head).head_dim == 128
    _, text, ae = load_t2i_folder(out)
    demo = get_t2i_config("demo-4x")  # the demo's 64-wide head
    write_t2i_parts(tmp_path, demo, text, ae, {}, {})
    written = json.loads((tmp_path / "vision_head_config.json").read_text())
    assert written["head_dim"] == 64 and set(written) == {*HEAD_JSON_KEYS, "head_dim"}
    assert head_config_from_json(written) == demo.head


def test_round_trip_is_byte_identical(exported):
    model, out, root = exported
    loaded, tok, ae = load_t2i_folder(out)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), k
    again = export_t2i_folder(loaded, tok, ae, root / "again", max_shard_bytes=200_000)
    first, second = tensors_of(out), tensors_of(again)
    assert first.keys() == second.keys()
    for k in first:
        assert first[k].dtype == second[k].dtype and first[k].view(torch.uint8).equal(second[k].view(torch.uint8)), k
    for name in ("config.json", "vision_head_config.json", "ae_config.json", "model.safetensors.index.json"):
        assert (out / name).read_text() == (again / name).read_text()


def test_transformers_reads_the_backbone(exported):
    transformers = pytest.importorskip("transformers")
    model, out, _ = exported
    hf = transformers.Qwen3ForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32)
    ours = model.llm.float()
    ids = torch.randint(0, 300, (1, 12))
    from models.core.attention import dense_block_causal_mask

    mask = dense_block_causal_mask(torch.zeros(1, 12, dtype=torch.long), torch.arange(12)[None])
    with torch.no_grad():
        got = ours(ids, torch.arange(12)[None], mask)
        want = hf(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-4


def copy_folder(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_strict_failures_name_the_problem(exported, tmp_path):
    _, out, _ = exported
    bad = copy_folder(out, tmp_path / "renamed")
    proj = load_file(str(bad / "projector.safetensors"))
    proj["fc3.weight"] = proj.pop("fc2.weight")
    save_file(proj, str(bad / "projector.safetensors"))
    with pytest.raises(StateDictMismatchError, match=r"projector.safetensors[\s\S]*fc2.weight[\s\S]*fc3.weight"):
        load_t2i_folder(bad)

    bad = copy_folder(out, tmp_path / "no_head")
    (bad / "vision_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing vision_head.safetensors"):
        load_t2i_folder(bad)

    bad = copy_folder(out, tmp_path / "wrong_head")
    head = json.loads((bad / "vision_head_config.json").read_text())
    head["depth_latent"] = 4
    (bad / "vision_head_config.json").write_text(json.dumps(head))
    with pytest.raises(StateDictMismatchError, match="net.res_blocks.2"):
        load_t2i_folder(bad)

    bad = copy_folder(out, tmp_path / "llm_key")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shard = load_file(str(bad / first))
    key = next(iter(shard))
    shard[key + "_x"] = shard.pop(key)
    save_file(shard, str(bad / first))
    with pytest.raises(StateDictMismatchError, match="Qwen3 backbone"):
        load_t2i_folder(bad)


def test_generate_free_prompts_writes_pngs(exported, tmp_path):
    from eval.generate import main

    _, out, _ = exported
    base = ["--task", "prompts", "--model", str(out), "--image-size", "16x48", "--image-size", "32x32"]
    args = [*base, "--steps", "2", "--cfg-scale", "3", "--images-per-prompt", "2", "--out", str(tmp_path / "s")]
    main([*args, "--prompt", "a red circle", "--prompt", "two blue squares", "--height", "16", "--width", "48"])
    for i, prompt in enumerate(["a red circle", "two blue squares"]):
        folder = tmp_path / "s" / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == {"prompt": prompt}
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo blue squares\n")
    main([*args[:-1], str(tmp_path / "f"), "--prompts-file", str(prompts), "--height", "16", "--width", "48"])
    assert files_of(tmp_path / "f") == files_of(tmp_path / "s")  # same prompts, same per-image seeds
    with pytest.raises(SystemExit, match="20x20"):
        main([*args[:-1], str(tmp_path / "x"), "--prompt", "x", "--height", "20", "--width", "20"])


def files_of(folder):
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "run.json"
    }
