"""The T2I text tokenizer: Qwen3 chat template ids, the added res/query tokens, and a small offline stand-in.

``T2ITextTokenizer`` adds ``<|res_1|>`` .. ``<|res_N|>`` and then ``<|query_1|>`` .. ``<|query_{P-1}|>`` as
additional special tokens, in the official order, so a fresh Qwen3 tokenizer gets the same ids as the released
T2I folders; a folder that already holds them keeps its ids. ``build_chat_tokenizer`` trains a tiny byte-level
BPE with the Qwen special tokens for tests and the CPU demo.
"""

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tok_models
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

REQUIRED_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", *REQUIRED_TOKENS, "<|image_pad|>")  # ids 0..5 in build_chat_tokenizer
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _extra_special_tokens(tok: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's additional special tokens (``additional_special_tokens`` in 4.x, ``extra_`` in 5.x)."""
    current = getattr(tok, "additional_special_tokens", None)
    if current is None:
        current = getattr(tok, "extra_special_tokens", None) or []
    if isinstance(current, dict):
        current = list(current.values())
    return [str(t) for t in current]


def _add_special_tokens(tok: PreTrainedTokenizerBase, tokens: list[str]) -> None:
    """Register ``tokens`` as additional special tokens without dropping the ones already registered.

    ``add_special_tokens`` replaces the additional list by default (transformers 4.x and 5.x alike), so the
    current list is passed along; tokens already in the vocabulary keep their ids, new ones are appended in order.
    """
    current = _extra_special_tokens(tok)
    known = set(current)
    tok.add_special_tokens({"additional_special_tokens": current + [t for t in tokens if t not in known]})


def _check_contiguous(name: str, tokens: list[str], ids: list[int]) -> None:
    if ids and ids != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError(
            f"{name} token ids are not contiguous ({tokens[0]}..{tokens[-1]} -> {ids[:4]}...); "
            "the tokenizer folder holds a different T2I token layout"
        )


class T2ITextTokenizer:
    """A Hugging Face tokenizer with the BitDance T2I special tokens and the chat template ids."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase, parallel_num: int, num_res_tokens: int = 256):
        if parallel_num < 1 or num_res_tokens < 1:
            raise ValueError(f"parallel_num ({parallel_num}) and num_res_tokens ({num_res_tokens}) must be >= 1")
        vocab = hf_tokenizer.get_vocab()
        for token in REQUIRED_TOKENS:
            if token not in vocab:
                raise ValueError(f"tokenizer has no {token} token; the folder must hold a Qwen3 tokenizer")
        self.hf_tokenizer = hf_tokenizer
        self.parallel_num = parallel_num
        self.num_res_tokens = num_res_tokens
        res_tokens = [f"<|res_{k}|>" for k in range(1, num_res_tokens + 1)]
        query_tokens = [f"<|query_{i}|>" for i in range(1, parallel_num)]
        _add_special_tokens(hf_tokenizer, res_tokens)  # official order: res tokens first, then queries
        if query_tokens:
            _add_special_tokens(hf_tokenizer, query_tokens)
        vocab = hf_tokenizer.get_vocab()
        self._ids = {t: vocab[t] for t in (*REQUIRED_TOKENS, *res_tokens, *query_tokens)}
        self._res_ids = [self._ids[t] for t in res_tokens]
        self._query_ids = [self._ids[t] for t in query_tokens]
        _check_contiguous("res", res_tokens, self._res_ids)
        _check_contiguous("query", query_tokens, self._query_ids)
        self._eot_id = vocab.get("<|endoftext|>")

    @classmethod
    def from_folder(cls, path: str | Path, parallel_num: int, num_res_tokens: int = 256) -> "T2ITextTokenizer":
        path = Path(path)
        if not path.is_dir() or not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise FileNotFoundError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {path}")
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(hf, parallel_num, num_res_tokens)

    @property
    def vision_start_id(self) -> int:
        return self._ids["<|vision_start|>"]

    @property
    def vision_end_id(self) -> int:
        return self._ids["<|vision_end|>"]

    @property
    def im_start_id(self) -> int:
        return self._ids["<|im_start|>"]

    @property
    def im_end_id(self) -> int:
        return self._ids["<|im_end|>"]

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id, else ``<|endoftext|>``, else ``<|im_end|>``."""
        if self.hf_tokenizer.pad_token_id is not None:
            return self.hf_tokenizer.pad_token_id
        return self._eot_id if self._eot_id is not None else self.im_end_id

    def res_id(self, k: int) -> int:
        """Id of ``<|res_k|>`` (k patches of 16 pixels), 1 <= k <= num_res_tokens."""
        if not 1 <= k <= self.num_res_tokens:
            raise ValueError(f"res_id({k}): k must be in 1..{self.num_res_tokens}")
        return self._res_ids[k - 1]

    def query_ids(self) -> list[int]:
        """Ids of ``<|query_1|>`` .. ``<|query_{parallel_num-1}|>``."""
        return list(self._query_ids)

    def encode(self, text: str) -> list[int]:
        return self.hf_tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, caption: str) -> list[int]:
        return self.encode(f"<|im_start|>user\n{caption}<|im_end|>\n<|im_start|>assistant\n")

    def uncond_ids(self) -> list[int]:
        return self.encode("<|im_start|>assistant\n")

    def image_prefix_ids(self, grid_h: int, grid_w: int) -> list[int]:
        """``<|vision_start|>``, ``<|res_{grid_h}|>``, ``<|res_{grid_w}|>``, then the query tokens."""
        return [self.vision_start_id, self.res_id(grid_h), self.res_id(grid_w), *self._query_ids]

    def __len__(self) -> int:
        return len(self.hf_tokenizer)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        self.hf_tokenizer.save_pretrained(str(path))
        return path

    def fingerprint(self) -> str:
        """sha256 hex of the full vocabulary (token -> id, added tokens included) and parallel_num."""
        payload = {"vocab": self.hf_tokenizer.get_vocab(), "parallel_num": self.parallel_num}
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def build_chat_tokenizer(corpus: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a small byte-level BPE with the Qwen special tokens on ``corpus`` and save it to ``out_dir``.

    Offline and deterministic; the special tokens get ids 0..5 in ``QWEN_SPECIAL_TOKENS`` order, bytes and merges
    follow. The saved folder loads with ``AutoTokenizer.from_pretrained(out_dir, local_files_only=True)``.
    """
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return out_dir
