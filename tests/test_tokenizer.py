"""The rebuilt Qwen2 tokenizer against tiktoken running the same rank file (a reference we did not write)."""

import json
import unicodedata

import pytest

from qoqopt.tokenizer import ADDED_TOKENS, QWEN2_PATTERN, read_ranks, tiktoken_path, tokenizer_json

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

    ranks = read_ranks(tiktoken_path())
    special = {c: i for i, c, _ in ADDED_TOKENS}
    return tiktoken.Encoding("qwen2", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def test_hello_and_special_ids(hf_tok):
    assert hf_tok.encode("Hello").ids == [9707]
    for token_id, content, _ in ADDED_TOKENS:
        assert hf_tok.token_to_id(content) == token_id
    assert hf_tok.token_to_id("<|image_pad|>") == 151655
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
