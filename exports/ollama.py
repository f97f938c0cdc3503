"""The Ollama-facing files of a GGUF build: its Modelfile, and the `template` and `params` files.

`ollama create -f Modelfile` reads the Modelfile; `ollama run hf.co/<user>/<repo>` does not, and
reads the repo's `template` (a Go template) and `params` (JSON of Modelfile PARAMETER names) instead
(Hugging Face's Ollama docs). All three carry the same template and settings.

The template uses `.Messages`: Ollama then renders the whole conversation in one pass (its
template.Execute). A `.Prompt`/`.Response` template is rendered once per turn with `.System` empty
after the first, which puts a second default system block before every later user turn and loses
a user's own system message. System messages stay in `.Messages`, so the template renders what the
Qwen2.5-VL chat template QoQ-Med ships renders (tests/test_ollama.py runs both), except that Ollama
itself first merges consecutive messages of one role.
"""

from __future__ import annotations

import json
from pathlib import Path

from qoqopt.mini import TRAIN_MAX_PIXELS, TRAIN_MIN_PIXELS

# How the card names `ollama run hf.co/...` before a repo exists; `publish` puts the repo id in its place.
HF_CO_PLACEHOLDER = "hf.co/<user>/<repo>"
# Ollama runs each Qwen2.5-VL image at 1024..4096 tokens (it passes llama-server --image-min-tokens
# 1024; clip caps the architecture at 4096) and never trims a prompt with images: at 4096 a 2048x2500
# X-ray alone left ~100 tokens for QoQ-Med's reasoning, and two images failed. 16384 holds two such
# images and a long answer (KV cache at 7B, f16: ~0.9 GB). llama.cpp's recipes (the card's, `ask`'s)
# keep images in the training range, at most 668 tokens: the card's -c stays 4096 (gguf_card).
NUM_CTX = 16384
# QoQ-Med's generation_config: repetition_penalty 1.05, temperature 1e-6 (greedy), eos <|im_end|> and
# <|endoftext|>. transformers applies the penalty over the whole sequence; Ollama, as llama.cpp,
# over the last 64 tokens unless repeat_last_n says otherwise: here the whole context, as a number
# (a user who raises num_ctx raises this too).
PARAMS = {"temperature": 0, "repeat_penalty": 1.05, "repeat_last_n": NUM_CTX,
          "stop": ["<|im_end|>", "<|endoftext|>"], "num_ctx": NUM_CTX}  # fmt: skip

# Qwen2.5-VL's default system turn comes only when the first message is not a system one. A chat
# that ends on the assistant's message is that message's continuation (a client's prefill, such as
# "<think>"), left open as transformers' continue_final_message leaves it; otherwise the
# assistant's turn opens.
TEMPLATE = """\
{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}<|im_start|>system
You are a helpful assistant.<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|im_start|>{{ .Role }}
{{ .Content }}
{{- if not (and $last (eq .Role "assistant")) }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""


def write_files(folder: Path, modelfile: str) -> list[tuple[Path, str]]:
    """The Modelfile and the Hub's `template` and `params`, written into `folder`: [(file, manifest kind)]."""
    files = {"Modelfile": (modelfile, "modelfile"), "template": (TEMPLATE, "ollama"), "params": (render_params(), "ollama")}
    for name, (text, _) in files.items():
        (folder / name).write_text(text)
    return [(folder / name, kind) for name, (_, kind) in files.items()]


def render_params() -> str:
    return json.dumps(PARAMS, indent=2) + "\n"


def render_modelfile(name: str, text_files: list[str], mmproj: str | None, others: list[str], tokens: tuple[int, int]) -> str:
    """The Modelfile: `text_files` the build's preferred text GGUF (each part of one in parts),
    `others` the other text GGUFs a user may swap in, `tokens` QoQ-Med's image-token range."""
    lines = [f"# Ollama Modelfile for {name}, written by qoqopt.", "# Create the model with:  ollama create qoq-med -f Modelfile"]
    if others:
        lines.append(f"# Other builds in this folder: {', '.join(others)} (to use one, put it in the text FROM lines,")
        lines.append("# one FROM line for each of its parts, if it has several).")
    if len(text_files) > 1:
        lines.append(f"# One FROM line per part: Ollama 0.30 or later merges the {len(text_files)} parts "
                     "(earlier versions cannot import parts).")  # fmt: skip
    lines += [f"FROM ./{f}" for f in text_files]
    if mmproj:
        lines += _mmproj_lines(mmproj, tokens)
    lines += [f'TEMPLATE """{TEMPLATE}"""',
              "# QoQ-Med's generation settings: greedy, repetition penalty 1.05 over the whole context (as",
              "# transformers applies it; Ollama's default window is the last 64 tokens), stop at either EOS."]  # fmt: skip
    lines += _parameter_lines()
    return "\n".join(lines) + "\n"


def _mmproj_lines(mmproj: str, tokens: tuple[int, int]) -> list[str]:
    lo, hi = tokens
    return [
        "# The projector from this checkpoint's own (fine-tuned) vision tower. Images need Ollama 0.30 or",
        "# later (earlier versions give image embeddings text positions, not Qwen2.5-VL's 2-D ones).",
        f"FROM ./{mmproj}",
        "# Ollama runs every image at 1024 or more image tokens (it passes llama-server --image-min-tokens",
        f"# 1024 for this architecture), above QoQ-Med's training range of {lo}..{hi} tokens ({TRAIN_MIN_PIXELS}..",
        f"# {TRAIN_MAX_PIXELS} pixels), which a Modelfile cannot change; qoqopt's drift numbers were measured",
        "# inside that range. For answers at the training range use llama.cpp or llama-server with the",
        "# flags in README.md.",
    ]


def _parameter_lines() -> list[str]:
    """PARAMS as Modelfile lines: a list is one line per value, as Ollama reads repeated stops."""
    values = [(k, v) for k, vs in PARAMS.items() for v in (vs if isinstance(vs, list) else [vs])]
    return [f'PARAMETER {k} "{v}"' if isinstance(v, str) else f"PARAMETER {k} {v}" for k, v in values]
