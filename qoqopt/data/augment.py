"""Image sizes inside QoQ-Med's pixel range, and seeded augmentations (many views per base image).

Sizes are multiples of 28 (Qwen2.5-VL's 14-pixel patches merged 2x2), so the HF image processor's
own smart resize leaves our images as they are and what we test is what the model sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# QoQ-Med's training range (its config): 65536 = 256x256 up to 524288 pixels (84-668 visual tokens).
MIN_PIXELS = 65536
MAX_PIXELS = 524288
FACTOR = 28
DEFAULT_MAX_SIDE = 320  # small enough for CPU tests, inside the training range


def fit_size(width: int, height: int, max_side: int = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """(w, h) with the longer side near `max_side`, multiples of 28, pixels in [MIN, MAX]_PIXELS."""
    scale = max_side / max(width, height)
    w, h = _round28(width * scale), _round28(height * scale)
    if w * h < MIN_PIXELS:  # thin images: grow until the training minimum is met
        grow = math.sqrt(MIN_PIXELS / (width * height))
        w, h = _ceil28(width * grow), _ceil28(height * grow)
    if w * h > MAX_PIXELS:
        shrink = math.sqrt(MAX_PIXELS / (width * height))
        w, h = _floor28(width * shrink), _floor28(height * shrink)
    return w, h


def _round28(x: float) -> int:
    return max(FACTOR, int(round(x / FACTOR)) * FACTOR)


def _ceil28(x: float) -> int:
    return max(FACTOR, math.ceil(x / FACTOR) * FACTOR)


def _floor28(x: float) -> int:
    return max(FACTOR, math.floor(x / FACTOR) * FACTOR)


@dataclass(frozen=True)
class AugmentLimits:
    """How far an augmentation may go for one kind of image."""

    rotation: float = 10.0  # degrees, either way
    min_crop: float = 0.85  # crop side as a fraction of the image side
    jitter: float = 0.10  # brightness and contrast factors in [1 - jitter, 1 + jitter]
    flip: bool = False  # left-right flip; only where it cannot change the answer
    fill: tuple[int, int, int] = (0, 0, 0)  # what shows where rotation uncovers the corners


@dataclass(frozen=True)
class AugmentParams:
    angle: float
    crop: float
    cx: float  # crop centre, as a fraction of width / height
    cy: float
    flip: bool
    brightness: float
    contrast: float

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def draw_params(rng: np.random.Generator, limits: AugmentLimits) -> AugmentParams:
    crop = rng.uniform(limits.min_crop, 1.0)
    half = crop / 2
    return AugmentParams(
        angle=float(rng.uniform(-limits.rotation, limits.rotation)),
        crop=float(crop),
        cx=float(rng.uniform(half, 1 - half)),
        cy=float(rng.uniform(half, 1 - half)),
        flip=bool(limits.flip and rng.random() < 0.5),
        brightness=float(rng.uniform(1 - limits.jitter, 1 + limits.jitter)),
        contrast=float(rng.uniform(1 - limits.jitter, 1 + limits.jitter)),
    )


def augment(img: Image.Image, p: AugmentParams, size: tuple[int, int], fill=(0, 0, 0)) -> Image.Image:
    """Crop, rotate, flip and resize in one affine resampling pass, then jitter the grey levels."""
    w_in, h_in = img.size
    w_out, h_out = size
    # Output pixel (x, y) -> input point: centre + R(angle) @ (crop-scaled offset from output centre).
    sx, sy = p.crop * w_in / w_out, p.crop * h_in / h_out
    if p.flip:
        sx = -sx
    cos, sin = math.cos(math.radians(p.angle)), math.sin(math.radians(p.angle))
    a, b, d, e = cos * sx, -sin * sy, sin * sx, cos * sy
    ox, oy = w_out / 2, h_out / 2
    c = p.cx * w_in - a * ox - b * oy
    f = p.cy * h_in - d * ox - e * oy
    out = img.transform(size, Image.Transform.AFFINE, (a, b, c, d, e, f), Image.Resampling.BILINEAR, fillcolor=fill)
    return _jitter(out, p.brightness, p.contrast)


def _jitter(img: Image.Image, brightness: float, contrast: float) -> Image.Image:
    x = np.asarray(img, dtype=np.float32)
    mean = x.mean()
    x = ((x - mean) * contrast + mean) * brightness
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "RGB")


def resize_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Plain anti-aliased resize (no augmentation)."""
    return img if img.size == size else img.resize(size, Image.Resampling.LANCZOS)
