"""Next-patch sampling under torch.compile at fixed shapes (`SamplingConfig.compile`): one compiled graph per shape
serves every step of a run, whatever the number of patches.

- Rows: a call's n images are padded to `row_bucket(n)` (the next power of two) by repeating the last condition
  (`models.core.next_patch.pad_conditions`), so batches of 3 and 4 images share graphs; padded rows are dropped.
- Head (`FixedShapeHead`): the noise is drawn outside the compiled code, before the steps, by the calls the eager
  sampler makes from the same generators, for the real rows only (`em_noise`; padded rows get zeros), so the random
  streams are the eager ones. On CPU the N Euler-Maruyama steps and the last step are one compiled graph
  (`euler_maruyama_loop`, a torch.while_loop: one copy of the step, one call per next-patch step) with inductor's C++
  wrapper. On CUDA each step is compiled with mode="reduce-overhead", which replays the steps as CUDA graphs (not
  tested here: no GPU in CI). The unguided first step of the linear guidance schedule (2n rows, once per call) runs
  eagerly: not worth a graph.
- Decoder: each family compiles its patch step (`compiled`) over a KV cache preallocated at full length; the written
  columns and the attention mask are tensors (`KVCache.update` with tensor positions), so no step changes a shape.
So a run compiles two graphs per row bucket and image shape (the head loop and the decoder step), however many patches.

Numbers: the step arithmetic and the noise are the eager ones; inductor's kernels (layer norms, softmax, fused
activations) round differently in the last bits, so the continuous head outputs differ by float rounding (~3e-6 at
|x| <= 1.5 on the tiny models) and a bit whose value lands within that rounding of 0 can flip; none did in the tests
(tests/models/test_compiled_sampler.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from models.core.head_sampler import (
    Generators,
    NetFn,
    em_coefficients,
    em_last,
    em_noise,
    em_step,
    euler_maruyama,
    euler_maruyama_loop,
)


def row_bucket(n: int) -> int:
    """The padded image count of a compiled call: the next power of two >= n."""
    if n < 1:
        raise ValueError(f"need at least one image, got {n}")
    return 1 << (n - 1).bit_length()


@functools.cache
def compiled(fn: Callable, device_type: str, cuda_graphs: bool = False) -> Callable:
    """`fn` under torch.compile at static shapes for devices of `device_type`, one cache per function, reused by every
    call of a process. On CPU with inductor's C++ wrapper (its Python wrapper costs as much as the small kernels it
    calls); `cuda_graphs` (CUDA, for functions that mutate none of their inputs): mode="reduce-overhead"."""
    if device_type == "cuda":
        return torch.compile(fn, dynamic=False, mode="reduce-overhead" if cuda_graphs else None)
    return torch.compile(fn, dynamic=False, options={"cpp_wrapper": device_type == "cpu"})


def _pad_groups(t: torch.Tensor, groups: int, n_pad: int, dim: int) -> torch.Tensor:
    """[..., groups * n, ...] -> [..., groups * n_pad, ...] along `dim`: zero rows after each group's n rows."""
    t = t.unflatten(dim, (groups, -1))
    missing = n_pad - t.shape[dim + 1]
    if missing:
        t = torch.cat([t, t.new_zeros((*t.shape[: dim + 1], missing, *t.shape[dim + 2 :]))], dim=dim + 1)
    return t.flatten(dim, dim + 1)


class FixedShapeHead:
    """The head sampler of a compiled next-patch run: guided or unguided Euler-Maruyama over rows padded from
    `n_images` to `n_pad` per row group, the noise of the real rows drawn eagerly in the eager sampler's order."""

    def __init__(
        self,
        net: NetFn,
        latent_dim: int,
        num_steps: int,
        time_shift: float,
        batched_cfg: bool,
        n_images: int,
        n_pad: int,
        device: torch.device,
    ):
        self.net, self.latent_dim, self.num_steps, self.time_shift = net, latent_dim, num_steps, time_shift
        self.batched_cfg, self.n_images, self.n_pad, self.device = batched_cfg, n_images, n_pad, device
        self.coef = em_coefficients(num_steps, time_shift).to(device)

    def __call__(
        self, cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float, generator: Generators
    ) -> torch.Tensor:
        """x [R, P, C] for conditions [R, P, D] (R = groups * n_pad; uncond: the same rows' null conditions or None).
        Group g's real rows are g * n_pad .. g * n_pad + n_images - 1 and draw their noise from `generator` as
        `euler_maruyama` would for those rows alone; the padded rows get zero noise."""
        groups, n = cond.shape[0] // self.n_pad, self.n_images
        if groups > 1:  # the unguided first step of the linear schedule (2n rows): once per call, eager
            real = torch.cat([cond[g * self.n_pad : g * self.n_pad + n] for g in range(groups)])
            x = euler_maruyama(self.net, real, self.latent_dim, self.num_steps, 1.0, None, self.time_shift, generator)
            return _pad_groups(x, groups, self.n_pad, 0)
        shape = (n, cond.shape[1], self.latent_dim)
        x0, eps = em_noise(shape, self.device, generator, self.num_steps)
        x0, eps = _pad_groups(x0, 1, self.n_pad, 0), _pad_groups(eps, 1, self.n_pad, 1)
        w = torch.full((), cfg_scale, dtype=torch.float32, device=self.device)
        guided = uncond is not None
        args = (torch.cat([cond, uncond]) if guided else cond, guided, w, self.batched_cfg)
        if self.device.type != "cuda":
            return compiled(euler_maruyama_loop, self.device.type)(self.net, x0, eps, self.coef, *args)
        torch.compiler.cudagraph_mark_step_begin()  # a new replay: the last call's outputs may be overwritten
        x = x0
        for i in range(self.num_steps):
            x = compiled(em_step, "cuda", cuda_graphs=True)(self.net, x, self.coef[i], eps[i], *args)
        return compiled(em_last, "cuda", cuda_graphs=True)(self.net, x, self.coef[-1], *args).clone()
