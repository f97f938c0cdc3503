"""llama.cpp runtime for GGUF bench variants: the text GGUF and its mmproj through mtmd, as llama.cpp
and LM Studio users run them. Images stay inside QoQ-Med's training pixel range (in image tokens),
which Ollama does not (it runs every image at 1024 or more image tokens)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.augment import FACTOR  # px a side of one image token
from ..errors import QoqoptError
from ..exports.gguf_meta import train_token_range
from ..exports.gguf_header import read_header
from ..exports.gguf_runtime import BUFFERS, LlamaVL, chat_prompt, context_size, gpu_offload_available, trained_context
from ..exports.gguf_verify import reply_logits


def largest_grid(max_tokens: int, max_aspect: int = 200) -> tuple[int, int]:
    """(columns, rows) of image tokens with the most tokens up to ``max_tokens``, the squarest of those,
    within Qwen2.5-VL's largest aspect ratio (200). llama.cpp keeps such an image as it is."""
    grids = [(max_tokens // rows, rows) for rows in range(1, math.isqrt(max_tokens) + 1)]
    return max(((cols, rows) for cols, rows in grids if cols <= max_aspect * rows), key=lambda g: (g[0] * g[1], g[1]))


PROMPT_ROOM = 1024  # template, question and a teacher-forced reply besides the image: an eval chat's is ~300


def context_for(kv: dict, image_tokens: int, answer_tokens: int) -> int:
    """llama.cpp's context for the eval's chats: the largest image, the text around it and the
    longest answer bench asks for (a fixed 4096 failed every chat once --answer-tokens passed ~2400),
    up to the context the model was trained for (bench refuses an --answer-tokens past it first)."""
    return context_size(trained_context(kv), image_tokens + PROMPT_ROOM + answer_tokens, least=4096)


class GGUFRunner:
    def __init__(self, text: Path, mmproj: Path | None, device: str, threads: int, answer_tokens: int = 0):
        if mmproj is None:
            raise QoqoptError(f"{text.name} has no mmproj beside it: image chats cannot run")
        gpu = device == "cuda" and gpu_offload_available()
        self.runtime = "llama.cpp" + (" (GPU offload)" if gpu else " (CPU)")
        lo, hi = train_token_range()  # llama.cpp ignores the mmproj's pixel keys for Qwen2.5-VL
        n_ctx = context_for(read_header(text).kv, hi, answer_tokens)
        # embd_cache: drift and the greedy answer read the same image; the mmproj encodes it once.
        # one_gpu: as transformers runs on cuda:0; llama.cpp's default split over every GPU timed a
        # pipeline across the node against one GPU, and summed every GPU's buffers as its peak
        self.vl = LlamaVL(text, mmproj, n_ctx=n_ctx, threads=threads, gpu=gpu, one_gpu=True, image_min_tokens=lo,
                          image_max_tokens=hi, embd_cache={})  # fmt: skip
        # clip sizes its compute buffer for the first image it encodes and regrows it, unlogged, for a
        # larger one (the 7B's at 668 image tokens is ~20x that at 100): encoding the largest image
        # first makes the size llama.cpp logs the peak that peak_device_mb reads
        self.vl.image_embeddings(Image.new("RGB", tuple(FACTOR * n for n in largest_grid(hi))))

    def reply_logits(self, item, chat: dict) -> np.ndarray:
        return reply_logits(self.vl, chat, item)

    def answer(self, item, chat: dict, max_new_tokens: int) -> str:
        return self.vl.generate(chat["prompt"], item.image, max_tokens=max_new_tokens, image_key=item.id)

    def profile(self, image, question: str, n_decode: int) -> dict:
        return self.vl.profile(chat_prompt(question), image, n_decode)

    def peak_device_mb(self) -> float | None:
        """MiB of device buffers llama.cpp allocated, as it logs them (weights, KV cache, outputs and
        compute, of the text model and the mmproj); None when every layer runs on the CPU. Like torch's
        allocator peak for transformers, it leaves out the CUDA context."""
        return BUFFERS.total_mib(device=True)

    def start_peaks(self) -> None:
        pass

    def close(self) -> None:
        self.vl.close()
