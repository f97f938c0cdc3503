"""Speed of one request, measured the same way for every runtime: warm-up, repeats, medians.

Each runtime gives `profile(image, question, n_decode)` -> seconds for the image encode alone, time to
first token (encode + prompt + first logits) and `n_decode` further greedy tokens. From the medians:
- prefill tok/s  = prompt tokens / (TTFT - image encode): the language model's prompt throughput
- decode tok/s   = n_decode / decode seconds
- image encode ms, TTFT ms as measured
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from PIL import Image

from ..data.augment import MAX_PIXELS, MIN_PIXELS

# QoQ-Med's training pixel range, both ends, in 28-pixel steps: 256x256 and 728x700 (509,600 px).
PROBE_SIZES = {"min": (256, 256), "max": (728, 700)}
assert all(MIN_PIXELS <= w * h <= MAX_PIXELS for w, h in PROBE_SIZES.values())


@dataclass
class SpeedSettings:
    repeats: int = 3
    warmup: int = 1
    decode_tokens: int = 32


def probe_image(image: Image.Image, size: str) -> Image.Image:
    return image.convert("RGB").resize(PROBE_SIZES[size], Image.Resampling.BICUBIC)


def measure(profile, image: Image.Image, question: str, settings: SpeedSettings) -> dict:
    """Speed summary at both ends of the pixel range; TTFT, prefill and decode at the large end."""
    out = {"repeats": settings.repeats, "decode_tokens": settings.decode_tokens}
    for size in ("min", "max"):
        runs = [profile(probe_image(image, size), question, settings.decode_tokens)
                for _ in range(settings.warmup + settings.repeats)][settings.warmup:]  # fmt: skip
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        out[f"image_encode_ms_{size}"] = 1e3 * med["encode_s"]
        out[f"image_tokens_{size}"] = int(med["n_image_tokens"])
        if size == "max":
            out["image_encode_ms"] = 1e3 * med["encode_s"]
            out["ttft_ms"] = 1e3 * med["ttft_s"]
            out["prompt_tokens"] = int(med["n_prompt"])
            text_s = statistics.median(r["ttft_s"] - r["encode_s"] for r in runs)  # per request: both from one
            out["prefill_tok_s"] = med["n_prompt"] / text_s if text_s > 0 else None
            out["decode_tok_s"] = settings.decode_tokens / med["decode_s"] if med["decode_s"] > 0 else None
    return out
