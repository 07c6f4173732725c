"""ImageNet sample files and metrics: the ADM `.npz` writer, and FID / Inception Score from local Inception weights.

`NpzWriter` fills a memory-mapped `.npy` chunk by chunk and zips it into the uncompressed `arr_0` npz the ADM
evaluation suite reads. `compute_metrics` streams images (npz or folder) through a feature extractor, torch-fidelity's
TF-compatible InceptionV3 ('2048' pool features, 'logits_unbiased') loaded from a local file by default, and computes
FID against reference statistics (`mu`/`sigma`, or the images `arr_0` of an ADM reference batch) and the Inception
Score with torch-fidelity's formulas (10 splits after a seeded shuffle, so class-ordered samples are not biased).

`python -m eval.imagenet_metrics samples.npz --ref-stats VIRTUAL_imagenet256_labeled.npz --inception-weights W.pth`
"""

from __future__ import annotations

import argparse
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.scorers import MissingScorerError, write_summary

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's converted TF Inception weights
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class NpzWriter:
    """Writes uint8 [total, height, width, 3] images as `<path>` (key `arr_0`) without holding them in memory.

    The final file only appears on `close()` (temp file + os.replace); `close()` refuses while images are missing.
    """

    def __init__(self, path: str | Path, total: int, height: int = 256, width: int = 256):
        if total <= 0 or height <= 0 or width <= 0:
            raise ValueError(f"NpzWriter needs positive total/height/width, got {total}, {height}, {width}")
        self.path = Path(path)
        self.shape = (int(total), int(height), int(width), 3)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.arr_0.npy")
        self._array = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.uint8, shape=self.shape)
        self._written = np.zeros(total, dtype=bool)

    def add(self, batch: np.ndarray, start: int) -> None:
        """Store `batch` (uint8 [B, height, width, 3]) as images start .. start + B - 1."""
        if self._array is None:
            raise RuntimeError(f"NpzWriter for {self.path} is already closed")
        batch = np.asarray(batch)
        if batch.dtype != np.uint8:
            raise TypeError(f"NpzWriter.add expects uint8 images, got {batch.dtype} (convert with clip + round first)")
        if batch.ndim != 4 or batch.shape[1:] != self.shape[1:]:
            raise ValueError(f"NpzWriter.add expects [B, {self.shape[1]}, {self.shape[2]}, 3], got {list(batch.shape)}")
        stop = start + batch.shape[0]
        if start < 0 or stop > self.shape[0]:
            raise IndexError(f"images {start}..{stop - 1} are outside 0..{self.shape[0] - 1}")
        self._array[start:stop] = batch
        self._written[start:stop] = True

    def close(self) -> Path:
        """Zip the filled array into `<path>` as `arr_0.npy` (stored, zip64) atomically; delete the temp file."""
        if self._array is None:
            raise RuntimeError(f"NpzWriter for {self.path} is already closed")
        if not self._written.all():
            missing = np.flatnonzero(~self._written)
            raise RuntimeError(f"{len(missing)} of {self.shape[0]} images never written (first missing: {missing[0]})")
        self._array.flush()
        self._array = None  # drops the memmap
        tmp_zip = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.write(self._tmp, arcname="arr_0.npy")
        os.replace(tmp_zip, self.path)
        self._tmp.unlink()
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; no final file is produced."""
        self._array = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._array is not None:
            self.close()


def _iter_npz(path: Path, batch_size: int) -> Iterator[np.ndarray]:
    """Streams `arr_0` of an npz (or a .npy) in batches, reading the zip member sequentially."""
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        _check_images(arr.shape, arr.dtype, path)
        for i in range(0, arr.shape[0], batch_size):
            yield np.ascontiguousarray(arr[i : i + batch_size])
        return
    with zipfile.ZipFile(path) as zf:
        if "arr_0.npy" not in zf.namelist():
            raise KeyError(f"{path} has no arr_0 (keys: {[n.removesuffix('.npy') for n in zf.namelist()]})")
        with zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f"{path}: unsupported .npy format version {version}")
            shape, fortran, dtype = read_header[version](f)
            _check_images(shape, dtype, path)
            if fortran:
                raise ValueError(f"{path}: arr_0 is Fortran-ordered; save it C-ordered")
            per_image = int(np.prod(shape[1:]))
            for i in range(0, shape[0], batch_size):
                b = min(batch_size, shape[0] - i)
                data = f.read(b * per_image)
                if len(data) != b * per_image:
                    raise ValueError(f"{path}: arr_0 is truncated at image {i}")
                yield np.frombuffer(data, dtype=np.uint8).reshape(b, *shape[1:]).copy()  # writable for torch


def _check_images(shape, dtype, path) -> None:
    if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: expected uint8 [N, H, W, 3] images, got {np.dtype(dtype)} {list(shape)}")


def iter_images(npz_or_folder: str | Path, batch_size: int = 50) -> Iterator[np.ndarray]:
    """uint8 [B, H, W, 3] batches from an ADM npz/npy, or from the image files under a folder (sorted by path)."""
    path = Path(npz_or_folder)
    if path.is_file():
        yield from _iter_npz(path, batch_size)
        return
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {path}")
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    for i in range(0, len(files), batch_size):
        batch = [np.asarray(Image.open(p).convert("RGB")) for p in files[i : i + batch_size]]
        if len({b.shape for b in batch}) != 1:
            raise ValueError(f"images under {path} differ in size ({sorted({b.shape for b in batch})}); resize them")
        yield np.stack(batch)


class GaussianStats:
    """Streaming mean and covariance (float64, pairwise merges) of feature rows; `sigma` matches np.cov."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        if len(x) == 0:
            return
        mb = x.mean(0)
        m2b = (x - mb).T @ (x - mb)
        if self.n == 0:
            self.n, self.mean, self.m2 = len(x), mb, m2b
            return
        n, delta = self.n + len(x), mb - self.mean
        self.mean = self.mean + delta * (len(x) / n)
        self.m2 = self.m2 + m2b + np.outer(delta, delta) * (self.n * len(x) / n)
        self.n = n

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError("a covariance needs at least 2 samples")
        return self.m2 / (self.n - 1)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str = "auto") -> float:
    """tr sqrt(sigma1 @ sigma2) for covariance matrices: scipy's sqrtm (as ADM / pytorch-fid) when `method` is
    "scipy" or "auto" with scipy installed, else via symmetric eigendecompositions: tr sqrt(A^1/2 B A^1/2)."""
    if method == "auto":
        try:
            import scipy.linalg  # noqa: F401

            method = "scipy"
        except ImportError:
            method = "eigh"
    if method == "scipy":
        import scipy.linalg

        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():  # singular product: offset the diagonals, as ADM does
            offset = np.eye(len(sigma1)) * 1e-6
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"sqrtm has an imaginary component {np.abs(covmean.imag).max():.3g}")
            covmean = covmean.real
        return float(np.trace(covmean))
    if method != "eigh":
        raise ValueError(f"unknown method {method!r} (auto, scipy, eigh)")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root @ sigma2 @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of two Gaussians: |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def inception_score(logits, splits: int = 10, seed: int | None = 2020) -> tuple[float, float]:
    """(mean, std) over `splits` of exp(E_x KL(p(y|x) || p(y))), p = softmax(logits); rows shuffled by `seed`."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} images, got {n}")
    if seed is not None:
        logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    log_p = logits.log_softmax(dim=1)
    p = log_p.exp()
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(0, keepdim=True)
        kl = torch.where(p[lo:hi] > 0, p[lo:hi] * (log_p[lo:hi] - q.log()), 0.0).sum(1).mean()
        scores.append(math.exp(kl.item()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_extractor(inception_weights: str | None, device: str | torch.device | None = None) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 returning ('2048' features, 'logits_unbiased') from a local weights file."""
    hint = f"pass --inception-weights /path/to/{INCEPTION_FILE} (torch-fidelity's file); nothing is downloaded"
    if not inception_weights:
        raise MissingScorerError(f"ImageNet FID needs Inception weights: {hint}")
    if not Path(inception_weights).is_file():
        raise MissingScorerError(f"Inception weights not found at {inception_weights}: {hint}")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise MissingScorerError(
            f"ImageNet FID needs torch-fidelity 0.4.0, which imports torchvision ({e}): "
            "pip install -e '.[eval]' and the torchvision build matching your torch"
        ) from e
    net = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(inception_weights)
    )
    return net.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _module_device(fn) -> torch.device:
    if isinstance(fn, torch.nn.Module):
        for t in (*fn.parameters(), *fn.buffers()):
            return t.device
    return torch.device("cpu")


@torch.no_grad()
def extract(source: str | Path, feature_extractor: Callable, batch_size: int = 50) -> tuple[GaussianStats, Any]:
    """Feature statistics of all images in `source` and their logits ([N, K], or None without a classifier)."""
    stats, logits, device = GaussianStats(), [], _module_device(feature_extractor)
    for batch in iter_images(source, batch_size):
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)
        out = feature_extractor(x)
        feats, lg = (out[0], out[1] if len(out) > 1 else None) if isinstance(out, tuple | list) else (out, None)
        stats.update(feats.double().cpu().numpy())
        if lg is not None:
            logits.append(lg.float().cpu())
    return stats, (torch.cat(logits).numpy() if logits else None)


def load_reference(ref_stats: str | Path, feature_extractor: Callable, batch_size: int = 50) -> tuple[Any, Any]:
    """(mu, sigma) from a statistics npz (`mu`, `sigma`) or, lacking those, from the images `arr_0` it holds."""
    with np.load(ref_stats) as ref:
        if "mu" in ref.files and "sigma" in ref.files:
            return ref["mu"].astype(np.float64), ref["sigma"].astype(np.float64)
        if "arr_0" not in ref.files:
            raise KeyError(f"{ref_stats} has neither mu/sigma nor arr_0 images (keys: {ref.files})")
    stats, _ = extract(ref_stats, feature_extractor, batch_size)
    return stats.mean, stats.sigma


def compute_metrics(
    npz_or_folder: str | Path,
    ref_stats: str | None,
    inception_weights: str | None,
    feature_extractor: Callable | None = None,
    batch_size: int = 50,
    is_splits: int = 10,
    device: str | None = None,
) -> dict:
    """FID against `ref_stats` (skipped when None) and Inception Score of the images in `npz_or_folder`.

    `feature_extractor` (uint8 [B, 3, H, W] -> features [B, D] or (features, logits [B, K])) replaces the Inception
    network, e.g. a tiny stand-in in tests; without it `inception_weights` must name torch-fidelity's local file,
    otherwise MissingScorerError. Returns {"images", "fid"?, "inception_score"?, "inception_score_std"?}.
    """
    fn = feature_extractor if feature_extractor is not None else inception_extractor(inception_weights, device)
    stats, logits = extract(npz_or_folder, fn, batch_size)
    result: dict = {"images": stats.n}
    if ref_stats is not None:
        mu, sigma = load_reference(ref_stats, fn, batch_size)
        if mu.shape != stats.mean.shape:
            raise ValueError(f"{ref_stats} holds {mu.shape[0]}-d statistics; the extractor gives {stats.mean.shape[0]}")
        result["fid"] = fid_from_stats(stats.mean, stats.sigma, mu, sigma)
    if logits is not None:
        result["inception_score"], result["inception_score_std"] = inception_score(logits, is_splits)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval.imagenet_metrics", description=__doc__.splitlines()[0])
    p.add_argument("samples", help="ADM .npz (arr_0 uint8 [N, H, W, 3]) or a folder of images")
    p.add_argument("--ref-stats", help="reference npz: mu/sigma, or an ADM reference batch (arr_0)")
    p.add_argument("--inception-weights", help=f"torch-fidelity's {INCEPTION_FILE}")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", help="default: cuda when available")
    p.add_argument("--summary-dir", help="merge the result into <dir>/summary.json (default: next to the samples)")
    args = p.parse_args(argv)
    try:
        result = compute_metrics(
            args.samples, args.ref_stats, args.inception_weights, batch_size=args.batch_size, device=args.device
        )
    except MissingScorerError as e:
        raise SystemExit(f"error: {e}") from None
    samples = Path(args.samples)
    write_summary(args.summary_dir or (samples if samples.is_dir() else samples.parent), "imagenet", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
