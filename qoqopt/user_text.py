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

import re
import unicodedata

from .errors import QoqoptError

_SURROGATE = re.compile(r"[\ud800-\udfff]")


def control_tokens() -> tuple[str, ...]:
    """Qwen2.5-VL's (and QoQ-Med's) control tokens, and llama.cpp's media marker."""
    from .exports.gguf_runtime import MARKER
    from .tokenizer import ADDED_TOKENS

    return tuple(content for _, content, special in ADDED_TOKENS if special) + (MARKER,)


def checked_text(text: str, what: str, where: str) -> str:
    """``text`` stripped and in Unicode's composed form (NFC); an empty one, or one holding a control
    token or half a UTF-16 pair, is a one-line error.

    NFC because transformers' Qwen2 tokenizer composes text first and llama.cpp's does not: "é"
    typed as e + U+0301 (macOS, text from PDFs) was 7 tokens in one runtime and 9 in the other, so
    the two were asked different questions and the difference counted as drift."""
    text = unicodedata.normalize("NFC", text.strip())
    if not text:
        raise QoqoptError(f"{where}: the {what} is empty")
    lone = _SURROGATE.search(text)
    if lone:  # JSON's "\ud83d" without its pair, or bytes that are not UTF-8 in a shell argument
        raise QoqoptError(f"{where}: the {what} holds U+{ord(lone[0]):04X}, half of a UTF-16 pair, which is no "
                          "character: fix the text's encoding")  # fmt: skip
    found = next((token for token in control_tokens() if token in text), None)
    if found:
        raise QoqoptError(f"{where}: the {what} holds {found}, which the chat format reads as a control token, "
                          "not text; remove it")  # fmt: skip
    return text
