"""Low-memory inference of a loaded BitDance model (either family): bf16 weights, int8 weight-only decoder linears
and sequential offload of the decoder layers to host memory, applied by one call after loading and before sampling
(`apply_inference_memory`), and the bytes each mode keeps on the device (`weight_bytes`, exact from the modules; a
model on the meta device will do), which `cluster.plan.inference` turns into the 14B memory tables.

Weight modes (`WEIGHT_MODES`, the one table of their names):
- fp32: the parameters as they are, cast to fp32 (the reference; tests and CPU).
- bf16: every parameter in bf16, so activations and the KV cache are bf16 too; buffers (RoPE tables, masks) keep
  their dtype. The diffusion head is bf16 as well: the official pipeline computes it in bf16 (autocast), and at 14B
  (1.7B head parameters) an fp32 head would take 3.3 GiB more, which int8 on a 24 GiB card cannot spare. Measured
  on the tiny T2I model (3 prompts x 3 seeds, 10 head steps, CFG 4): 1.1% of the bits differ from fp32 with a bf16
  head, 0.3% with an fp32 one - the head's rounding, not the backbone's, flips most of them.
- int8: bf16, then the linears of the decoder layers (attention q/k/v/o and MLP gate/up/down, no others: not the
  embeddings, LM head, projector or diffusion head) as torchao `Int8Tensor`s via
  `quantize_(layers, Int8WeightOnlyConfig())`: symmetric per-output-channel int8, one fp32 scale and one int8 zero
  point per row. torchao's weight-only matmul casts the int8 weight to the activation dtype on every call and
  multiplies (it runs on CPU and CUDA alike); so it saves memory, not time, unless the model is compiled.

Offload (`LayerOffload`): the decoder layers' tensors stay in host memory (pinned when the device is CUDA); a
forward pre-hook copies a layer's tensors to the device just before it runs and a forward hook puts the host tensors
back after it, dropping the device copy. Everything else (embeddings, LM head, projector, head, norms) and so the KV
cache (allocated next to the weights) live on the device. On CUDA the next layer is copied on a side stream while the
current one computes (`prefetch`): two layers on the device instead of one. Works with int8 layers too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from models.core.diffusion_head import BinaryDiffusionHead

INT8_ROW_BYTES = 5  # per output row of an int8 linear: an fp32 scale and an int8 zero point


@dataclass(frozen=True)
class WeightMode:
    name: str
    dtype: torch.dtype  # every parameter outside the int8 linears, so the activations and the KV cache
    int8_layers: bool  # the decoder layers' linears int8 weight-only
    help: str


WEIGHT_MODES: dict[str, WeightMode] = {
    m.name: m
    for m in (
        WeightMode("fp32", torch.float32, False, "fp32 weights (the reference)"),
        WeightMode("bf16", torch.bfloat16, False, "bf16 weights and compute"),
        WeightMode("int8", torch.bfloat16, True, "int8 weight-only decoder linears, bf16 for the rest"),
    )
}


def weight_mode(name: str) -> WeightMode:
    if name not in WEIGHT_MODES:
        raise ValueError(f"unknown weight mode {name!r}; choose one of {', '.join(WEIGHT_MODES)}")
    return WEIGHT_MODES[name]


# ---- what is what in a model ----------------------------------------------------------------------------------------


def diffusion_heads(model: nn.Module) -> list[BinaryDiffusionHead]:
    return [m for m in model.modules() if isinstance(m, BinaryDiffusionHead)]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The backbone's decoder layers: the `nn.ModuleList` outside the diffusion head with the most parameters
    (`llm.model.layers` of the T2I model, `layers` of the class-conditional one)."""
    in_head = {id(m) for h in diffusion_heads(model) for m in h.modules()}
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and id(m) not in in_head]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def layer_linears(layers: nn.ModuleList) -> list[nn.Linear]:
    """The linears int8 mode converts: every `nn.Linear` inside the decoder layers."""
    return [m for m in layers.modules() if isinstance(m, nn.Linear)]


def plain_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The ordinary tensors holding a tensor's data (the inner tensors of a subclass such as torchao's Int8Tensor)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from plain_tensors(getattr(t, n))
    else:
        yield t


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (int8 data, scales and zero points included)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(x.numel() * x.element_size() for t in tensors for x in plain_tensors(t))


def weight_bytes(model: nn.Module, mode: str, offload: bool = False, prefetch: bool = True) -> dict[str, int]:
    """Bytes of the model's parameters and buffers after `apply_inference_memory(model, mode, offload)`, from the
    module shapes alone (the model may be on the meta device): "device" (at most on the device: with offload the
    non-layer part plus the largest layer's copy, two of them with `prefetch`), "host" (the offloaded layers, all
    of them), "layers", "head" and "other" (the rest: embeddings, LM head, projector, norms, buffers)."""
    m = weight_mode(mode)
    layers = decoder_layers(model)
    int8 = {id(lin.weight) for lin in layer_linears(layers)} if m.int8_layers else set()
    width = torch.empty((), dtype=m.dtype).element_size()

    def nbytes(mod: nn.Module) -> int:
        out = sum(b.numel() * b.element_size() for b in mod.buffers())
        for p in mod.parameters():
            if id(p) in int8:
                out += p.numel() + p.shape[0] * INT8_ROW_BYTES
            else:
                out += p.numel() * (width if p.is_floating_point() else p.element_size())
        return out

    per_layer = [nbytes(layer) for layer in layers]
    head, total = sum(nbytes(h) for h in diffusion_heads(model)), nbytes(model)
    other = total - sum(per_layer) - head
    on_device = total
    if offload:
        on_device = total - sum(per_layer) + min(2 if prefetch else 1, len(per_layer)) * max(per_layer, default=0)
    host = sum(per_layer) if offload else 0
    return {"device": on_device, "host": host, "layers": sum(per_layer), "head": head, "other": other}


# ---- applying a mode ------------------------------------------------------------------------------------------------


def quantize_layers_int8(layers: nn.ModuleList, device: torch.device | str = "cpu", to_host: bool = False) -> int:
    """Replace the weights of every linear in `layers` with torchao int8 weight-only tensors, one layer at a time on
    `device` (fast on a GPU, and never more than one layer's bf16 weights there); with `to_host` each quantized layer
    goes back to the CPU. The number of linears converted."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise RuntimeError(f"int8 weights need torchao (pip install torchao): {err}") from None
    config = Int8WeightOnlyConfig(set_inductor_config=False)  # leave torch.compile's global settings alone
    for layer in layers:
        quantize_(layer, config, lambda m, _: isinstance(m, nn.Linear), device)
        if to_host:
            layer.to("cpu")
    return len(layer_linears(layers))


def _entries(layer: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(module, name, is_parameter) of every tensor of a layer."""
    out = []
    for mod in layer.modules():
        out += [(mod, n, True) for n, p in mod._parameters.items() if p is not None]
        out += [(mod, n, False) for n, b in mod._buffers.items() if b is not None]
    return out


def _pinned(t: torch.Tensor) -> torch.Tensor:
    try:
        return t.pin_memory()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without pinning: pageable copies, still correct
        return t


@dataclass
class LayerOffload:
    """Decoder layers kept in host memory and run on `device` one (or, prefetching, two) at a time. `runs` counts
    layer forwards, `copies` host-to-device layer copies, `peak_layers` / `peak_bytes` the most layers (their bytes)
    on the device at once."""

    layers: nn.ModuleList
    device: torch.device
    prefetch: bool = True
    runs: int = 0
    copies: int = 0
    peak_layers: int = 0
    peak_bytes: int = 0
    _host: list[list[torch.Tensor]] = field(default_factory=list, repr=False)
    _pending: dict[int, tuple[list[torch.Tensor], object]] = field(default_factory=dict, repr=False)
    _on_device: set[int] = field(default_factory=set, repr=False)
    _handles: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda and self.prefetch else None
        for i, layer in enumerate(self.layers):
            layer.to("cpu")
            host = [_pinned(self._get(e)) if cuda else self._get(e) for e in _entries(layer)]
            self._host.append(host)
            self._install(i, host)
            self._handles.append(layer.register_forward_pre_hook(partial(self._before, i)))
            self._handles.append(layer.register_forward_hook(partial(self._after, i)))

    @staticmethod
    def _get(entry: tuple[nn.Module, str, bool]) -> torch.Tensor:
        mod, name, is_param = entry
        return (mod._parameters if is_param else mod._buffers)[name].detach()

    def _install(self, i: int, tensors: list[torch.Tensor]) -> None:
        for (mod, name, is_param), t in zip(_entries(self.layers[i]), tensors, strict=True):
            if is_param:
                mod._parameters[name] = nn.Parameter(t, requires_grad=False)
            else:
                mod._buffers[name] = t

    def _copy(self, i: int) -> list[torch.Tensor]:
        """Layer i's tensors on the device (always new tensors, also when the device is the CPU)."""
        self.copies += 1
        self._on_device.add(i)
        self.peak_layers = max(self.peak_layers, len(self._on_device))
        self.peak_bytes = max(self.peak_bytes, sum(self.layer_bytes(j) for j in self._on_device))
        return [t.clone() if t.device == self.device else t.to(self.device, non_blocking=True) for t in self._host[i]]

    def layer_bytes(self, i: int) -> int:
        return sum(x.numel() * x.element_size() for t in self._host[i] for x in plain_tensors(t))

    def _before(self, i: int, module: nn.Module, args: tuple) -> None:
        self.runs += 1
        if i in self._pending:  # copied on the side stream while the previous layer ran
            tensors, event = self._pending.pop(i)
            main = torch.cuda.current_stream(self.device)
            main.wait_event(event)
            for t in tensors:
                for x in plain_tensors(t):
                    x.record_stream(main)  # the allocator must not reuse it before the main stream is done with it
        else:
            tensors = self._copy(i)
        self._install(i, tensors)
        nxt = (i + 1) % len(self.layers)
        if self._stream is not None and nxt != i and nxt not in self._pending:
            with torch.cuda.stream(self._stream):
                ahead = self._copy(nxt)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._pending[nxt] = (ahead, event)

    def _after(self, i: int, module: nn.Module, args: tuple, output) -> None:
        self._install(i, self._host[i])
        self._on_device.discard(i)

    def remove(self) -> None:
        """Remove the hooks and drop prefetched copies; the layers stay in host memory."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for i in self._pending:
            self._on_device.discard(i)
        self._pending.clear()


@dataclass
class InferenceMemory:
    """What `apply_inference_memory` did: the mode, the linears made int8, and the offloader (None without)."""

    mode: WeightMode | None  # None: the dtypes were left as loaded
    int8_linears: int
    offload: LayerOffload | None
    device_bytes: int  # parameters and buffers resident on the device between layer runs


def apply_inference_memory(
    model: nn.Module,
    mode: str | None,
    offload: bool = False,
    device: torch.device | str | None = None,
    prefetch: bool = True,
) -> InferenceMemory:
    """Turn a loaded model into `mode`'s weights (None: keep the dtypes it was loaded with) and put it on `device`
    (None: where its parameters are), its decoder layers offloaded to host memory when `offload`. For a model larger
    than the device, load it on the CPU and let this move it. Call it once, before sampling; the samplers need no
    change. Errors are one line (unknown mode, torchao missing)."""
    m = weight_mode(mode) if mode is not None else None
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    layers = decoder_layers(model)
    for p in model.parameters() if m else ():  # parameters only: buffers (RoPE tables, masks) keep their dtype
        if p.is_floating_point() and p.dtype != m.dtype:
            p.data = p.data.to(m.dtype)
    n_int8 = quantize_layers_int8(layers, device, to_host=offload) if m and m.int8_layers else 0
    off = None
    if offload:
        inside = {id(x) for x in layers.modules()}
        for mod in model.modules():
            if id(mod) not in inside:
                mod._apply(lambda t: t.to(device), recurse=False)
        off = LayerOffload(layers, device, prefetch)
    else:
        model.to(device)
    host = sum(off.layer_bytes(i) for i in range(len(layers))) if off else 0
    return InferenceMemory(m, n_int8, off, tensor_bytes(model) - host)
