"""Streaming checkpoint tools: every tool moves one decoder layer at a time, so a process's peak host memory is about
one layer of the tensors it moves plus the embeddings, whatever the model size.

It owns the layer-at-a-time sources, the lazy writer and the streamed tools:

- `CheckpointLayers`: a megatron checkpoint's tensors one group at a time (group `i`: global layer i of every stacked
  key, one `dist_checkpointing.load`; group `TOP`: the tensors outside the layers).
- `FolderLayers`: an official T2I folder or a Hugging Face Qwen3 folder read the same way (the layer's tensors through
  the checked reader `models.core.safetensors_file`, NaN/Inf refused unless `check_finite=False`, converted to
  megatron names by `layer_to_megatron`, the vocabulary resized on the fly).
- `Fetcher`: any chunk (checkpoint key, global offsets, sizes) cut from its group, with a one-group cache.
- `save_lazy`: a dist checkpoint written from placeholders (meta tensors), each chunk fetched when the DCP writer
  reaches it (`LazySavePlanner.resolve_data`), items ordered layer by layer, one file per item.
- `export_streaming`, `import_streaming`, `reshard_streaming` (behind `python -m training.checkpoint`) and
  `fill_sharded` (the megatron engine's `model.init_from=<folder>`: a rank's ShardedTensors filled from a source).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from training.engines.megatron_checkpoint import (
    DIST,
    LAYER_KEY,
    TRAINER,
    CheckpointError,
    check_layout,
    fresh_dir,
    layout_shards,
    megatron_section,
    model_key,
    tensor_meta,
)

TOP = -1  # the group of the tensors outside the decoder layers
Group = dict[str, torch.Tensor]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def is_layered(key: str) -> bool:
    return model_key(key).startswith(LAYER_KEY)


def group_of(key: str, offsets) -> int:
    """The group a chunk belongs to: its global layer for stacked keys, `TOP` otherwise."""
    return int(offsets[0]) if is_layered(key) else TOP


# ---- sources --------------------------------------------------------------------------------------------------------


class CheckpointLayers:
    """The tensors of a megatron dist checkpoint whose keys are in `meta` ({key: (global shape, dtype)}), one group
    per `read`: layer i of every stacked key ([L, ...] -> [...]) or the unstacked tensors. Needs a process group."""

    def __init__(self, directory: Path, meta: dict):
        self.directory, self.meta = directory, meta

    def read(self, group: int) -> Group:
        chunks = {}
        for key, (shape, dtype) in self.meta.items():
            if is_layered(key) and group != TOP:
                chunks[key] = ((group,) + (0,) * (len(shape) - 1), torch.empty((1, *shape[1:]), dtype=dtype))
            elif not is_layered(key) and group == TOP:
                chunks[key] = ((0,) * len(shape), torch.empty(shape, dtype=dtype))
        read_chunks(self.directory, chunks)
        return {k: t[0] if group != TOP else t for k, (_, t) in chunks.items()}


def read_chunks(directory: Path, chunks: dict) -> None:
    """Fill `chunks` ({key: (global offsets, tensor)}) with those regions of a dist checkpoint's global tensors, with
    torch.distributed.checkpoint's resharding reads (each stored item read once, copied into the regions it
    overlaps). Needs a process group."""
    from torch.distributed import checkpoint as dcp

    planner = _chunk_load_planner()(chunks)
    dcp.load({}, storage_reader=dcp.FileSystemReader(str(directory)), planner=planner)
    planner.chunks = None  # the planner may live on in a reference cycle: it must not keep a layer alive


@functools.cache
def _chunk_load_planner():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class ChunkLoadPlanner(DefaultLoadPlanner):
        """Reads the given regions of stored tensors (no state dict: the targets are the chunks' tensors)."""

        def __init__(self, chunks: dict):
            super().__init__()
            self.chunks = chunks

        def create_local_plan(self):
            items = []
            for key, (offsets, t) in self.chunks.items():
                want = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.shape)
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [want])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.chunks[index.fqn][1]

    return ChunkLoadPlanner


class FolderLayers:
    """An official T2I folder (`vision_head_config.json` present) or a Hugging Face Qwen3 folder as megatron tensors
    (`model.<megatron key>`, TE names), one group per `read`. `cfg` is the model it becomes (its vocabulary may be
    larger or smaller than the folder's: rows resized as `TextToImageBitDance.resize_vocab` does); a Qwen3 folder's
    projector and vision head start fresh from `seed`, in the backbone's dtype. Every file's header is checked here;
    with `check_finite` each tensor read holding NaN/Inf is refused."""

    def __init__(self, folder: Path, cfg, seed: int = 0, check_finite: bool = True):
        from models.t2i.io import folder_parallel_num, llm_weight_files
        from models.t2i.repatch import query_rows

        self.folder, self.cfg, self.seed, self.check_finite = folder, cfg, seed, check_finite
        self.files = llm_weight_files(folder)
        self.official = (folder / "vision_head_config.json").is_file()
        self.query_rows = None  # an official folder of another P: its new query rows (`models.t2i.repatch`)
        if self.official and (source_p := folder_parallel_num(folder)) != cfg.parallel_num:
            self.query_rows = query_rows(folder, source_p, cfg.parallel_num)

    def _tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        from models.t2i.io import read_safetensors

        out = {}
        for path in dict.fromkeys(self.files[n] for n in names):
            out.update(read_safetensors(path, [n for n in names if self.files[n] == path], self.check_finite))
        return out

    def read(self, group: int) -> Group:
        from models.t2i.megatron.mapping import layer_to_megatron, top_to_megatron

        if group != TOP:
            prefix = f"model.layers.{group}."
            layer = self._tensors([n for n in self.files if n.startswith(prefix)])
            layer = {k[len(prefix) :]: v for k, v in layer.items()}
            out = {f"{LAYER_KEY}{k}": v for k, v in layer_to_megatron(layer, self.cfg.llm, "te").items()}
        else:
            out = top_to_megatron({**self._llm_top(), **self._head_and_projector()})
        return {f"model.{k}": v for k, v in out.items()}

    def _llm_top(self) -> dict[str, torch.Tensor]:
        from models.t2i.model import resized_rows

        names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
        top = {f"llm.{k}": v for k, v in self._tensors(names).items()}
        for k in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
            top[k] = resized_rows(top[k], self.cfg.llm.vocab_size)
            if self.query_rows is not None:
                top[k] = self.query_rows.apply(top[k].clone())
        return top

    def _head_and_projector(self) -> dict[str, torch.Tensor]:
        from models.core.safetensors_file import load_file

        if self.official:
            parts = {
                p: load_file(self.folder / f"{p}.safetensors", check_finite=self.check_finite)
                for p in ("vision_head", "projector")
            }
            return {f"{p}.{k}": v for p, state in parts.items() for k, v in state.items()}
        from models.core.diffusion_head import BinaryDiffusionHead
        from models.t2i.model import VisionProjector

        dtype = self._tensors(["model.norm.weight"])["model.norm.weight"].dtype
        torch.manual_seed(self.seed)
        modules = {
            "projector": VisionProjector(self.cfg.latent_dim, self.cfg.llm.hidden_size),
            "vision_head": BinaryDiffusionHead(self.cfg.head),
        }
        return {f"{p}.{k}": v.to(dtype) for p, m in modules.items() for k, v in m.state_dict().items()}

    def meta(self) -> dict:
        """{checkpoint key: (global shape, dtype)} (stacked layers), from layer 0 and the top group."""
        layer, top = self.read(0), self.read(TOP)
        n = self.cfg.llm.num_hidden_layers
        out = {k: ((n, *v.shape), v.dtype) for k, v in layer.items()}
        out.update({k: (tuple(v.shape), v.dtype) for k, v in top.items()})
        return out


class Fetcher:
    """`fetch(key, offsets, sizes)`: a chunk of a global tensor (stacked layers included) from `read(group)`, which is
    called once per run of consecutive chunks of one group (the last group read is kept). `reads` counts the reads."""

    def __init__(self, read: Callable[[int], Group]):
        self.read, self.group, self.tensors, self.reads = read, None, {}, 0

    def __call__(self, key: str, offsets, sizes) -> torch.Tensor:
        group = group_of(key, offsets)
        if group != self.group:
            self.group, self.tensors = None, {}  # drop the previous group before reading the next
            self.tensors, self.group = self.read(group), group
            self.reads += 1
        t = self.tensors[key]
        inner_offsets, inner_sizes = (offsets[1:], sizes[1:]) if group != TOP else (offsets, sizes)
        index = tuple(slice(o, o + s) for o, s in zip(inner_offsets, inner_sizes, strict=True))
        return t[index].reshape(tuple(sizes))


# ---- lazy saving ----------------------------------------------------------------------------------------------------


def placeholder(key, index, shape, dtype) -> torch.Tensor:
    """A chunk's stand-in while planning a save: shape and dtype without memory (the writer fetches the data)."""
    return torch.empty(shape, dtype=dtype, device="meta")


def _lazy_save_strategy(fetch: Callable):
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazySavePlanner(MCoreSavePlanner):
        """megatron's planner whose tensor items are fetched when written, in layer order (the `TOP` group first)."""

        def create_local_plan(self):
            plan = super().create_local_plan()
            order = lambda item: (  # noqa: E731
                TOP if item.type == WriteItemType.BYTE_IO else group_of(item.index.fqn, item.index.offset)
            )
            self.plan = replace(plan, items=sorted(plan.items, key=order))
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            chunk = write_item.tensor_data.chunk
            return fetch(write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes))

    class LazySaveStrategy(SaveShardedStrategy):
        """megatron's torch_dist format written synchronously, chunk data fetched lazily, one file per item."""

        def __init__(self):
            super().__init__("torch_dist", 1)

        def save(self, sharded_state_dict, checkpoint_dir):
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
            dcp.save(
                mcore_to_pyt_state_dict(flat, False),
                storage_writer=dcp.FileSystemWriter(checkpoint_dir, single_file_per_rank=False),
                planner=LazySavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False),
            )

        def can_handle_sharded_objects(self):
            return True

    return LazySaveStrategy()


def save_lazy(meta: dict, tp: int, pp: int, fetch: Callable, directory: Path, common: dict | None = None) -> None:
    """Write the tensors of `meta` ({key: (global shape, dtype)}) chunked for (tp, pp) into a dist checkpoint
    directory, each chunk's data from `fetch(key, offsets, sizes)` as the writer reaches it (one process). A
    ValueError a fetch raises (a refused source tensor) comes out as itself, not wrapped by torch's writer."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    shards = layout_shards(meta, tp, pp, range(pp), range(tp), placeholder)
    directory.mkdir(parents=True, exist_ok=True)
    state = {**(common or {}), "tensors": shards}
    try:
        dist_checkpointing.save(state, str(directory), sharded_strategy=_lazy_save_strategy(fetch))
    except CheckpointException as err:
        refused = [e for e, _ in err.failures.values() if isinstance(e, ValueError)]
        if not refused:
            raise
        raise refused[0] from None


# ---- the tools ------------------------------------------------------------------------------------------------------


def folder_model_config(src: Path, model_name: str | None, vocab_size: int | None):
    """The T2I config a folder imports as: an official folder's own, or `model_name`'s head on a Qwen3 folder's
    backbone; the vocabulary `vocab_size` when given."""
    from models.t2i.io import qwen3_t2i_config, t2i_folder_config
    from models.t2i.model import get_t2i_config
    from models.t2i.repatch import with_parallel_num

    if not src.is_dir():
        raise CheckpointError(f"import source {src} does not exist")
    if not (src / "config.json").is_file():
        raise CheckpointError(
            f"{src} is neither an official T2I folder nor a Hugging Face Qwen3 folder (no config.json)"
        )
    if (src / "vision_head_config.json").is_file():
        cfg, _ = t2i_folder_config(src)
        if model_name is not None and (p := get_t2i_config(model_name).parallel_num) != cfg.parallel_num:
            cfg = with_parallel_num(cfg, p)  # a P' model started from a P folder (the 16x -> 64x distillation)
    elif model_name is None:
        raise CheckpointError("importing a Hugging Face Qwen3 folder needs --model (e.g. 14B-16x) for the head")
    else:
        cfg = qwen3_t2i_config(src, get_t2i_config(model_name))
    if vocab_size is not None:
        cfg = replace(cfg, llm=replace(cfg.llm, vocab_size=vocab_size))
    return cfg


def import_streaming(
    src: Path,
    dst: Path,
    tp: int,
    pp: int,
    model_name: str | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    check_finite: bool = True,
) -> Path:
    """Official T2I folder or Hugging Face Qwen3 folder -> model-only megatron checkpoint chunked for (tp, pp),
    one layer in memory at a time (needs a process group); with `check_finite` a tensor holding NaN/Inf is refused
    as it is read."""
    cfg = folder_model_config(src, model_name, vocab_size)
    check_layout(cfg, tp, pp)
    fresh_dir(dst)
    source = FolderLayers(src, cfg, seed, check_finite)
    save_lazy(source.meta(), tp, pp, Fetcher(source.read), dst / DIST)
    trainer = {"step": 0, "megatron": megatron_section(cfg, tp, pp, None, None, ["model"])}
    (dst / TRAINER).write_text(json.dumps(trainer, indent=2) + "\n")
    return dst


def reshard_streaming(src: Path, dst: Path, tp: int, pp: int, virtual_pp: int | None = None) -> Fetcher:
    """The dist checkpoint of `src` (model, EMA, optimizer state and common state) rewritten into `dst` chunked for
    (tp, pp), one layer of every key in memory at a time (needs a process group); returns the fetcher used."""
    from megatron.core import dist_checkpointing

    meta = tensor_meta(src / DIST)
    fetch = Fetcher(CheckpointLayers(src / DIST, meta).read)
    common = dist_checkpointing.load_common_state_dict(str(src / DIST))
    save_lazy(meta, tp, pp, fetch, dst / DIST, common)
    return fetch


def export_streaming(
    src: Path, dst: Path, cfg, weights: str, text_tok, image_tok, dtype: torch.dtype, check_finite: bool = True
) -> Path:
    """A megatron checkpoint's `weights` (model or ema) -> official T2I folder in `dtype`: one LLM shard file per
    decoder layer (`model-0000i-of-0000N`), the last one holding the embeddings, final norm and LM head, then the
    index json, config, vision head, projector and tokenizers (needs a process group). With `check_finite` a tensor
    holding NaN/Inf (after the cast) is refused before its file is written."""
    from models.t2i.io import save_llm_shard, shard_name, write_llm_config, write_llm_index, write_t2i_parts
    from models.t2i.megatron.mapping import layer_to_reference, top_to_reference

    prefix = f"{weights}."
    source = CheckpointLayers(src / DIST, tensor_meta(src / DIST, (prefix,)))
    n = cfg.llm.num_hidden_layers
    dst.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    where = f"the {weights} weights of {src}" if check_finite else None  # None: NaN/Inf written as they are
    for i in range(n):
        layer = {k[len(prefix) + len(LAYER_KEY) :]: v for k, v in source.read(i).items()}
        ref = {f"model.layers.{i}.{k}": v for k, v in layer_to_reference(layer, cfg.llm, "te").items()}
        del layer  # the fused qkv / fc1 go; the reference tensors are cast one by one, each original freed
        state = _cast(ref, dtype, where)
        weight_map.update(save_llm_shard(dst, shard_name(i + 1, n + 1), state))
        total += sum(t.nbytes for t in state.values())
        del state
    top = top_to_reference({k[len(prefix) :]: v for k, v in source.read(TOP).items()})
    llm = _cast({k.removeprefix("llm."): v for k, v in top.items() if k.startswith("llm.")}, dtype, where)
    weight_map.update(save_llm_shard(dst, shard_name(n + 1, n + 1), llm))
    write_llm_index(dst, weight_map, total + sum(t.nbytes for t in llm.values()))
    write_llm_config(dst, cfg.llm, dtype)
    parts = {
        p: {k[len(p) + 1 :]: v for k, v in top.items() if k.startswith(p + ".")} for p in ("vision_head", "projector")
    }
    parts = {p: _cast(state, dtype, where) for p, state in parts.items()}
    write_t2i_parts(dst, cfg, text_tok, image_tok, parts["vision_head"], parts["projector"])
    return dst


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype, finite_in: str | None = None) -> dict[str, torch.Tensor]:
    """`state` in `dtype`, contiguous; each source tensor is dropped from `state` as soon as it is cast. With
    `finite_in` (where the tensors come from, for the message) a cast tensor holding NaN/Inf is refused."""
    from models.core.safetensors_file import check_finite

    out = {k: state.pop(k).to(dtype).contiguous() for k in list(state)}
    if finite_in is not None:
        check_finite(out, finite_in)
    return out


# ---- a rank's shard from a source (the engine's model.init_from=<folder>) -------------------------------------------


def fill_sharded(sharded_state: dict, fetch: Callable) -> dict:
    """What `dist_checkpointing.load(sharded_state, ...)` returns, with every ShardedTensor's data fetched from a
    source instead of a checkpoint (`fetch(key, global offsets, sizes)`), chunks read in layer order."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    sharded_state, _, factories = load_preprocess(sharded_state)
    tensors = [v for v in nested_values(sharded_state) if isinstance(v, ShardedTensor)]
    filled = {}
    for sh in sorted(tensors, key=lambda sh: group_of(sh.key, sh.global_offset)):
        sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        filled[id(sh)] = fetch(sh.key, tuple(sh.global_offset), sizes).reshape(sh.local_shape).clone()
    state = dict_list_map_inplace(lambda v: filled[id(v)] if isinstance(v, ShardedTensor) else v, sharded_state)
    return apply_factory_merges(state, factories)
