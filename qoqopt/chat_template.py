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
    return _rendered(lambda: processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False), source)


def _rendered(render, source: str, what: str = PROBE_CHAT) -> str:
    """``render()``'s text, with the template's failures and endless loops each one line about ``source``."""
    try:
        with time_limit(RENDER_SECONDS):
            text = render()
    except TimeLimit:
        raise QoqoptError(f"{source}'s chat template did not render {what} within {RENDER_SECONDS:g} s "
                          "(a loop that does not end?)") from None  # fmt: skip
    except Exception as exc:  # the template is the checkpoint's code: any error of it is the checkpoint's
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise QoqoptError(f"{source}'s chat template cannot render {what}: "
                          f"{type(exc).__name__}{': ' + reason if reason else ''}") from None  # fmt: skip
    return text  # apply_chat_template(tokenize=False) returns text, whatever the template writes


def gguf_prompt(template: str | None, question: str, source: str) -> str:
    """llama.cpp's prompt for one image and ``question``: the build's own chat template (a GGUF
    carries its checkpoint's), rendered as transformers renders it, with the image span handed to
    mtmd as its media marker. A fixed Qwen2.5-VL prompt put "You are a helpful assistant." before
    the question whatever system turn the checkpoint's template writes, so `ask` on a GGUF asked
    other than `bench` and the transformers builds did. Without a template: Qwen2.5-VL's."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from .exports.gguf_runtime import MARKER, chat_prompt
    from .exports.gguf_verify import IMAGE_SPAN

    if not template:
        return chat_prompt(question)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = _rendered(lambda: render_jinja_template([chat], chat_template=template, add_generation_prompt=True)[0][0],
                     source, "the question")  # fmt: skip
    if text.count(IMAGE_SPAN) != 1 or question not in text:
        raise QoqoptError(f"{source}'s chat template does not write the image span once and then the question, "
                          f"as Qwen2.5-VL's does: {COPY_IT} and export again")  # fmt: skip
    return text.replace(IMAGE_SPAN, MARKER)
