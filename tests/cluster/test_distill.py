"""The P -> P' initialisation of the 16x -> 64x distillation (`models.t2i.repatch`), at P=4 -> P=16: every weight
carried, new query rows at the mean of the old ones, outputs of the carried parts unchanged; a P=16 run started from
a P=4 folder trains and samples at P=16; and the loader's curated subsets (`data.subset`)."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers.data import make_t2i_data

from data_pipeline.loader import BinaryTokenLoader, LoaderConfig, LoaderError, SubsetConfig
from models.t2i.io import export_t2i_folder, load_t2i_folder
from models.t2i.model import TextToImageBitDance, get_t2i_config
from models.t2i.packing import T2ISample, pack_rows
from models.t2i.repatch import QueryRows, query_rows, repatch_
from models.t2i.text_tokenizer import T2ITextTokenizer
from models.tokenizer.io import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
SIZES = ((32, 32), (32, 64))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shapes data tokenized for P=16 and a P=4 model folder (random weights) with the same text tokenizer."""
    root = tmp_path_factory.mktemp("distill")
    d = make_t2i_data(root / "p16", samples=48, parallel_num=16)
    text4 = T2ITextTokenizer.from_folder(d["text"], 4)
    cfg = get_t2i_config("tiny-4x", image_sizes=SIZES)
    torch.manual_seed(0)
    teacher = TextToImageBitDance(replace(cfg, llm=replace(cfg.llm, vocab_size=len(text4))))
    export_t2i_folder(teacher, text4, load_tokenizer(d["ae"]), root / "p4")
    return {**d, "p4": root / "p4"}


def _prefix_batch(text: T2ITextTokenizer, parallel_num: int):
    bits = torch.randint(0, 2, (16, 16, 16), generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    return pack_rows([[T2ISample(text.prompt_ids("a red circle"), bits)]], text, parallel_num)


def test_p4_to_p16_keeps_every_weight_and_the_carried_outputs(data):
    teacher, text4, _ = load_t2i_folder(data["p4"], image_sizes=SIZES)
    student, _, _ = load_t2i_folder(data["p4"], image_sizes=SIZES)
    text16 = T2ITextTokenizer.from_folder(data["p4"], 16)
    rows = query_rows(data["p4"], 4, 16)
    assert rows.source == tuple(text4.query_ids()) and rows.target == tuple(text16.query_ids())
    assert rows.target[:3] == rows.source and len(rows.new) == 12
    student.resize_vocab(len(text16))
    repatch_(student, 16, rows)
    assert student.cfg.parallel_num == 16 and student.vision_head.cfg.parallel_num == 16

    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert t_state.keys() == s_state.keys()
    for name, weight in t_state.items():
        if name in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
            old = weight.shape[0]
            assert torch.equal(s_state[name][:old], weight), name  # every old row, the old queries included
            mean = weight[list(rows.source)].mean(0)
            torch.testing.assert_close(s_state[name][list(rows.new)], mean.expand(12, -1))
        else:
            assert torch.equal(s_state[name], weight), name

    # the carried parts compute what they did: the backbone on the text and image prefix the two layouts share ...
    b4, b16 = _prefix_batch(text4, 4), _prefix_batch(text16, 16)
    shared = len(text4.prompt_ids("a red circle")) + 2  # the causal part: text, vision_start, res_h
    with torch.no_grad():
        h4, _ = teacher.head_conditions(b4)
        h16, _ = student.head_conditions(b16)
    torch.testing.assert_close(h16[0, :shared], h4[0, :shared], rtol=1e-5, atol=1e-5)
    # ... and the head on the same inputs (it has no P-shaped weight: any patch size goes through it)
    g = torch.Generator().manual_seed(2)
    width = student.cfg.llm.hidden_size
    z, t, c = torch.randn(3, 16, 16, generator=g), torch.rand(3, generator=g), torch.randn(3, 16, width, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(student.vision_head.net(z, t, c), teacher.vision_head.net(z, t, c))
        for part in range(4):  # a P=4 patch through the P=16 model's head equals the teacher's on that patch
            sl = slice(4 * part, 4 * part + 4)
            torch.testing.assert_close(
                student.vision_head.net(z[:, sl], t, c[:, sl]), teacher.vision_head.net(z[:, sl], t, c[:, sl])
            )


def test_query_ids_of_another_tokenizer_are_refused():
    with pytest.raises(ValueError, match="other ids"):
        QueryRows((100, 101, 102), (200, 201, 202, 203))


@pytest.mark.slow
def test_p16_run_started_from_a_p4_folder_trains_and_samples_at_p16(data, tmp_path):
    run_dir = tmp_path / "student"
    cmd = [
        sys.executable,
        "-m",
        "training.train",
        "--config",
        str(REPO / "training" / "configs" / "tiny_t2i.yaml"),
        f"run_dir={run_dir}",
        f"data.data_dir={data['tokens']}",
        "model.name=tiny-16x",
        f"model.init_from={data['p4']}",
        f"model.image_tokenizer={data['ae']}",
        f"model.text_tokenizer={data['text']}",
        "schedule.total_steps=3",
        "schedule.warmup_steps=1",
        "logging.every=1",
        "logging.wandb=disabled",
        "checkpoint.export_official=true",
        "data.subset.score=min_object_area",
        "data.subset.min_score=0.02",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)

    # the run started from the folder: a row no batch touches (no image is 256 tokens tall) is the teacher's
    teacher, text4, _ = load_t2i_folder(data["p4"], image_sizes=SIZES)
    student, text16, ae = load_t2i_folder(run_dir / "export", image_sizes=SIZES)
    assert student.cfg.parallel_num == 16 and text16.query_ids()[:3] == text4.query_ids()
    unused = text4.res_id(256)
    torch.testing.assert_close(
        student.llm.model.embed_tokens.weight[unused].float(), teacher.llm.model.embed_tokens.weight[unused].float()
    )

    from models.core.sampling import SamplingConfig
    from models.t2i.sampler import sample_t2i

    gen = torch.Generator().manual_seed(0)
    bits = sample_t2i(student, text16, ["a red circle"], 32, 32, SamplingConfig(steps=2), generator=gen)
    assert bits.shape == (1, 16, 16, 16) and set(bits.unique().tolist()) <= {-1.0, 1.0}


def _loader(tokens: Path, subset: SubsetConfig) -> BinaryTokenLoader:
    cfg = LoaderConfig(tokens, num_workers=0, token_budget=600, subset=subset, debug_keys=True)
    return BinaryTokenLoader(cfg, rank=0, world_size=1)


def test_curated_subset_keeps_only_matching_samples_and_counts_the_rest(data):
    from data_pipeline.shard_format import read_shard

    records = {r.key: r for shard in sorted(Path(data["tokens"]).glob("*.tar")) for r in read_shard(shard)}
    threshold = sorted(r.scores["min_object_area"] for r in records.values())[len(records) // 2]
    loader = _loader(data["tokens"], SubsetConfig(score="min_object_area", min_score=threshold, min_side=32))
    seen = set()
    for _, (_, keys) in zip(range(40), loader, strict=False):
        seen.update(key for _, key in keys)
    assert seen and all(records[k].scores["min_object_area"] >= threshold for k in seen)
    kept = sum(r.scores["min_object_area"] >= threshold for r in records.values())
    assert len(seen) == kept  # 40 batches cover an epoch of the subset
    assert loader.stats()["filtered_out"] > 0

    wide = _loader(data["tokens"], SubsetConfig(min_side=64))  # only 32x32 and 32x64 images: nothing is kept
    with pytest.raises(LoaderError, match="kept none"):
        next(iter(wide))
    missing = _loader(data["tokens"], SubsetConfig(score="aesthetic"))
    with pytest.raises(LoaderError, match="no score 'aesthetic'"):
        next(iter(missing))


def test_megatron_folder_source_gives_a_p16_model_the_same_rows(data):
    """The megatron engine's `model.init_from=<P=4 folder>` (and `checkpoint import --model ...-16x`) reads the folder
    through `FolderLayers`: its embedding and LM head come out as the in-memory repatch makes them."""
    from models.t2i.io import t2i_folder_config
    from models.t2i.megatron.mapping import top_to_reference
    from models.t2i.repatch import with_parallel_num
    from training.engines.checkpoint_stream import TOP, FolderLayers, folder_model_config

    text16 = T2ITextTokenizer.from_folder(data["p4"], 16)
    cfg, _ = t2i_folder_config(data["p4"])
    cfg = with_parallel_num(replace(cfg, llm=replace(cfg.llm, vocab_size=len(text16))), 16, SIZES)
    imported = folder_model_config(data["p4"], "tiny-16x", len(text16))
    assert imported.parallel_num == 16 and imported.llm.vocab_size == len(text16)
    top = top_to_reference({k.removeprefix("model."): v for k, v in FolderLayers(data["p4"], cfg).read(TOP).items()})

    student, _, _ = load_t2i_folder(data["p4"], image_sizes=SIZES)
    student.resize_vocab(len(text16))
    repatch_(student, 16, query_rows(data["p4"], 4, 16))
    for name in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
        torch.testing.assert_close(top[name], student.state_dict()[name])
