"""Safe image decoding and the two resize policies: nearest aspect bucket (T2I) and ADM centre crop (ImageNet).

Decoding never raises anything but `SkipSample`, whose reason is one of: decode_error, truncated, too_large,
extreme_aspect, too_small, too_few_pixels, unsupported_mode. Size and aspect ratio are checked from the header, before
the pixels are decoded, in this order: at most `max_pixels`, at most `max_aspect` between the long and the short side
(an 8000x1 image would otherwise be scaled to cover a bucket through a 524-megapixel intermediate), then the
tokenize filters: a short side of at least `min_side` and at least `min_pixels` pixels (0: off). `pixel_digest` is the
content hash of a decoded image that `--dedup` compares. Palette, grey, CMYK and alpha images are
converted to RGB (alpha over white) and kept; 16-bit grey maps 0..65535 to 0..255 (value / 257), so a dark 16-bit
image stays dark.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings

import numpy as np
from PIL import Image

CONVERTIBLE_MODES = ("RGB", "RGBA", "LA", "L", "P", "PA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L", "I;16N", "I")
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 64 Mpx; larger images are skipped as decompression bombs
DEFAULT_MAX_ASPECT = 8.0  # long side / short side; the official buckets reach 4


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the stats key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    min_side: int = 0,
    min_pixels: int = 0,
) -> Image.Image:
    """Bytes -> fully loaded RGB PIL image, or SkipSample."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise SkipSample("too_large", f"{w}x{h} exceeds {max_pixels} pixels")
            if max(w, h) > max_aspect * max(1, min(w, h)):
                raise SkipSample("extreme_aspect", f"{w}x{h}: sides differ by more than {max_aspect}x")
            if min(w, h) < min_side:
                raise SkipSample("too_small", f"{w}x{h}: the short side is below --min-side {min_side}")
            if w * h < min_pixels:
                raise SkipSample("too_few_pixels", f"{w}x{h}: fewer than --min-pixels {min_pixels}")
            img.load()
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipSample("too_large", str(e)) from None
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() else "decode_error"
        raise SkipSample(reason, str(e)) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a per-sample skip, never a crash
        raise SkipSample("decode_error", f"{type(e).__name__}: {e}") from None
    return to_rgb(img)


def pixel_digest(img: Image.Image) -> str:
    """sha256 (hex) of a decoded RGB image's shape and pixel bytes: equal for exact duplicates, whatever the file
    format or its compression."""
    arr = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    h = hashlib.sha256("x".join(map(str, arr.shape)).encode() + b":")
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode not in CONVERTIBLE_MODES:
        raise SkipSample("unsupported_mode", img.mode)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    if img.mode.startswith("I"):  # 16-bit grey (PNG opens as I;16 or I): by the format's range, not the image's max
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return img.convert("RGB")


def nearest_bucket(height: int, width: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) bucket closest in aspect ratio, then in area (log scale)."""
    ar, area = math.log(height / width), math.log(height * width)
    return min(sizes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - ar), 6), abs(math.log(s[0] * s[1]) - area)))


def resize_cover_crop(img: Image.Image, height: int, width: int) -> np.ndarray:
    """Scale so the image covers (height, width), then centre crop: uint8 [height, width, 3]."""
    scale = max(height / img.height, width / img.width)
    new = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.uint8)


def adm_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """ImageNet preprocessing of the ADM suite: box-downsample while large, bicubic to `size`, centre crop."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]
