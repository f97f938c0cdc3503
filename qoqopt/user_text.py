"""A user's own words in a chat (`ask --question`, a JSONL set's question, answer and choices):
plain text, never the chat format's control tokens.

Both runtimes read control tokens in the text they are given as control: `<|im_end|>` ends the
user's turn in llama.cpp (and a question could open a fake assistant turn), `<|image_pad|>` in
transformers claims an image slot the processor has no features for (a ValueError after the model
loaded), and llama.cpp's media marker asks mtmd for one more image than was given. Such text is
refused in one line rather than escaped: no escape exists that both runtimes read back as the
same text, so a run would no longer be comparable between them.
"""

from __future__ import annotations

from .errors import QoqoptError


def control_tokens() -> tuple[str, ...]:
    """Qwen2.5-VL's (and QoQ-Med's) control tokens, and llama.cpp's media marker."""
    from .exports.gguf_runtime import MARKER
    from .tokenizer import ADDED_TOKENS

    return tuple(content for _, content, special in ADDED_TOKENS if special) + (MARKER,)


def checked_text(text: str, what: str, where: str) -> str:
    """``text`` stripped; an empty one, or one holding a control token, is a one-line error."""
    text = text.strip()
    if not text:
        raise QoqoptError(f"{where}: the {what} is empty")
    found = next((token for token in control_tokens() if token in text), None)
    if found:
        raise QoqoptError(f"{where}: the {what} holds {found}, which the chat format reads as a control token, "
                          "not text; remove it")  # fmt: skip
    return text
