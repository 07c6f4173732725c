"""Weighted mixtures of tokenized datasets (`data.sources`): which source each sample of a slot comes from, the weight
stages of a run, the mixture's identity, and the checks that its sources can feed one model and one batching.

Draw: the j-th sample a slot takes from the mixture comes from source i when u_j falls in i's interval of [0, 1)
(widths: the weights over their sum); u_j = frac(c + j * 0.618...) is a golden-ratio (Weyl) sequence whose offset c is
seeded by (seed, layout generation, slot). A function of (seed, slot, j) alone, it is replayable and needs no state;
over the seeded offset each source's probability is its weight, and unlike independent draws the shares of any n
consecutive samples are within O(log n / n) of the weights (like Megatron's blended datasets, without their running
error, so stages and replays stay simple).

Stages: a run resumed with other weights starts a stage at the batch it resumes from: the samples a slot draws while
planning that batch and later ones use the new weights; the samples drawn before (waiting in the T2I packer's
lookahead) are placed as they were drawn. Every source's stream goes on where it stopped, so no sample of a source is
seen twice before its epoch ends. The stages are part of the loader state, and replay draws each sample with its
stage's weights, so resumption stays exact.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from data_pipeline.loader.packing import seed_of
from data_pipeline.loader.settings import LoaderError, MixtureSource

GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd: j * GOLDEN mod 2**64 visits [0, 2**64) evenly
Stage = tuple[int, list[float]]  # (batch of the rank at which it starts, normalized weights)


def normalized(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def mixture_offset(seed: int, generation: int, slot: int) -> int:
    return seed_of("mixture", seed, generation, slot) << 1  # (seed_of gives 63 bits)


def draw(offset: int, j: int, edges: list[float]) -> int:
    """The source of a slot's j-th sample: where u_j falls among the cumulative weights `edges` (all but the last)."""
    u = ((offset + j * GOLDEN) & 0xFFFFFFFFFFFFFFFF) / 2.0**64
    return bisect.bisect_right(edges, u)


def edges_of(weights: list[float]) -> list[float]:
    out, acc = [], 0.0
    for w in weights[:-1]:
        acc += w
        out.append(acc)
    return out


def slot_stages(stages: list[Stage], logical_worker: int, workers: int) -> list[tuple[int, list[float]]]:
    """The stages of one slot as (its own batch count at which each starts, cumulative edges): global batch n of a
    rank is batch n // workers of logical worker n % workers, so a stage starting at n starts for worker w at its
    batch n // workers + (1 if w < n % workers else 0)."""
    out = []
    for n, weights in stages:
        start = n // workers + (1 if logical_worker < n % workers else 0)
        out.append((start, edges_of(weights)))
    return out


def same_weights(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-12 for x, y in zip(a, b, strict=True))


def mixture_fingerprint(fingerprints: list[str]) -> str:
    """The dataset fingerprint of the loader state: a lone source's own (so `data.sources` with one source and
    `data.data_dir` are the same run), else a hash of the sources' fingerprints in order (not of the weights)."""
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.sha256(json.dumps(["mixture", *fingerprints]).encode()).hexdigest()[:16]


def _properties(m: dict) -> list[tuple[str, Any, str]]:
    """(what, value, how to make it match) of a manifest, for the sources' compatibility check."""
    identity = m.get("identity", {})
    out = [
        ("kind", m.get("kind"), "mix datasets of one kind"),
        ("bits per token", m.get("bits_per_token"), "tokenize every source with the same --tokenizer"),
        ("downsample", m.get("downsample"), "tokenize every source with the same --tokenizer"),
    ]
    if "image_tokenizer_sha256" in identity:
        out.append(("image tokenizer", identity["image_tokenizer_sha256"][:12], "tokenize with the same --tokenizer"))
    if m.get("kind") == "t2i":
        text = m.get("text_tokens", {})
        out.append(("P", text.get("parallel_num"), "tokenize every source with the same --parallel-num"))
        out.append(("text token ids", text, "tokenize every source with the same --text-tokenizer"))
    if m.get("kind") == "imagenet":
        out.append(("image size", identity.get("image_size"), "tokenize every source with the same --image-size"))
    return out


def check_compatible(manifests: list[dict], names: list[str]) -> None:
    """Every source must be readable by one batching for one model: one-line LoaderError naming the first mismatch
    (a property one of the two manifests does not record is not compared)."""
    first = _properties(manifests[0])
    for manifest, name in zip(manifests[1:], names[1:], strict=True):
        theirs = {what: value for what, value, _ in _properties(manifest)}
        for what, want, fix in first:
            got = theirs.get(what, want)
            if got != want:
                shown = (lambda v: f"{str(v)[:40]}...") if what == "text token ids" else repr
                raise LoaderError(
                    f"data.sources: {name} has {what} {shown(got)} but {names[0]} has {shown(want)}; a mixture needs "
                    f"one {what}: {fix}"
                )


def merged_manifest(manifests: list[dict]) -> dict:
    """The manifest a model and batching are built from: the first source's, with every source's image sizes."""
    if len(manifests) == 1:
        return manifests[0]
    out = {**manifests[0], "identity": dict(manifests[0].get("identity", {}))}
    sizes: list[list[int]] = []
    histogram: dict[str, int] = {}
    for m in manifests:
        for s in m.get("identity", {}).get("sizes", []):
            if list(s) not in sizes:
                sizes.append(list(s))
        for k, v in m.get("size_histogram", {}).items():
            histogram[k] = histogram.get(k, 0) + int(v)
    if sizes:
        out["identity"]["sizes"] = sizes
    if histogram:
        out["size_histogram"] = histogram
    return out


def data_manifest(data: Any) -> dict:
    """The manifest a task builds its model from, for a training config's `data` section (`data_dir`, or `sources`
    checked to be compatible); a URL is read through fsspec."""
    from data_pipeline.loader.shard_store import ShardStore

    sources = [s if isinstance(s, MixtureSource) else MixtureSource(**s) for s in (data.sources or [])]
    sources = sources or [MixtureSource(str(data.data_dir))]
    manifests = [ShardStore(s.dir).manifest() for s in sources]
    check_compatible(manifests, [s.label for s in sources])
    return merged_manifest(manifests)
