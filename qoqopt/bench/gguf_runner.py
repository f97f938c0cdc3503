"""llama.cpp runtime for GGUF bench variants: the text GGUF and its mmproj through mtmd, as llama.cpp
and LM Studio users run them. Images stay inside QoQ-Med's training pixel range (in image tokens),
which Ollama does not (it runs every image at 1024 or more image tokens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import QoqoptError
from ..exports.gguf_meta import train_token_range
from ..exports.gguf_runtime import LlamaVL, chat_prompt, gpu_offload_available
from ..exports.gguf_verify import reply_logits


class GGUFRunner:
    def __init__(self, text: Path, mmproj: Path | None, device: str, threads: int, n_ctx: int = 4096):
        if mmproj is None:
            raise QoqoptError(f"{text.name} has no mmproj beside it: image chats cannot run")
        gpu = device == "cuda" and gpu_offload_available()
        self.runtime = "llama.cpp" + (" (GPU offload)" if gpu else " (CPU)")
        lo, hi = train_token_range()  # llama.cpp ignores the mmproj's pixel keys for Qwen2.5-VL
        # embd_cache: drift and the greedy answer read the same image; the mmproj encodes it once.
        self.vl = LlamaVL(text, mmproj, n_ctx=n_ctx, threads=threads, gpu=gpu, image_min_tokens=lo, image_max_tokens=hi,
                          embd_cache={})  # fmt: skip

    def reply_logits(self, item, chat: dict) -> np.ndarray:
        return reply_logits(self.vl, chat, item)

    def answer(self, item, chat: dict, max_new_tokens: int) -> str:
        return self.vl.generate(chat["prompt"], item.image, max_tokens=max_new_tokens, image_key=item.id)

    def profile(self, image, question: str, n_decode: int) -> dict:
        return self.vl.profile(chat_prompt(question), image, n_decode)

    def peak_device_mb(self) -> float | None:
        return None  # llama.cpp allocates outside torch; its device memory is not observable here

    def start_peaks(self) -> None:
        pass

    def close(self) -> None:
        self.vl.close()
