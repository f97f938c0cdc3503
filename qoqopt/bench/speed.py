"""Speed of one request, measured the same way for every runtime: warm-up, repeats, medians.

Each runtime gives `profile(image, question, n_decode)` -> seconds for the image encode alone, time to
first token (encode + prompt + first logits) and `n_decode` further greedy tokens. Per repeat:
- prefill tok/s  = prompt tokens / the language model's prompt pass (transformers: its first forward
  and logits, timed by hooks; llama.cpp: TTFT less the image encode, its prompt decode)
- decode tok/s   = n_decode / decode seconds
- image encode ms, TTFT ms as measured
Each figure is the median over the repeats; the rates and TTFT keep their [min, max] under "spread".
Decode includes picking each greedy token (llama.cpp: an argmax in Python over its logits in place,
~50 µs a token on a CPU).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from PIL import Image

from ..data.augment import MAX_PIXELS, MIN_PIXELS

# QoQ-Med's training pixel range, both ends, in 28-pixel steps: 256x256 and 728x700 (509,600 px).
PROBE_SIZES = {"min": (256, 256), "max": (728, 700)}
assert all(MIN_PIXELS <= w * h <= MAX_PIXELS for w, h in PROBE_SIZES.values())


PREFILL_BASIS = "prompt pass"


@dataclass
class SpeedSettings:
    repeats: int = 3
    warmup: int = 1
    decode_tokens: int = 32


def probe_image(image: Image.Image, size: str) -> Image.Image:
    return image.convert("RGB").resize(PROBE_SIZES[size], Image.Resampling.BICUBIC)


def measure(profile, image: Image.Image, question: str, settings: SpeedSettings) -> dict:
    """Speed summary at both ends of the pixel range; TTFT, prefill and decode at the large end,
    each with the [min, max] of its repeats beside the median (shared machines are noisy)."""
    # "prompt pass": transformers' prefill is its first forward, timed by hooks (before 2026-12-03 it
    # was TTFT less the encode, generate()'s own host work included); the report marks older rows
    out = {"repeats": settings.repeats, "decode_tokens": settings.decode_tokens, "prefill": PREFILL_BASIS}
    for size in ("min", "max"):
        runs = [profile(probe_image(image, size), question, settings.decode_tokens)
                for _ in range(settings.warmup + settings.repeats)][settings.warmup:]  # fmt: skip
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        out[f"image_encode_ms_{size}"] = 1e3 * med["encode_s"]
        out[f"image_tokens_{size}"] = int(med["n_image_tokens"])
        if size == "max":
            out["image_encode_ms"] = 1e3 * med["encode_s"]
            out["prompt_tokens"] = int(med["n_prompt"])
            out.update(_rates(runs, settings.decode_tokens))
    return out


def _rates(runs: list[dict], n_decode: int) -> dict:
    """TTFT ms, prefill tok/s (prompt tokens over the prompt pass of the same request) and decode
    tok/s: the median of the repeats, and their range under ``spread``."""
    per_run = {
        "ttft_ms": [1e3 * r["ttft_s"] for r in runs],
        "prefill_tok_s": [r["n_prompt"] / r["prefill_s"] if r["prefill_s"] > 0 else None for r in runs],
        "decode_tok_s": [n_decode / r["decode_s"] if r["decode_s"] > 0 else None for r in runs],
    }
    out: dict = {"spread": {}}
    for key, values in per_run.items():
        values = [v for v in values if v is not None]
        out[key] = statistics.median(values) if values else None
        out["spread"][key] = [min(values), max(values)] if values else None
    return out
