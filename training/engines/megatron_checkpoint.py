"""The megatron checkpoint format (the offline tools on it, reshard / import / export, are `checkpoint_tools`).

    <ckpt>/
        trainer.json    step, counters and config of the run; `megatron`: the layout it was written with (tp, pp,
                        virtual_pp, dp), the model config (T2IConfig) and what `dist/` holds (model, ema, optimizer)
        rank_00000.pt   per rank: RNG states and loader state (training checkpoints only)
        dist/           a megatron.core.dist_checkpointing directory (torch_dist: metadata.json, common.pt, .metadata,
                        __<rank>_<i>.distcp). Every tensor is stored in global coordinates, so any TP/PP layout loads
                        it (TE's FP8 scaling history, `_extra_state`, is not stored):
            model.<key>     weights under megatron's sharded keys: decoder layers stacked on a leading axis by global
                            layer index (`model.decoder.layers.mlp.linear_fc1.weight` [L, 2F, D]), norm names as in
                            the TE spec (`...linear_qkv.layer_norm_weight`) whichever spec wrote them
            ema.<key>       EMA weights (fp32), same keys
            optimizer.state.{param,exp_avg,exp_avg_sq}.model.<key>   fp32 main weights and Adam state
                            (DistributedOptimizer "fully_reshardable"); its param groups and step live in common.pt

Tensors are chunked per layer and per TP shard of the layout that wrote them (reshard rewrites the chunks for a new
layout; loading at another layout works either way, only less efficiently). Saving uses megatron's torch_dist writer
on GPU machines and `HostSaveStrategy` (the same format, written synchronously from host memory) where there is no
CUDA, so every tool here runs on CPU-only machines over gloo.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from models.core.diffusion_head import HeadConfig
from models.t2i.megatron.config import MegatronParallelConfig, validate_parallel
from models.t2i.megatron.mapping import stage_layers, tp_split
from models.t2i.model import T2IConfig
from models.t2i.qwen3 import Qwen3Config
from training.checkpoint_integrity import CheckpointError, check_dcp_metadata
from training.engines import shutdown_distributed

__all__ = ["CheckpointError"]  # the tools' one-line error (defined with the checkpoint checks)

DIST = "dist"
TRAINER = "trainer.json"
LAYER_KEY = "decoder.layers."
_PREFIX = re.compile(r"^(optimizer\.state\.[^.]+\.)?(model|ema)\.")


# ---- saving without CUDA ------------------------------------------------------------------------------------------


def _host_save_strategy():
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed import checkpoint as dcp

    class HostSaveStrategy(SaveShardedStrategy):
        """megatron's torch_dist format written synchronously with torch.distributed.checkpoint: what
        `TorchDistSaveShardedStrategy` writes, without its CUDA stream synchronisation and CUDA status tensor."""

        def __init__(self):
            super().__init__("torch_dist", 1)

        def save(self, sharded_state_dict, checkpoint_dir):
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
            planner = MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
            dcp.save(
                mcore_to_pyt_state_dict(flat, False),
                storage_writer=dcp.FileSystemWriter(checkpoint_dir),
                planner=planner,
            )

        def can_handle_sharded_objects(self):
            return True

    return HostSaveStrategy()


def save_dist(state: dict, directory: Path, async_save: bool = False):
    """`dist_checkpointing.save` on every rank (megatron's writer on GPU machines, `HostSaveStrategy` without CUDA).
    `async_save`: megatron's torch_dist writer in its asynchronous form; returns the pending `AsyncRequest` (files
    are written when it is scheduled on an `AsyncCallsQueue`, and `metadata.json` by its finalize step)."""
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if async_save:
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        strategy = TorchDistSaveShardedStrategy("torch_dist", 1)
        return dist_checkpointing.save(state, str(directory), sharded_strategy=strategy, async_sharded_save=True)
    strategy = None if torch.cuda.is_available() else _host_save_strategy()
    dist_checkpointing.save(state, str(directory), sharded_strategy=strategy)
    return None


# ---- side file ----------------------------------------------------------------------------------------------------


def t2i_config_to_dict(cfg: T2IConfig) -> dict:
    return asdict(cfg)


def t2i_config_from_dict(d: dict) -> T2IConfig:
    d = dict(d)
    d.pop("caption_dropout", None)  # written by checkpoints before it became a data setting only (data.caption_dropout)
    llm, head = Qwen3Config(**d.pop("llm")), HeadConfig(**d.pop("head"))
    return T2IConfig(llm=llm, head=head, image_sizes=tuple(tuple(s) for s in d.pop("image_sizes")), **d)


def is_megatron_checkpoint(path: str | Path) -> bool:
    return (Path(path) / TRAINER).is_file() and (Path(path) / DIST / "metadata.json").is_file()


def read_trainer(path: str | Path) -> dict:
    """trainer.json of a megatron checkpoint; a one-line error when `path` is not one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not is_megatron_checkpoint(path):
        raise CheckpointError(f"{path} is not a megatron checkpoint (needs {TRAINER} and {DIST}/metadata.json)")
    trainer = json.loads((path / TRAINER).read_text())
    if "megatron" not in trainer:
        raise CheckpointError(f"{path / TRAINER} has no `megatron` section (written by the deepspeed engine?)")
    return trainer


def model_config_of(path: str | Path) -> T2IConfig:
    return t2i_config_from_dict(read_trainer(path)["megatron"]["model"])


def megatron_section(cfg: T2IConfig, tp: int, pp: int, virtual_pp: int | None, dp: int | None, contents) -> dict:
    return {
        "layout": {"tp": tp, "pp": pp, "virtual_pp": virtual_pp, "dp": dp},
        "model": t2i_config_to_dict(cfg),
        "contents": sorted(contents),
    }


def check_layout(cfg: T2IConfig | Qwen3Config, tp: int, pp: int, virtual_pp: int | None = None) -> None:
    """One-line CheckpointError when the model (or its backbone alone: the layout only constrains the backbone)
    cannot run at (tp, pp, virtual_pp)."""
    if isinstance(cfg, Qwen3Config):
        cfg = SimpleNamespace(llm=cfg)
    try:
        validate_parallel(cfg, MegatronParallelConfig(tp=tp, pp=pp, virtual_pp=virtual_pp))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


# ---- chunking tensors for a layout --------------------------------------------------------------------------------


def model_key(sharded_key: str) -> str:
    """The model tensor a checkpoint key belongs to (`optimizer.state.exp_avg.model.x` -> `x`)."""
    return _PREFIX.sub("", sharded_key)


def layout_shards(meta: dict, tp: int, pp: int, stages, tp_ranks, make) -> dict:
    """ShardedTensors of the checkpoint tensors `meta` ({key: (global shape, dtype)}) chunked for a (tp, pp) layout:
    per global layer and per TP piece, restricted to pipeline `stages` and `tp_ranks`; tensors outside the decoder
    layers belong to stage 0, replicated ones to TP rank 0. `make(key, index, shape, dtype)` gives each chunk's data
    (`index`: the chunk's slices of the global tensor). Every chunk is a main replica."""
    from megatron.core.dist_checkpointing import ShardedTensor

    out = {}
    for key, (shape, dtype) in meta.items():
        mkey = model_key(key)
        layered = mkey.startswith(LAYER_KEY)
        axis, pieces = tp_split(mkey)
        n = shape[0] if layered else 0
        layers = [i for s in stages for i in stage_layers(n, pp, s)] if layered else ([None] if 0 in stages else [])
        inner = shape[1:] if layered else shape
        for r in tp_ranks:
            if axis is None and r != 0:
                continue
            parts = [(None, 0, 1)] if axis is None else [(axis, r + j * tp, tp * pieces) for j in range(pieces)]
            for layer in layers:
                for ax, idx, count in parts:
                    index, local = [slice(None)] * len(inner), list(inner)
                    offsets = []
                    if ax is not None:
                        size = inner[ax] // count
                        index[ax], local[ax] = slice(idx * size, (idx + 1) * size), size
                        offsets.append((ax + layered, idx, count))
                    if layered:
                        index, offsets = [layer, *index], [(0, layer, n), *offsets]
                    data = make(key, tuple(index), tuple(local), dtype)
                    out[f"{key}|{layer}|{idx}"] = ShardedTensor.from_rank_offsets(
                        key, data, *offsets, replica_id=0, prepend_axis_num=int(layered)
                    )
    return out


def dist_path(directory: str | Path) -> str:
    """`directory` (a dist_checkpointing folder) as megatron takes it, once its pickled metadata has passed
    `check_dcp_metadata`: every read of a dist folder goes through here first."""
    check_dcp_metadata(directory)
    return str(directory)


def tensor_meta(directory: Path, prefixes: tuple[str, ...] = ("model.", "ema.", "optimizer.")) -> dict:
    """{key: (global shape, dtype)} of the checkpoint's tensors whose key starts with one of `prefixes`."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(dist_path(directory))
    return {k: (tuple(v.global_shape), v.dtype) for k, v in meta.items() if k.startswith(prefixes)}


def load_full(directory: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The full tensors under `prefix` (`model.` or `ema.`) as a full megatron state: layers unstacked to
    `decoder.layers.<i>.<name>`, keys without the prefix (needs a process group; reads everything into memory)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(dist_path(directory))
    wanted = {k: v for k, v in meta.items() if k.startswith(prefix)}
    if not wanted:
        raise CheckpointError(f"{directory} holds no `{prefix}` tensors")
    loaded = dist_checkpointing.load(wanted, dist_path(directory), validate_access_integrity=False)
    out = {}
    for key in wanted:  # `loaded` also holds the checkpoint's common (non-tensor) state
        t = loaded[key]
        name = key[len(prefix) :]
        if name.startswith(LAYER_KEY):
            rest = name[len(LAYER_KEY) :]
            out.update({f"{LAYER_KEY}{i}.{rest}": t[i].clone() for i in range(t.shape[0])})
        else:
            out[name] = t
    return out


# ---- process groups for the offline tools -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def single_process(fn, *args):
    """Run `fn(*args)` inside a one-process gloo group (what dist_checkpointing's load/save need)."""
    _init_group(0, 1, _free_port())
    try:
        return fn(*args)
    finally:
        shutdown_distributed()


def fresh_dir(dst: Path) -> None:
    """A new, empty checkpoint directory (with its `dist/`); an existing non-empty one is an error."""
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"destination {dst} exists and is not empty; choose a new directory")
    (dst / DIST).mkdir(parents=True, exist_ok=True)
