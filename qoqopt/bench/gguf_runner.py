"""llama.cpp runtime for GGUF bench variants: the text GGUF and its mmproj through mtmd, as LM Studio
and Ollama users run them. Images stay inside QoQ-Med's training pixel range (in image tokens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import QoqoptError
from ..exports.gguf_runtime import LlamaVL, chat_prompt, gpu_offload_available, train_image_tokens


class GGUFRunner:
    def __init__(self, text: Path, mmproj: Path | None, device: str, threads: int, n_ctx: int = 4096):
        if mmproj is None:
            raise QoqoptError(f"{text.name} has no mmproj beside it: image chats cannot run")
        gpu = device == "cuda" and gpu_offload_available()
        self.runtime = "llama.cpp" + (" (GPU offload)" if gpu else " (CPU)")
        lo, hi = train_image_tokens()
        self.vl = LlamaVL(text, mmproj, n_ctx=n_ctx, threads=threads, gpu=gpu, image_min_tokens=lo, image_max_tokens=hi)

    def reply_logits(self, item, chat: dict) -> np.ndarray:
        image = item.image
        n_image = self.vl.image_token_count(image)
        if n_image != chat["image_tokens"]:
            raise QoqoptError(f"{item.id}: llama.cpp gives {n_image} image tokens, transformers {chat['image_tokens']}")
        return self.vl.chat_logits(chat["prompt"], image, chat["reply_ids"])

    def answer(self, item, chat: dict, max_new_tokens: int) -> str:
        return self.vl.generate(chat["prompt"], item.image, max_tokens=max_new_tokens)

    def profile(self, image, question: str, n_decode: int) -> dict:
        return self.vl.profile(chat_prompt(question), image, n_decode)

    def peak_device_mb(self) -> float | None:
        return None  # llama.cpp allocates outside torch; its device memory is not observable here

    def close(self) -> None:
        self.vl.close()
