"""The checkpoint's own tokenizer as GGUF `tokenizer.ggml.*` keys (BPE `gpt2` model, `qwen2` pre-tokenizer).

Read straight from tokenizer.json / tokenizer_config.json (no transformers import):
- tokens: the BPE vocabulary plus the added tokens at their ids, padded up to the embedding's
  row count (152064 for Qwen2.5-VL) with `[PAD<id>]` tokens of type UNUSED;
- token types: NORMAL for BPE tokens, CONTROL for *special* added tokens (`<|im_end|>`, ...),
  USER_DEFINED for non-special added ones (`<tool_call>`, FIM markers), matching what HF shows when
  decoding with skip_special_tokens. (llama.cpp's converter also makes the latter CONTROL because
  they "look special"; both split the same way on encode.)
- merges, special ids (eos `<|im_end|>`, pad `<|endoftext|>`, bos from config, no BOS added),
  and the chat template (chat_template.json > chat_template.jinja > tokenizer_config.json).

A checkpoint without tokenizer files (QoQ-Med's training repository ships a custom tokenizer class
and no tokenizer.json) gets qoqopt's rebuild of the real Qwen2 tokenizer and the Qwen2.5-VL chat
template, and the export says so.

Known trap (README): the HF tokenizer NFC-normalises input and llama.cpp does not, so the two agree
on NFC text only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from qoqopt.errors import QoqoptError
from qoqopt.loader import find_chat_template, read_json_object

# gguf.TokenType values
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
PRE_TOKENIZER = "qwen2"


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    eos_id: int
    pad_id: int | None
    bos_id: int | None
    add_bos: bool
    chat_template: str | None
    notes: list[str] = field(default_factory=list)


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _pre_tokenizer_patterns(tok: dict) -> list[str]:
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split" and "pattern" in s]


def read_vocab(path: Path, config: dict, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of the checkpoint in `path`; `vocab_size` is the embedding's row count."""
    from qoqopt.tokenizer import CHAT_TEMPLATE, QWEN2_PATTERN

    notes: list[str] = []
    tok_cfg = read_json_object(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
    if (path / "tokenizer.json").exists():
        tok = read_json_object(path / "tokenizer.json")
    else:
        from qoqopt.tokenizer import tokenizer_config, tokenizer_json

        tok = json.loads(tokenizer_json())
        tok_cfg = {**tokenizer_config(), **{k: v for k, v in tok_cfg.items() if k not in ("chat_template",)}}
        notes.append("the checkpoint ships no tokenizer.json; used qoqopt's rebuild of the Qwen2 tokenizer")

    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise QoqoptError(f"tokenizer.json model is {model.get('type')!r}; a Qwen2 byte-level BPE was expected")
    patterns = _pre_tokenizer_patterns(tok)
    if patterns != [QWEN2_PATTERN]:
        raise QoqoptError(
            "tokenizer.json's pre-tokenizer is not Qwen2's; llama.cpp's 'qwen2' pre-tokenizer would split text differently"
        )

    by_id: dict[int, tuple[str, int]] = {}
    for text, i in model["vocab"].items():
        by_id[int(i)] = (text, NORMAL)
    for added in tok.get("added_tokens", []):
        by_id[int(added["id"])] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    too_big = [i for i in by_id if i >= vocab_size]
    if too_big:
        raise QoqoptError(f"token id {max(too_big)} does not fit the embedding's {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", UNUSED))
        tokens.append(text)
        types.append(kind)

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {text: i for i, (text, _) in by_id.items()}

    def token_id(key: str, fallback_key: str | None = None) -> int | None:
        content = _token_content(tok_cfg.get(key))
        if content is not None:
            if content not in ids:
                raise QoqoptError(f"tokenizer_config {key} {content!r} is not in the vocabulary")
            return ids[content]
        if fallback_key:
            text_cfg = config.get("text_config") or {}
            value = text_cfg.get(fallback_key, config.get(fallback_key))
            if isinstance(value, list):
                value = value[0] if value else None
            return int(value) if value is not None else None
        return None

    eos = token_id("eos_token", "eos_token_id")
    if eos is None:
        raise QoqoptError("no eos token in tokenizer_config.json or config.json")
    template = find_chat_template(path)
    if template is None:
        template = CHAT_TEMPLATE
        notes.append("the checkpoint ships no chat template; used Qwen2.5-VL's")
    return Vocab(
        tokens=tokens,
        types=types,
        merges=merges,
        eos_id=eos,
        pad_id=token_id("pad_token"),
        bos_id=token_id("bos_token", "bos_token_id"),
        add_bos=bool(tok_cfg.get("add_bos_token", False)),
        chat_template=template,
        notes=notes,
    )


def add_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_eos_token_id(vocab.eos_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
