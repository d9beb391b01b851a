"""Aspect-ratio buckets: which (height, width) each training image is resized and cropped to.

Everything here is in pixels and every size pair is (height, width), the order of tensor shapes, not PIL's
(width, height). Bucket sides are multiples of 16 because Z-Image latents are 8× downsampled by the VAE and
then split into 2×2 patches.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from PIL import Image

Bucket = tuple[int, int]  # (height, width) in pixels


def make_buckets(resolution: int, multiple: int = 16, max_aspect: float = 4.0) -> list[Bucket]:
    """All (height, width) buckets for a training resolution, sorted by height.

    Each bucket has both sides a multiple of `multiple` and an area as close as possible to, never above,
    `resolution**2` (always ≥ `(1 - multiple / resolution) * resolution**2`). Aspect ratios run from
    `1 / max_aspect` (tall) to `max_aspect` (wide); the set is symmetric, so every wide bucket has a tall twin.
    At 1024 this gives 65 buckets from (512, 2048) through (1024, 1024) to (2048, 512).
    """
    if resolution < multiple or resolution % multiple:
        lower = max(multiple, resolution // multiple * multiple)
        raise ValueError(
            f"resolution must be a positive multiple of {multiple} pixels (got {resolution}): "
            f"use {lower} or {lower + multiple}"
        )
    buckets = set()
    # Walk the short side up to the square; the long side is the largest multiple that keeps the area budget.
    for short in range(multiple, resolution + 1, multiple):
        long = resolution * resolution // short // multiple * multiple
        if long / short <= max_aspect + 1e-9:
            buckets.add((short, long))
            buckets.add((long, short))
    return sorted(buckets)


def assign_bucket(height: int, width: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to the image's (in log space, so 2:1 and 1:2 are equally far
    from 1:1). Ties go to the larger area, which loses less detail. Sizes in pixels, (height, width)."""
    if not buckets:
        raise ValueError("no buckets to choose from: build them with make_buckets(resolution)")
    log_aspect = math.log(height / width)

    def distance(bucket: Bucket) -> tuple[float, int, Bucket]:
        bh, bw = bucket
        # Rounded so float noise cannot break a genuine tie; the bucket itself makes the order total.
        return round(abs(math.log(bh / bw) - log_aspect), 9), -bh * bw, bucket

    return min(buckets, key=distance)


@dataclass(frozen=True)
class CropBox:
    """How one image becomes one bucket: resize to (resized_h, resized_w), then crop the (height, width)
    bucket whose top-left corner is at (top, left) in the resized image. All values in pixels."""

    resized_h: int
    resized_w: int
    top: int
    left: int
    height: int
    width: int

    def to_original(self, orig_h: int, orig_w: int) -> tuple[float, float, float, float]:
        """The crop as (left, top, right, bottom) in ORIGINAL image pixels (PIL box order), e.g. to store the
        crop with a cached latent or to draw it for a user. Floats because the resize is fractional."""
        sy, sx = orig_h / self.resized_h, orig_w / self.resized_w
        return (self.left * sx, self.top * sy, (self.left + self.width) * sx, (self.top + self.height) * sy)


def upscale_factor(orig_h: int, orig_w: int, bucket: Bucket) -> float:
    """How much an (orig_h, orig_w) image must be enlarged to cover `bucket`; ≤ 1 means it only shrinks.
    Callers compare this with a `max_upscale` limit to skip images too small for the bucket."""
    bh, bw = bucket
    return max(bh / orig_h, bw / orig_w)


def plan_crop(
    orig_h: int,
    orig_w: int,
    bucket: Bucket,
    mode: Literal["center", "random"] = "center",
    rng: random.Random | None = None,
) -> CropBox:
    """Plan the resize-to-cover and crop that turn an (orig_h, orig_w) image into `bucket` (pixels).

    The image is scaled uniformly so that it covers the bucket in both directions (no padding, no
    stretching); the resized size is rounded up so it can never fall a pixel short. The crop is centred, or
    drawn from `rng` in "random" mode (the global `random` module if `rng` is None, which
    `accelerate.utils.set_seed` seeds).
    """
    bh, bw = bucket
    scale = upscale_factor(orig_h, orig_w, bucket)
    # round() first so that e.g. 1024.0000000002 (float noise) does not become 1025.
    resized_h = max(bh, math.ceil(round(orig_h * scale, 6)))
    resized_w = max(bw, math.ceil(round(orig_w * scale, 6)))
    if mode == "center":
        top, left = (resized_h - bh) // 2, (resized_w - bw) // 2
    elif mode == "random":
        draw = rng if rng is not None else random
        top, left = draw.randint(0, resized_h - bh), draw.randint(0, resized_w - bw)
    else:
        raise ValueError(f"crop mode must be 'center' or 'random' (got {mode!r})")
    return CropBox(resized_h, resized_w, top, left, bh, bw)


def resize_and_crop(image: Image.Image, box: CropBox) -> Image.Image:
    """Apply a planned `CropBox`: LANCZOS resize to (resized_h, resized_w), then crop. The result's PIL
    `size` is (box.width, box.height), i.e. exactly the bucket."""
    resized = image.resize((box.resized_w, box.resized_h), Image.Resampling.LANCZOS)
    return resized.crop((box.left, box.top, box.left + box.width, box.top + box.height))
