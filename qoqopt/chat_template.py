"""A checkpoint's chat template, rendered once on the chat qoqopt sends before any model is loaded.

Why: the template is the checkpoint's own code (Jinja, which transformers sandboxes but does not time).
A template with a syntax error or a `raise_exception` call was a jinja traceback from `ask`, and from
`export` only after the model had loaded; one without Qwen2.5-VL's image placeholder was transformers'
"number of <|image_pad|> tokens" error; nested loops (`range(100000)` twice) hung `ask`, `bench` and
`export` with no output.
"""

from __future__ import annotations

from .errors import QoqoptError
from .interrupts import TimeLimit, time_limit

RENDER_SECONDS = 10.0  # a real template renders a chat in milliseconds
PROBE_QUESTION = "Which imaging modality is this?"
PROBE_CHAT = "a chat of one image and a question"
COPY_IT = "copy the chat template from the original checkpoint"


def check_chat_template(processor, source: str) -> None:
    """Render the chat every qoqopt command sends (one user turn: an image, then the question) and
    refuse, in one line, a template that fails, runs on, or drops the image or the question."""
    text = _render(processor, source)
    image_token = getattr(processor, "image_token", "<|image_pad|>")
    if text.count(image_token) != 1:
        raise QoqoptError(f"{source}'s chat template writes {image_token} {text.count(image_token)} times for "
                          f"{PROBE_CHAT} (Qwen2.5-VL's template writes it once): {COPY_IT}")  # fmt: skip
    if PROBE_QUESTION not in text:
        raise QoqoptError(f"{source}'s chat template leaves the question out of {PROBE_CHAT}: {COPY_IT}")


def _render(processor, source: str) -> str:
    from PIL import Image

    chat = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (28, 28))},
                                         {"type": "text", "text": PROBE_QUESTION}]}]  # fmt: skip
    try:
        with time_limit(RENDER_SECONDS):
            text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    except TimeLimit:
        raise QoqoptError(f"{source}'s chat template did not render {PROBE_CHAT} within {RENDER_SECONDS:g} s "
                          "(a loop that does not end?)") from None  # fmt: skip
    except Exception as exc:  # the template is the checkpoint's code: any error of it is the checkpoint's
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise QoqoptError(f"{source}'s chat template cannot render {PROBE_CHAT}: "
                          f"{type(exc).__name__}{': ' + reason if reason else ''}") from None  # fmt: skip
    return text  # apply_chat_template(tokenize=False) returns text, whatever the template writes
