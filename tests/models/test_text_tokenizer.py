"""T2I text tokenizer: chat template ids, res/query token layout, save/load stability, fingerprint, errors."""

import json

import pytest
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tok_models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from models.t2i.text_tokenizer import QWEN_SPECIAL_TOKENS, T2ITextTokenizer, build_chat_tokenizer

CAPTIONS = [
    "a red cat sitting on a blue mat",
    "two dogs playing in the snow, photo, 35mm",
    "A café sign with naïve lettering — 🐈 and 漢字",
    "an astronaut riding a horse on the moon",
]
P = 4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_chat_tokenizer(CAPTIONS, tmp_path_factory.mktemp("chat_tok"))


@pytest.fixture
def tok(base_dir):
    return T2ITextTokenizer.from_folder(base_dir, parallel_num=P)


def test_prompt_template_round_trip(tok):
    for caption in CAPTIONS:
        ids = tok.prompt_ids(caption)
        assert tok.hf_tokenizer.decode(ids) == f"<|im_start|>user\n{caption}<|im_end|>\n<|im_start|>assistant\n"
        assert ids[0] == tok.im_start_id
        assert tok.hf_tokenizer.decode(tok.encode(caption)) == caption
    assert tok.uncond_ids()[0] == tok.im_start_id
    assert tok.hf_tokenizer.decode(tok.uncond_ids()) == "<|im_start|>assistant\n"


def test_special_tokens_are_single_ids(tok):
    for token in QWEN_SPECIAL_TOKENS:
        assert len(tok.encode(token)) == 1, token
    assert tok.encode("<|im_start|>") == [tok.im_start_id]
    assert tok.encode("<|im_end|>") == [tok.im_end_id]
    assert tok.encode("<|vision_start|>") == [tok.vision_start_id]
    assert tok.encode("<|vision_end|>") == [tok.vision_end_id]
    assert tok.pad_id == tok.hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_res_and_query_layout(base_dir, tok):
    base_len = len(AutoTokenizer.from_pretrained(base_dir, local_files_only=True))
    res = [tok.res_id(k) for k in range(1, 257)]
    assert res == list(range(base_len, base_len + 256))  # res tokens first, right after the base vocab
    assert tok.query_ids() == list(range(base_len + 256, base_len + 256 + P - 1))
    assert len(tok) == base_len + 256 + P - 1
    assert tok.hf_tokenizer.decode([tok.res_id(1)]) == "<|res_1|>"
    assert tok.hf_tokenizer.decode(tok.query_ids()[-1:]) == f"<|query_{P - 1}|>"
    assert tok.encode("<|res_64|>") == [tok.res_id(64)]
    assert tok.image_prefix_ids(32, 64) == [tok.vision_start_id, tok.res_id(32), tok.res_id(64), *tok.query_ids()]


def test_both_token_sets_stay_registered_as_special(tmp_path, tok):
    # transformers replaces the additional special token list on each add_special_tokens call by default
    def check(hf):
        specials = set(hf.all_special_tokens)
        assert {"<|im_start|>", "<|vision_start|>", "<|res_1|>", "<|res_256|>", "<|query_1|>"} <= specials
        ids = hf.encode("x<|res_3|><|query_2|>y", add_special_tokens=False)
        assert hf.decode(ids, skip_special_tokens=True) == "xy"

    check(tok.hf_tokenizer)
    check(AutoTokenizer.from_pretrained(tok.save(tmp_path / "t2i"), local_files_only=True))


def test_parallel_num_one_has_no_queries(base_dir):
    tok1 = T2ITextTokenizer.from_folder(base_dir, parallel_num=1)
    assert tok1.query_ids() == []
    assert tok1.image_prefix_ids(16, 16) == [tok1.vision_start_id, tok1.res_id(16), tok1.res_id(16)]


def test_reload_keeps_ids_and_fingerprint(tmp_path, tok):
    folder = tok.save(tmp_path / "t2i")
    again = T2ITextTokenizer.from_folder(folder, parallel_num=P)
    assert len(again) == len(tok)
    assert again.hf_tokenizer.get_vocab() == tok.hf_tokenizer.get_vocab()
    assert [again.res_id(k) for k in (1, 128, 256)] == [tok.res_id(k) for k in (1, 128, 256)]
    assert again.query_ids() == tok.query_ids()
    assert again.prompt_ids("a red cat") == tok.prompt_ids("a red cat")
    assert again.fingerprint() == tok.fingerprint()
    assert len(tok.fingerprint()) == 64


def test_parallel_num_changes_fingerprint(base_dir, tok):
    assert T2ITextTokenizer.from_folder(base_dir, parallel_num=P).fingerprint() == tok.fingerprint()
    assert T2ITextTokenizer.from_folder(base_dir, parallel_num=16).fingerprint() != tok.fingerprint()
    assert T2ITextTokenizer.from_folder(base_dir, parallel_num=1).fingerprint() != tok.fingerprint()


@pytest.mark.parametrize("k", [0, 257])
def test_res_id_out_of_range(tok, k):
    with pytest.raises(ValueError, match=r"1\.\.256"):
        tok.res_id(k)


def test_non_contiguous_res_ids_raise(base_dir):
    hf = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    hf.add_special_tokens({"additional_special_tokens": ["<|res_2|>"]})  # res_2 before res_1
    with pytest.raises(ValueError, match="not contiguous"):
        T2ITextTokenizer(hf, parallel_num=P)


def test_missing_vision_start_raises(tmp_path):
    specials = [t for t in QWEN_SPECIAL_TOKENS if t != "<|vision_start|>"]
    raw = Tokenizer(tok_models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(CAPTIONS, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=raw, additional_special_tokens=specials).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"<\|vision_start\|>.*Qwen3"):
        T2ITextTokenizer.from_folder(tmp_path, parallel_num=P)


def test_from_folder_without_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        T2ITextTokenizer.from_folder(tmp_path, parallel_num=P)
    with pytest.raises(FileNotFoundError):
        T2ITextTokenizer.from_folder(tmp_path / "missing", parallel_num=P)


def test_build_is_deterministic(tmp_path, base_dir):
    again = build_chat_tokenizer(iter(CAPTIONS), tmp_path / "again")
    first = json.loads((base_dir / "tokenizer.json").read_text())
    second = json.loads((again / "tokenizer.json").read_text())
    assert first["model"]["vocab"] == second["model"]["vocab"]
    assert first["model"]["merges"] == second["model"]["merges"]
    assert first["added_tokens"] == second["added_tokens"]
    assert [t["content"] for t in first["added_tokens"]] == list(QWEN_SPECIAL_TOKENS)
