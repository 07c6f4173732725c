"""The official text-to-image model folder in and out, and a T2I model started from a Hugging Face Qwen3 folder.

Layout, as the official release writes it: a Hugging Face Qwen3 model (`config.json`, `model.safetensors` or sharded
`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`, tokenizer files with the added tokens),
`ae_config.json` + `ae.safetensors`, `vision_head_config.json` + `vision_head.safetensors` (`net.*`) and
`projector.safetensors` (`fc1.*`, `fc2.*`). Every part loads strictly; tensors keep their stored dtype. Weights are
read through the checked reader (`models.core.safetensors_file`): headers checked, NaN/Inf in the LLM, vision head
and projector refused; the index json may name only plain file names in the folder.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.core import safetensors_file
from models.core.diffusion_head import HeadConfig
from models.core.state_dict import load_state_dict_strict
from models.t2i.model import T2IConfig, TextToImageBitDance
from models.t2i.qwen3 import Qwen3Config
from models.t2i.text_tokenizer import T2ITextTokenizer
from models.tokenizer.io import load_tokenizer, save_tokenizer
from models.tokenizer.model import BinaryAutoencoder

HEAD_JSON_KEYS = (
    "ch_target",
    "ch_cond",
    "ch_latent",
    "depth_latent",
    "depth_adanln",
    "time_shift",
    "time_schedule",
    "P_mean",
    "P_std",
    "parallel_num",
    "diff_batch_mul",
    "use_swiglu",
)
OFFICIAL_HEAD_DIM = 128  # the released heads' attention head width; not in their vision_head_config.json
INDEX_NAME = "model.safetensors.index.json"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"T2I model folder is missing {path.name} (looked for {path})")
    return path


def _read_json(path: Path) -> dict:
    return json.loads(_require(path).read_text())


def _index_files(folder: Path) -> dict[str, Path]:
    """{tensor name: file} of a folder's index json. Every file it names must be a plain file name in the folder (no
    path, `..` or absolute name; the file itself may be a link, as in a Hugging Face cache snapshot)."""
    index = folder / INDEX_NAME
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} holds no weight_map of tensor name -> file name; rewrite it or remove it")
    files = {}
    for name in set(weight_map.values()):
        if name in ("", ".", "..") or Path(name).name != name or "\x00" in name:
            raise ValueError(
                f"{index} names the file {name!r}, not a plain file name in {folder}; every weight file it lists "
                "must lie in that folder"
            )
        files[name] = _require(folder / name)
    return {k: files[v] for k, v in weight_map.items()}


def llm_weight_files(folder: Path) -> dict[str, Path]:
    """{Qwen3 tensor name: the safetensors file holding it} of a folder (index json, or one `model.safetensors`),
    reading only headers (each checked; a tensor the index places in a file that lacks it is refused)."""
    if not (folder / INDEX_NAME).is_file():
        path = _require(folder / "model.safetensors")
        return dict.fromkeys(safetensors_file.tensor_names(path), path)
    files = _index_files(folder)
    held = {path: set(safetensors_file.tensor_names(path)) for path in set(files.values())}
    for name, path in files.items():
        if name not in held[path]:
            raise safetensors_file.SafetensorsError(f"{folder / INDEX_NAME} places {name!r} in {path}, which lacks it")
    return files


def read_llm_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The Qwen3 weights of a folder: every tensor of the files its index json names, or of one `model.safetensors`
    (the caller's strict load names any tensor missing or extra), each checked finite as it is read."""
    if (folder / INDEX_NAME).is_file():
        paths = sorted(set(_index_files(folder).values()))
    else:
        paths = [_require(folder / "model.safetensors")]
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        state.update(safetensors_file.load_file(path, check_finite=True))
    return state


def read_safetensors(path: Path, names, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors file through the checked reader (`models.core.safetensors_file`), each read
    with a plain file read into its own buffer (no memory map: the process keeps only what it returns, which a
    streaming reader's memory bound relies on); with `check_finite` (the default) a floating tensor holding NaN/Inf
    is refused."""
    return safetensors_file.load_file(path, names, check_finite=check_finite)


def head_config_from_json(d: dict) -> HeadConfig:
    """The T2I head (2*sigmoid-1 output) described by `vision_head_config.json`; head_dim 128 unless the file names
    another (only our small configs write the key, so released folders stay byte-for-byte in the official layout)."""
    missing = [k for k in HEAD_JSON_KEYS if k not in d]
    if missing:
        raise ValueError(f"vision_head_config.json lacks {missing}")
    head_dim = d.get("head_dim", OFFICIAL_HEAD_DIM)
    return HeadConfig(**{k: d[k] for k in HEAD_JSON_KEYS}, head_dim=head_dim, sigmoid_output=True)


def folder_parallel_num(folder: str | Path) -> int:
    """P (tokens per step) of an official-layout folder, from its `vision_head_config.json`."""
    return int(_read_json(Path(folder) / "vision_head_config.json")["parallel_num"])


def t2i_folder_config(
    folder: str | Path, attention: str = "auto", image_sizes: tuple | None = None, device: str = "cpu"
) -> tuple[T2IConfig, BinaryAutoencoder]:
    """(model config, image tokenizer) of an official-layout folder, without reading the model weights."""
    folder = Path(folder)
    llm_cfg = Qwen3Config.from_hf_dict(_read_json(folder / "config.json"))
    head_cfg = head_config_from_json(_read_json(folder / "vision_head_config.json"))
    image_tok = load_tokenizer(_require(folder / "ae.safetensors"), device=device)
    if image_tok.config.z_channels != head_cfg.ch_target:
        raise ValueError(
            f"ae makes {image_tok.config.z_channels}-bit tokens but the vision head predicts {head_cfg.ch_target}"
        )
    kw = dict(
        llm=llm_cfg,
        head=head_cfg,
        downsample=image_tok.config.downsample,
        attention=attention,
        tokenizer=image_tok.config.name,
    )
    if image_sizes is not None:
        kw["image_sizes"] = tuple(tuple(s) for s in image_sizes)
    return T2IConfig(**kw), image_tok


def load_t2i_folder(
    folder: str | Path, attention: str = "auto", image_sizes: tuple | None = None, device: str = "cpu"
) -> tuple[TextToImageBitDance, T2ITextTokenizer, BinaryAutoencoder]:
    """Load (model, text tokenizer, image tokenizer) from an official-layout folder, every part strictly."""
    folder = Path(folder)
    cfg, image_tok = t2i_folder_config(folder, attention, image_sizes, device)
    llm_cfg, head_cfg = cfg.llm, cfg.head
    with torch.device("meta"):
        model = TextToImageBitDance(cfg)
    load_state_dict_strict(model.llm, read_llm_state_dict(folder), f"Qwen3 backbone in {folder}", assign=True)
    for part, name in ((model.vision_head, "vision_head.safetensors"), (model.projector, "projector.safetensors")):
        state = safetensors_file.load_file(_require(folder / name), check_finite=True)
        load_state_dict_strict(part, state, f"{name} in {folder}", assign=True)
    text_tok = T2ITextTokenizer.from_folder(folder, head_cfg.parallel_num)
    if len(text_tok) > llm_cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(text_tok)} tokens but the backbone embeds only {llm_cfg.vocab_size}")
    return model.to(device).eval(), text_tok, image_tok


def qwen3_t2i_config(folder: str | Path, base_cfg: T2IConfig) -> T2IConfig:
    """`base_cfg` with the backbone of a Hugging Face Qwen3 folder's `config.json` (the head's `ch_cond` follows)."""
    llm = Qwen3Config.from_hf_dict(_read_json(Path(folder) / "config.json"))
    return replace(base_cfg, llm=llm, head=replace(base_cfg.head, ch_cond=llm.hidden_size))


def t2i_from_qwen3_folder(folder: str | Path, base_cfg: T2IConfig, stored_dtype: bool = False) -> TextToImageBitDance:
    """A T2I model of `base_cfg` whose backbone is the Qwen3 of a Hugging Face folder (its `config.json` replaces
    `base_cfg.llm`, the head's `ch_cond` follows the hidden size), loaded strictly. Projector and head start fresh
    from the default generator (seed it first). The model is in the default dtype with the weights cast into it, or
    with `stored_dtype` in the dtype the weights are stored in."""
    folder = Path(folder)
    model = TextToImageBitDance(qwen3_t2i_config(folder, base_cfg))
    weights = read_llm_state_dict(folder)
    if stored_dtype:
        model.to(next(iter(weights.values())).dtype)
    load_state_dict_strict(model.llm, weights, f"Qwen3 backbone in {folder}")
    return model


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def _plain(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def shard_name(i: int, n: int) -> str:
    """The Hugging Face name of LLM shard `i` (from 1) of `n`."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def save_llm_shard(out: Path, name: str, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """One LLM safetensors file; returns its part of the index's weight map."""
    save_file(state, str(out / name), metadata={"format": "pt"})
    return dict.fromkeys(state, name)


def write_llm_index(out: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_llm_config(out: Path, llm: Qwen3Config, dtype: torch.dtype) -> None:
    (out / "config.json").write_text(json.dumps(llm.to_hf_dict(str(dtype).removeprefix("torch.")), indent=2) + "\n")


def write_t2i_parts(
    out: Path,
    cfg: T2IConfig,
    text_tok: T2ITextTokenizer,
    image_tok: BinaryAutoencoder,
    vision_head: dict[str, torch.Tensor],
    projector: dict[str, torch.Tensor],
) -> None:
    """Everything of the official layout but the LLM: image tokenizer, vision head (config and weights, `net.*`),
    projector (`fc1.*`, `fc2.*`) and the text tokenizer files."""
    save_tokenizer(image_tok, image_tok.config, out)
    head = {k: getattr(cfg.head, k) for k in HEAD_JSON_KEYS}
    if cfg.head.head_dim != OFFICIAL_HEAD_DIM:
        head["head_dim"] = cfg.head.head_dim
    (out / "vision_head_config.json").write_text(json.dumps(head, indent=2) + "\n")
    save_file(vision_head, str(out / "vision_head.safetensors"))
    save_file(projector, str(out / "projector.safetensors"))
    text_tok.save(out)


def export_t2i_folder(
    model: TextToImageBitDance,
    text_tok: T2ITextTokenizer,
    image_tok: BinaryAutoencoder,
    out_dir: str | Path,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `model` in the official layout (loadable by `load_t2i_folder` and by transformers for the LLM)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llm_state = _plain(model.llm)
    write_llm_config(out, model.cfg.llm, next(iter(llm_state.values())).dtype)
    shards = _shards(llm_state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            weight_map.update(save_llm_shard(out, shard_name(i, len(shards)), shard))
        write_llm_index(out, weight_map, sum(t.numel() * t.element_size() for t in llm_state.values()))
    write_t2i_parts(out, model.cfg, text_tok, image_tok, _plain(model.vision_head), _plain(model.projector))
    return out
